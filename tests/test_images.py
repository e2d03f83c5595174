"""Image generation through the node with a real diffusers pipeline (the tiny one of
tests/image_support.py): routes, checks, errors, admission, cancellation, measured config."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys

import pytest
from image_support import (
    CONFIDENTIAL_IMAGES,
    IMAGE_MODEL,
    MAX_IMAGES,
    MAX_PROMPT_TOKENS,
    PLAIN_IMAGES,
    SIZES,
    image_body,
    image_model,
    parameter_count,
)
from PIL import Image
from pydantic import ValidationError
from server_support import compact

from node.config import ModelConfig, NodeConfig
from node.envelope import usage_in_clear
from node.models import weights_sha256
from node.protocol import Usage

DATA_URL_PREFIX = "data:image/png;base64,"


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


def test_tiny_pipeline_is_tiny(tiny_pipeline):
    assert 10_000 < parameter_count(tiny_pipeline) < 100_000


async def test_confidential_image_as_data_url_sealed_padded_and_receipted(make_image_node):
    node = await make_image_node()
    outer, opener = node.seal(image_body(size="32x48", n=2))
    outer["num_compute_units"] = 32 * 48 * 2
    response = await node.post(CONFIDENTIAL_IMAGES, outer)
    assert response.status == 200, await response.text()
    sealed = await response.json()
    plaintext = opener.open_response(sealed)  # checks hash, signature, receipt and padding
    answer = json.loads(plaintext)
    assert set(answer) >= {"created", "data"}
    assert len(answer["data"]) == 2
    for item in answer["data"]:
        assert item["url"].startswith(DATA_URL_PREFIX)
        assert png_size(base64.b64decode(item["url"][len(DATA_URL_PREFIX):], validate=True)) == (32, 48)
    # Usage counts compute units: exact inside the answer, rounded up in clear (privacy.clear_usage).
    units = 32 * 48 * 2
    assert answer["usage"]["total_tokens"] == answer["usage"]["completion_tokens"] == units
    assert sealed["usage"] == usage_in_clear(Usage.from_openai(answer["usage"]).model_dump(), "bucketed")
    assert sealed["receipt"]["usage"] == sealed["usage"]
    assert sealed["receipt"]["model"] == IMAGE_MODEL
    # Padded to its bucket like every answer (the SDK's parsers ignore `obfuscation`).
    assert "obfuscation" in answer
    metrics = (await (await node.client.get("/metrics")).read()).decode()
    assert "tee_node_images_total 2.0" in metrics


async def test_b64_json_and_defaults(make_image_node):
    node = await make_image_node()
    status, body, answer = await node.call(CONFIDENTIAL_IMAGES, image_body(response_format="b64_json"))
    assert status == 200, body
    (item,) = answer["data"]
    assert "url" not in item
    assert png_size(base64.b64decode(item["b64_json"], validate=True)) == (64, 64)  # the first size is the default


@pytest.mark.parametrize(
    ("fields", "code", "extra"),
    [
        ({"response_format": "png"}, "INVALID_BODY", {}),
        ({"size": "128x128"}, "UNSUPPORTED_IMAGE_SIZE", {"sizes": SIZES}),
        ({"size": "big"}, "UNSUPPORTED_IMAGE_SIZE", {"sizes": SIZES}),
        ({"n": MAX_IMAGES + 1}, "TOO_MANY_IMAGES", {"max_images": MAX_IMAGES}),
        ({"n": 0}, "INVALID_BODY", {}),
        ({"prompt": " ".join(["cat"] * (MAX_PROMPT_TOKENS + 1))}, "PROMPT_TOO_LONG", {"max_prompt_tokens": MAX_PROMPT_TOKENS}),
    ],
)
async def test_refused_image_requests_and_the_node_keeps_serving(make_image_node, fields, code, extra):
    node = await make_image_node()
    status, body, _ = await node.call(CONFIDENTIAL_IMAGES, image_body(**fields))
    assert (status, body["error"]["code"]) == (400, code), body
    for key, value in extra.items():
        assert body["error"][key] == value
    status, body, answer = await node.call(CONFIDENTIAL_IMAGES, image_body())
    assert status == 200 and len(answer["data"]) == 1


@pytest.mark.parametrize("units", [64 * 64 * 2, 0, 64 * 64 - 1])
async def test_num_compute_units_must_be_the_pixels_asked_for(make_image_node, units):
    node = await make_image_node()
    outer, _ = node.seal(image_body(n=1))
    outer["num_compute_units"] = units
    response = await node.post(CONFIDENTIAL_IMAGES, outer)
    body = await response.json()
    assert (response.status, body["error"]["code"]) == (400, "INVALID_BODY")
    assert "num_compute_units" in body["error"]["message"]


async def test_plain_route_off_by_default_and_on_when_allowed(make_image_node):
    node = await make_image_node()
    response = await node.client.post(PLAIN_IMAGES, data=compact(image_body()))
    assert (response.status, (await response.json())["error"]["code"]) == (404, "PLAINTEXT_DISABLED")
    node = await make_image_node(allow_plaintext=True)
    response = await node.client.post(PLAIN_IMAGES, data=compact(image_body(size="32x48")))
    answer = await response.json()
    assert response.status == 200, answer
    assert png_size(base64.b64decode(answer["data"][0]["url"][len(DATA_URL_PREFIX):])) == (32, 48)
    response = await node.client.post(PLAIN_IMAGES, data=compact(image_body(response_format="jpeg")))
    assert (response.status, (await response.json())["error"]["code"]) == (400, "INVALID_BODY")


async def test_image_model_is_listed_and_refused_on_text_routes(make_image_node):
    node = await make_image_node()
    models = await (await node.client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [IMAGE_MODEL]
    status, body, _ = await node.call(
        "/v1/confidential/chat/completions", {"model": IMAGE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert (status, body["error"]["code"]) == (404, "MODEL_NOT_FOUND")


async def test_measured_config_names_the_image_model_and_its_weights(make_image_node, tiny_pipeline):
    node = await make_image_node()
    await asyncio.sleep(0)  # the measured config is fixed right after the engine turns ready
    measured = node.state.attestation.measured_config
    (model,) = measured["engine"]["models"]
    assert model["name"] == IMAGE_MODEL and model["task"] == "image"
    assert model["weights_sha256"] == weights_sha256(str(tiny_pipeline), tiny_pipeline)
    assert model["sizes"] == SIZES and model["max_images"] == MAX_IMAGES


async def test_admission_queue_full_is_429_with_retry_after(make_image_node, tiny_pipeline):
    slow = image_model(tiny_pipeline, engine_args={"num_inference_steps": 100, "guidance_scale": 1.0})
    node = await make_image_node(model=slow, limits={"max_in_flight": 1, "max_queue": 0})
    first = asyncio.ensure_future(node.call(CONFIDENTIAL_IMAGES, image_body()))
    while node.state.admission.in_flight == 0:
        await asyncio.sleep(0.01)
    status, body, _ = await node.call(CONFIDENTIAL_IMAGES, image_body())
    assert (status, body["error"]["code"]) == (429, "OVERLOADED")
    status, _, answer = await first
    assert status == 200 and len(answer["data"]) == 1


async def test_client_hanging_up_stops_the_image(make_image_node, tiny_pipeline):
    # 1000 steps at 128x128 take over a minute: only stopping at a step's end frees the worker at once.
    slow = image_model(tiny_pipeline, sizes=["128x128"], engine_args={"num_inference_steps": 1000, "guidance_scale": 1.0})
    node = await make_image_node(model=slow)
    outer, _ = node.seal(image_body())
    request = asyncio.ensure_future(node.post(CONFIDENTIAL_IMAGES, outer))
    while node.engine.running_requests() == 0:
        await asyncio.sleep(0.01)
    request.cancel()  # the client closes its connection
    with pytest.raises(asyncio.CancelledError):
        await request
    for _ in range(200):
        if node.engine.running_requests() == 0:
            break
        await asyncio.sleep(0.02)
    assert node.engine.running_requests() == 0
    # The worker thread is free again after at most one step (~1 s, more on a busy host), not
    # after the quarter of an hour the whole run would take.
    loaded = node.engine._loaded[IMAGE_MODEL]
    async with asyncio.timeout(60):
        assert await asyncio.wrap_future(loaded.worker.submit(lambda: "free")) == "free"


def test_image_fields_only_on_image_models():
    with pytest.raises(ValidationError, match="task = \"image\""):
        ModelConfig(name="m", source="x", sizes=["64x64"])
    with pytest.raises(ValidationError, match="task = \"image\""):
        ModelConfig(name="m", source="x", max_images=2)
    with pytest.raises(ValidationError, match="WIDTHxHEIGHT"):
        ModelConfig(name="m", source="x", task="image", sizes=["64X64"])


def test_text_models_measured_as_before():
    """Adding image models leaves a text model's measured entry (and so its digest) unchanged."""
    (model, *_) = NodeConfig().measured_config({})["engine"]["models"]
    assert set(model) == {"name", "task", "dtype", "max_model_len", "engine_args", "weights_sha256"}


