"""Basic routes of the node: health, readiness, models, metrics, OpenAPI, lock, request ids and
non-streaming confidential round trips with receipts (echo engine, in process)."""

from __future__ import annotations

import json
import re

from server_support import (
    CONFIDENTIAL_CHAT,
    CONFIDENTIAL_COMPLETIONS,
    CONFIDENTIAL_EMBEDDINGS,
    MODEL,
    chat_body,
    completion_body,
    embedding_body,
)
from prometheus_client.parser import text_string_to_metric_families

from node import envelope
from node.crypto import b64d, blake2b_256
from node.keys import verify_sui_signature
from node.protocol import Usage


async def test_health(node_client):
    response = await node_client.client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_ready_reports_current_epoch(node_client):
    response = await node_client.client.get("/ready")
    assert response.status == 200
    assert await response.json() == {"status": "ready", "key_epoch": node_client.state.keyring.current.epoch}


async def test_models_openai_list(node_client):
    response = await node_client.client.get("/v1/models")
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    (card,) = body["data"]
    assert card["object"] == "model"
    assert isinstance(card["created"], int)
    assert isinstance(card["owned_by"], str)
    assert card["tasks"] == ["chat", "completions", "embeddings"]  # the echo engine serves every endpoint


async def test_metrics_is_prometheus_text(node_client):
    await node_client.chat_ok()
    response = await node_client.client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    for name in ("tee_node_requests", "tee_node_key_epoch", "tee_node_engine_ready", "tee_node_in_flight"):
        assert name in families, name
    (ready,) = families["tee_node_engine_ready"].samples
    assert ready.value == 1


async def test_openapi_components_match_seeds(node_client):
    response = await node_client.client.get("/openapi.json")
    assert response.status == 200
    doc = await response.json()
    assert doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]

    request = schemas["ConfidentialComputeRequest"]
    assert set(request["required"]) == {
        "ciphertext",
        "stack_small_id",
        "nonce",
        "salt",
        "client_dh_public_key",
        "node_dh_public_key",
        "plaintext_body_hash",
        "model_name",
    }
    props = request["properties"]
    assert set(props) == set(request["required"]) | {"num_compute_units", "stream", "kem_ciphertext"}
    for name in ("ciphertext", "client_dh_public_key", "model_name", "node_dh_public_key", "nonce", "plaintext_body_hash", "salt"):
        assert props[name]["type"] == "string", name
    assert props["stack_small_id"]["type"] == "integer"
    assert props["stack_small_id"]["minimum"] == 0
    units = props["num_compute_units"]["anyOf"]
    assert {"type": "null"} in units
    assert any(u.get("type") == "integer" and u.get("minimum") == 0 for u in units)
    assert {"type": "boolean"} in props["stream"]["anyOf"] and {"type": "null"} in props["stream"]["anyOf"]

    response_schema = schemas["ConfidentialComputeResponse"]
    assert {"ciphertext", "nonce"} <= set(response_schema["required"])
    assert {"ciphertext", "nonce", "response_hash", "signature", "usage"} <= set(response_schema["properties"])

    usage = schemas["Usage"]
    assert set(usage["required"]) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "completion_tokens_details",
        "prompt_tokens_details",
    }
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert usage["properties"][name]["type"] == "integer"
        assert usage["properties"][name]["minimum"] == 0
    assert set(schemas["CompletionTokensDetails"]["required"]) == {
        "accepted_prediction_tokens",
        "audio_tokens",
        "reasoning_tokens",
        "rejected_prediction_tokens",
    }
    assert set(schemas["PromptTokensDetails"]["required"]) == {"audio_tokens", "cached_tokens"}

    assert {
        "/v1/confidential/chat/completions",
        "/v1/confidential/completions",
        "/v1/confidential/embeddings",
        "/v1/nodes/lock",
        "/v1/models",
        "/health",
        "/ready",
        "/metrics",
    } <= set(doc["paths"])
    chat = doc["paths"]["/v1/confidential/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ConfidentialComputeRequest")
    assert {"200", "400", "401", "404", "409", "413", "422", "429", "500", "503"} <= set(chat["responses"])
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}


async def test_nodes_lock_shape(node_client):
    response = await node_client.client.post("/v1/nodes/lock", json={"model": MODEL, "max_num_tokens": 16})
    assert response.status == 200
    body = await response.json()
    assert set(body) == {"public_key", "node_small_id", "stack_entry_digest", "stack_small_id", "kem_public_key"}
    assert b64d(body["public_key"]) == node_client.current_key
    assert b64d(body["kem_public_key"]) == node_client.state.keyring.current.kem_public_key
    assert body["node_small_id"] == node_client.state.config.node_small_id
    assert body["stack_entry_digest"] is None
    assert isinstance(body["stack_small_id"], int)


async def test_nodes_lock_follows_rotation(node_client):
    node_client.state.keyring.rotate()
    body = await (await node_client.client.post("/v1/nodes/lock", json={"model": MODEL})).json()
    assert b64d(body["public_key"]) == node_client.current_key


async def test_request_id_echoed(node_client):
    response = await node_client.client.get("/health", headers={"X-Request-Id": "my-req.42:a_b"})
    assert response.headers["X-Request-Id"] == "my-req.42:a_b"
    outer, _ = node_client.seal(chat_body("hi there"))
    response = await node_client.post(CONFIDENTIAL_CHAT, outer, {"X-Request-Id": "abc-123"})
    assert response.status == 200
    assert response.headers["X-Request-Id"] == "abc-123"


