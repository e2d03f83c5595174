"""Our client (`images.generate`) and `tee-node image` against `tee-node serve` with the tiny
diffusers pipeline: attestation, sealing, every signature and the receipt verified, PNGs of the
asked size, the errors typed."""

from __future__ import annotations

import io
import json
import subprocess
import urllib.error
import urllib.request

import pytest
from image_support import IMAGE_MODEL, MAX_IMAGES, PLAIN_IMAGES, SIZES
from PIL import Image
from server_support import TEE_NODE, compact

from node.client import (
    Client,
    ConfidentialClient,
    InvalidBodyError,
    PlaintextDisabledError,
    TooManyImagesError,
    UnsupportedImageSizeError,
)
from node.client.errors import error_from_body
from node.envelope import usage_bucket
from node.models import weights_sha256


def png_size(png: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.size


def test_sync_client_gets_verified_pngs_and_the_attested_image_model(image_node, tiny_pipeline):
    with Client(image_node.url, allow_simulated=True) as client:
        response = client.images.generate(model=IMAGE_MODEL, prompt="a green tree", size="32x48", n=2)
        identity = client.attestation
    assert [png_size(item.png()) for item in response.data] == [(32, 48), (32, 48)]
    assert all(item.url.startswith("data:image/png;base64,") for item in response.data)
    # The receipt was verified (signature by the attested key, transcript, clear usage = signed usage).
    assert response.receipt.model == IMAGE_MODEL and response.receipt.events == 1
    assert response.usage.total_tokens == 32 * 48 * 2  # exact inside; the receipt's is rounded up
    assert response.receipt.usage.completion_tokens == usage_bucket(32 * 48 * 2)
    assert response.attestation == identity
    (model,) = identity.document["measured_config"]["engine"]["models"]
    assert (model["name"], model["task"]) == (IMAGE_MODEL, "image")
    assert model["weights_sha256"] == weights_sha256(str(tiny_pipeline), tiny_pipeline)


async def test_async_client_b64_json_and_typed_errors(image_node):
    async with ConfidentialClient(image_node.url, allow_simulated=True) as client:
        response = await client.images.generate(model=IMAGE_MODEL, prompt="a blue house", response_format="b64_json")
        (item,) = response.data
        assert item.url is None and png_size(item.png()) == (64, 64)
        with pytest.raises(UnsupportedImageSizeError) as refused:
            await client.images.generate(model=IMAGE_MODEL, prompt="a cat", size="640x480")
        assert refused.value.sizes == SIZES
        with pytest.raises(TooManyImagesError) as refused:
            await client.images.generate(model=IMAGE_MODEL, prompt="a cat", n=MAX_IMAGES + 1)
        assert refused.value.max_images == MAX_IMAGES
        with pytest.raises(InvalidBodyError):
            await client.images.generate(model=IMAGE_MODEL, prompt="a cat", response_format="gif")


def test_plain_route_is_off_on_the_node(image_node):
    request = urllib.request.Request(image_node.url + PLAIN_IMAGES, data=compact({"model": IMAGE_MODEL, "prompt": "x"}))
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=10)
    body = answer.value.read()
    assert answer.value.code == 404
    assert isinstance(error_from_body(404, json.loads(body)), PlaintextDisabledError)


def test_cli_image_writes_pngs_and_says_what_it_verified(image_node, tmp_path):
    out = tmp_path / "cat.png"
    result = subprocess.run(
        [str(TEE_NODE), "image", image_node.url, "a red cat", "--allow-simulated", "--size", "32x48", "--n", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    written = [tmp_path / "cat-1.png", tmp_path / "cat-2.png"]
    assert result.stdout.split() == [str(path) for path in written]
    assert [png_size(path.read_bytes()) for path in written] == [(32, 48), (32, 48)]
    err = result.stderr
    assert "attestation verified: tee=simulated" in err
    assert f"model:         {IMAGE_MODEL}" in err
    assert "receipt verified: events=1, key epoch=" in err and f"compute units (pixels)={32 * 48 * 2}" in err


def test_cli_image_refused_size_fails_and_writes_nothing(image_node, tmp_path):
    out = tmp_path / "x.png"
    result = subprocess.run(
        [str(TEE_NODE), "image", image_node.url, "a cat", "--allow-simulated", "--size", "17x17", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and not out.exists()
    assert "UnsupportedImageSizeError" in result.stderr