def test_image_only_config_never_imports_vllm(tiny_pipeline):
    script = (
        "import sys, asyncio\n"
        "from node.config import NodeConfig\n"
        "from node.engine import build_engine\n"
        f"config = NodeConfig.model_validate({{'engine': {{'models': [{image_model(tiny_pipeline)!r}]}}}})\n"
        "engine = build_engine(config)\n"
        "asyncio.run(engine.start())\n"
        "print(type(engine).__name__, engine.ready, 'vllm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["ImageEngine", "True", "False"]


async def test_prompts_never_reach_a_log(make_image_node, all_logs):
    node = await make_image_node(allow_plaintext=True)
    secret = "picture of the secret house"
    status, _, answer = await node.call(CONFIDENTIAL_IMAGES, image_body(secret))
    assert status == 200 and answer["data"]
    status, body, _ = await node.call(CONFIDENTIAL_IMAGES, image_body(" ".join([secret] * MAX_PROMPT_TOKENS)))
    assert body["error"]["code"] == "PROMPT_TOO_LONG"
    response = await node.client.post(PLAIN_IMAGES, data=compact(image_body(secret)))
    assert response.status == 200
    logs = all_logs()
    assert "id=" in logs  # the access lines were captured
    assert "secret" not in logs


def test_a_model_without_sizes_serves_its_pipelines_own(tiny_pipeline):
    from node.engine.images import load_model

    cfg = ModelConfig(name=IMAGE_MODEL, source=str(tiny_pipeline), task="image")
    loaded = load_model(cfg)
    try:
        # The tiny UNet's 32 latent pixels times the VAE's scale factor of 2.
        assert loaded.card.image_sizes == ("64x64",)
        assert loaded.max_prompt_tokens == MAX_PROMPT_TOKENS
    finally:
        loaded.worker.shutdown()


async def test_an_image_through_the_ohttp_gateway(make_image_node):
    """Relayed (RFC 9458): the gateway dispatches the sealed image request as a direct one."""
    import ohttp_reference as ref

    node = await make_image_node()
    (config, *_) = ref.parse_key_configs(await (await node.client.get("/v1/ohttp/keys")).read())
    outer, opener = node.seal(image_body(size="32x48"))
    exchange = ref.Exchange(config)
    encapsulated = exchange.request(
        ref.encode_request("POST", CONFIDENTIAL_IMAGES, [("content-type", "application/json")], compact(outer))
    )
    response = await node.client.post("/v1/ohttp", data=encapsulated, headers={"Content-Type": "message/ohttp-req"})
    assert response.status == 200
    inner = ref.decode_response(exchange.open(await response.read()))
    assert inner.status == 200, inner.content
    (item,) = json.loads(opener.open_response(json.loads(inner.content)))["data"]
    assert png_size(base64.b64decode(item["url"][len(DATA_URL_PREFIX):])) == (32, 48)