async def test_request_id_generated_when_absent_or_invalid(node_client):
    ids = set()
    for headers in ({}, {}, {"X-Request-Id": "bad id with spaces"}, {"X-Request-Id": "x" * 129}):
        response = await node_client.client.get("/health", headers=headers)
        request_id = response.headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id
        ids.add(request_id)
    assert len(ids) == 4
    # error responses carry it too
    response = await node_client.post(CONFIDENTIAL_CHAT, b"{", {"X-Request-Id": "err-1"})
    assert response.status == 400
    assert response.headers["X-Request-Id"] == "err-1"


def _check_response(node, body, opener, model=MODEL) -> dict:
    """The outer response fields, the signature over response_hash, the receipt."""
    assert set(body) == {"ciphertext", "nonce", "response_hash", "signature", "usage", "receipt"}
    assert len(b64d(body["nonce"])) == 12
    plaintext = opener.open_response(body)
    assert b64d(body["response_hash"]) == blake2b_256(plaintext)
    assert verify_sui_signature(body["signature"], b64d(body["response_hash"])) == node.state.signer.public_key
    Usage.model_validate(body["usage"])
    receipt = envelope.verify_receipt(
        body["receipt"],
        signing_key=node.state.signer.public_key,
        request_hash=opener.request_hash,
        response_hashes=[b64d(body["response_hash"])],
    )
    assert receipt["events"] == 1
    assert receipt["model"] == model
    assert receipt["usage"] == body["usage"]
    assert receipt["key_epoch"] == node.state.keyring.current.epoch
    return json.loads(plaintext)


async def test_confidential_chat_round_trip(node_client):
    prompt = "the quick brown fox"
    outer, opener = node_client.seal(chat_body(prompt, max_tokens=16))
    response = await node_client.post(CONFIDENTIAL_CHAT, outer)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = await response.json()
    answer = _check_response(node_client, body, opener)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == prompt
    # The exact usage inside the answer, rounded up to powers of two (at least 16) in clear.
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"], answer["usage"]["total_tokens"]) == (4, 4, 8)
    assert body["usage"]["prompt_tokens"] == 16
    assert body["usage"]["completion_tokens"] == 16
    assert body["usage"]["total_tokens"] == 32


async def test_confidential_chat_max_tokens_truncates(node_client):
    outer, opener = node_client.seal(chat_body("one two three four five", max_tokens=2))
    body = await (await node_client.post(CONFIDENTIAL_CHAT, outer)).json()
    answer = _check_response(node_client, body, opener)
    assert answer["choices"][0]["message"]["content"] == "one two"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 2
    assert body["usage"]["completion_tokens"] == 16


async def test_confidential_completions_round_trip(node_client):
    outer, opener = node_client.seal(completion_body("lorem ipsum dolor"))
    response = await node_client.post(CONFIDENTIAL_COMPLETIONS, outer)
    assert response.status == 200
    answer = _check_response(node_client, await response.json(), opener)
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == "lorem ipsum dolor"


async def test_confidential_embeddings_round_trip(node_client):
    outer, opener = node_client.seal(embedding_body(["alpha beta", "gamma"]))
    response = await node_client.post(CONFIDENTIAL_EMBEDDINGS, outer)
    assert response.status == 200
    body = await response.json()
    answer = _check_response(node_client, body, opener)
    assert answer["object"] == "list"
    assert [d["index"] for d in answer["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 16 for d in answer["data"])
    assert answer["usage"]["prompt_tokens"] == 3
    assert body["usage"]["prompt_tokens"] == 16
    assert body["usage"]["completion_tokens"] == 0  # always 0 for embeddings: nothing to round


async def test_embeddings_ignore_stream_flag(node_client):
    """Embeddings are never streamed: a stream flag inside or outside gives one sealed response."""
    payload = {**embedding_body("alpha"), "stream": True}
    outer, opener = node_client.seal(payload, stream=True)
    response = await node_client.post(CONFIDENTIAL_EMBEDDINGS, outer)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    _check_response(node_client, await response.json(), opener)


async def test_unicode_prompt_round_trip(node_client):
    prompt = "Héllo wörld ☃ 𝄞"
    outer, opener = node_client.seal(chat_body(prompt))
    body = await (await node_client.post(CONFIDENTIAL_CHAT, outer)).json()
    assert _check_response(node_client, body, opener)["choices"][0]["message"]["content"] == prompt


async def test_unknown_paths_share_one_metrics_label(node_client):
    """Random paths must not mint a label each (unbounded metric cardinality)."""
    for path in ("/nope-1", "/nope-2", "/v1/confidential/x"):
        response = await node_client.client.get(path)
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "NOT_FOUND"
        assert response.headers["X-Request-Id"]
    response = await node_client.client.get(CONFIDENTIAL_CHAT)
    assert response.status == 405
    text = await (await node_client.client.get("/metrics")).text()
    routes = {
        s.labels["route"]
        for f in text_string_to_metric_families(text)
        if f.name == "tee_node_requests"
        for s in f.samples
    }
    assert not any("nope" in r or r == "/v1/confidential/x" for r in routes), routes


def test_the_node_runs_on_uvloop_and_aiohttps_c_http_parser():
    """bench/server.py measured both (node/cli.py): a build without them still works, slower."""
    import uvloop
    from aiohttp import _http_parser, http_parser

    from node.cli import _event_loop

    loop = _event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert http_parser.HttpRequestParser is _http_parser.HttpRequestParser, (
        "aiohttp runs its pure-Python HTTP parser: AIOHTTP_NO_EXTENSIONS is set or its C extension is missing"
    )
