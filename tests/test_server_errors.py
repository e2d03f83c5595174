"""Every row of the protocol's error table over HTTP: status, code, a body with no secrets, and
afterwards a good request still succeeds on the same app."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from server_support import (
    CONFIDENTIAL_CHAT,
    CONFIDENTIAL_COMPLETIONS,
    CONFIDENTIAL_EMBEDDINGS,
    MODEL,
    SSE,
    GatedEcho,
    RaisingEcho,
    chat_body,
    compact,
    wait_for,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from node.crypto import b64d, b64e, blake2b_256
from node.engine.base import ModelCard
from node.errors import MissingReceipt
from node.keys import Signer

TOKEN = "s3cret-token-for-tests"
TOKEN_SHA256 = hashlib.sha256(TOKEN.encode()).hexdigest()


def error_of(body: dict[str, Any]) -> dict[str, Any]:
    """The error object; the body has nothing else, and only fixed, public fields."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) <= {"code", "message", "node_dh_public_key", "key_epoch", "kem_public_key"}, error
    return error


async def expect_error(response, status: int, code: str) -> dict[str, Any]:
    text = await response.text()
    assert response.status == status, text
    assert response.headers["Content-Type"].startswith("application/json")
    error = error_of(json.loads(text))
    assert error["code"] == code, error
    return error


def flip(value: str, index: int = 0) -> str:
    data = bytearray(b64d(value))
    data[index] ^= 0x01
    return b64e(bytes(data))


def other_key() -> str:
    return b64e(X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def with_field(name: str, value: Any) -> Callable[[dict], dict]:
    return lambda outer: {**outer, name: value}


def without(name: str) -> Callable[[dict], dict]:
    return lambda outer: {k: v for k, v in outer.items() if k != name}


def b64_len(n: int) -> str:
    return b64e(bytes(range(n)))


REQUIRED = ["ciphertext", "client_dh_public_key", "model_name", "node_dh_public_key", "nonce", "plaintext_body_hash", "salt", "stack_small_id"]

# (id, mutation of the sealed outer JSON, status, code)
OUTER_CASES: list[tuple[str, Callable[[dict], dict], int, str]] = [
    *[(f"missing-{name}", without(name), 400, "INVALID_BODY") for name in REQUIRED],
    ("stack-id-string", with_field("stack_small_id", "0"), 400, "INVALID_BODY"),
    ("stack-id-negative", with_field("stack_small_id", -1), 400, "INVALID_BODY"),
    ("stack-id-float", with_field("stack_small_id", 1.5), 400, "INVALID_BODY"),
    ("stack-id-too-big", with_field("stack_small_id", 2**64), 400, "INVALID_BODY"),
    ("ciphertext-int", with_field("ciphertext", 123), 400, "INVALID_BODY"),
    ("model-name-null", with_field("model_name", None), 400, "INVALID_BODY"),
    ("stream-string", with_field("stream", "yes"), 400, "INVALID_BODY"),
    ("units-negative", with_field("num_compute_units", -1), 400, "INVALID_BODY"),
    ("salt-bad-alphabet", with_field("salt", "!!!!" * 6), 400, "INVALID_BODY"),
    ("salt-urlsafe", with_field("salt", base64.urlsafe_b64encode(b"\xfb\xff" * 8).decode()), 400, "INVALID_BODY"),
    ("salt-no-padding", with_field("salt", b64_len(16).rstrip("=")), 400, "INVALID_BODY"),
    ("salt-noncanonical-bits", with_field("salt", b64_len(16)[:-3] + "x=="), 400, "INVALID_BODY"),
    ("ciphertext-whitespace", lambda o: {**o, "ciphertext": o["ciphertext"][:4] + "\n" + o["ciphertext"][4:]}, 400, "INVALID_BODY"),
    ("salt-15-bytes", with_field("salt", b64_len(15)), 400, "INVALID_BODY"),
    ("nonce-16-bytes", with_field("nonce", b64_len(16)), 400, "INVALID_BODY"),
    ("client-key-31-bytes", with_field("client_dh_public_key", b64_len(31)), 400, "INVALID_BODY"),
    ("node-key-33-bytes", with_field("node_dh_public_key", b64_len(33)), 400, "INVALID_BODY"),
    ("hash-16-bytes", with_field("plaintext_body_hash", b64_len(16)), 400, "INVALID_BODY"),
    ("ciphertext-shorter-than-tag", with_field("ciphertext", b64_len(15)), 400, "INVALID_BODY"),
    ("tampered-ciphertext", lambda o: {**o, "ciphertext": flip(o["ciphertext"], 0)}, 400, "DECRYPTION_FAILED"),
    ("tampered-tag", lambda o: {**o, "ciphertext": flip(o["ciphertext"], -1)}, 400, "DECRYPTION_FAILED"),
    ("tampered-nonce", lambda o: {**o, "nonce": flip(o["nonce"], 3)}, 400, "DECRYPTION_FAILED"),
    ("tampered-salt", lambda o: {**o, "salt": flip(o["salt"], 5)}, 400, "DECRYPTION_FAILED"),
    ("other-client-key", lambda o: {**o, "client_dh_public_key": other_key()}, 400, "DECRYPTION_FAILED"),
    ("low-order-client-key", with_field("client_dh_public_key", b64e(bytes(32))), 400, "DECRYPTION_FAILED"),
    ("hash-mismatch", with_field("plaintext_body_hash", b64e(blake2b_256(b"something else"))), 400, "HASH_MISMATCH"),
    ("model-name-differs", with_field("model_name", "other-model"), 404, "MODEL_NOT_FOUND"),
    ("stale-node-key", lambda o: {**o, "node_dh_public_key": other_key()}, 422, "STALE_NODE_KEY"),
    # the order of checks: outer schema and base64 first, then the key, then decryption, then the hash
    ("order-base64-before-key", lambda o: {**o, "node_dh_public_key": other_key(), "salt": "!!"}, 400, "INVALID_BODY"),
    ("order-key-before-decrypt", lambda o: {**o, "node_dh_public_key": other_key(), "ciphertext": flip(o["ciphertext"])}, 422, "STALE_NODE_KEY"),
    ("order-decrypt-before-hash", lambda o: {**o, "ciphertext": flip(o["ciphertext"]), "plaintext_body_hash": b64e(bytes(32))}, 400, "DECRYPTION_FAILED"),
]


@pytest.mark.parametrize(("mutate", "status", "code"), [c[1:] for c in OUTER_CASES], ids=[c[0] for c in OUTER_CASES])
async def test_outer_errors(node_client, mutate, status, code):
    outer, _ = node_client.seal(chat_body("error table row"))
    error = await expect_error(await node_client.post(CONFIDENTIAL_CHAT, mutate(outer)), status, code)
    if code == "STALE_NODE_KEY":
        assert b64d(error["node_dh_public_key"]) == node_client.current_key
        assert error["key_epoch"] == node_client.state.keyring.current.epoch
        assert b64d(error["kem_public_key"]) == node_client.state.keyring.current.kem_public_key
    await node_client.chat_ok()


RAW_BODIES = [
    ("truncated-json", b'{"ciphertext": '),
    ("not-json", b"hello"),
    ("empty", b""),
    ("json-array", b"[1, 2]"),
    ("json-string", b'"x"'),
    ("invalid-utf8", b'{"ciphertext": "\xff"}'),
]


@pytest.mark.parametrize("body", [b for _, b in RAW_BODIES], ids=[i for i, _ in RAW_BODIES])
@pytest.mark.parametrize("path", [CONFIDENTIAL_CHAT, CONFIDENTIAL_COMPLETIONS, CONFIDENTIAL_EMBEDDINGS])
async def test_malformed_outer_json(node_client, path, body):
    await expect_error(await node_client.post(path, body), 400, "INVALID_BODY")
    await node_client.chat_ok()


# (id, path, plaintext bytes or dict, model_name, status, code)
PLAINTEXT_CASES = [
    ("not-json", CONFIDENTIAL_CHAT, b"not json at all", MODEL, 400, "INVALID_BODY"),
    ("json-array", CONFIDENTIAL_CHAT, b"[1,2,3]", MODEL, 400, "INVALID_BODY"),
    ("no-messages", CONFIDENTIAL_CHAT, {"model": MODEL}, MODEL, 400, "INVALID_BODY"),
    ("empty-messages", CONFIDENTIAL_CHAT, {"model": MODEL, "messages": []}, MODEL, 400, "INVALID_BODY"),
    ("message-without-role", CONFIDENTIAL_CHAT, {"model": MODEL, "messages": [{"content": "x"}]}, MODEL, 400, "INVALID_BODY"),
    ("max-tokens-zero", CONFIDENTIAL_CHAT, chat_body("x", max_tokens=0), MODEL, 400, "INVALID_BODY"),
    ("no-model", CONFIDENTIAL_CHAT, {"messages": [{"role": "user", "content": "x"}]}, MODEL, 400, "INVALID_BODY"),
    ("chat-body-on-completions", CONFIDENTIAL_COMPLETIONS, chat_body("x"), MODEL, 400, "INVALID_BODY"),
    ("chat-body-on-embeddings", CONFIDENTIAL_EMBEDDINGS, chat_body("x"), MODEL, 400, "INVALID_BODY"),
    ("unknown-model", CONFIDENTIAL_CHAT, chat_body("x", model="no-such-model"), "no-such-model", 404, "MODEL_NOT_FOUND"),
    ("plaintext-model-differs", CONFIDENTIAL_CHAT, chat_body("x", model="no-such-model"), MODEL, 404, "MODEL_NOT_FOUND"),
    ("unknown-model-embeddings", CONFIDENTIAL_EMBEDDINGS, {"model": "nope", "input": "x"}, "nope", 404, "MODEL_NOT_FOUND"),
    # the plaintext is parsed before the model is checked
    ("invalid-before-model", CONFIDENTIAL_CHAT, {"model": "nope"}, "nope", 400, "INVALID_BODY"),
]


@pytest.mark.parametrize(
    ("path", "plaintext", "model_name", "status", "code"), [c[1:] for c in PLAINTEXT_CASES], ids=[c[0] for c in PLAINTEXT_CASES]
)
async def test_plaintext_errors(node_client, path, plaintext, model_name, status, code):
    outer, _ = node_client.seal(plaintext, model_name=model_name)
    await expect_error(await node_client.post(path, outer), status, code)
    await node_client.chat_ok()


async def test_model_name_differs_between_two_served_models(make_node):
    engine = GatedEcho([ModelCard(MODEL, frozenset({"chat"})), ModelCard("second", frozenset({"chat", "embeddings"}))])
    node = await make_node(engine, config={"engine": {"models": [{"name": MODEL, "source": "echo"}, {"name": "second", "source": "echo"}]}})
    outer, _ = node.seal(chat_body("x", model="second"), model_name=MODEL)
    await expect_error(await node.post(CONFIDENTIAL_CHAT, outer), 404, "MODEL_NOT_FOUND")
    # a served model without the endpoint's task is not found either
    outer, _ = node.seal({"model": MODEL, "input": "x"})
    await expect_error(await node.post(CONFIDENTIAL_EMBEDDINGS, outer), 404, "MODEL_NOT_FOUND")
    await node.chat_ok()


async def test_lock_errors(node_client):
    await expect_error(await node_client.client.post("/v1/nodes/lock", json={"model": "no-such-model"}), 404, "MODEL_NOT_FOUND")
    await expect_error(await node_client.client.post("/v1/nodes/lock", data=b"{"), 400, "INVALID_BODY")
    await expect_error(await node_client.client.post("/v1/nodes/lock", json={"max_num_tokens": 3}), 400, "INVALID_BODY")
    await expect_error(await node_client.client.post("/v1/nodes/lock", json={"model": 3}), 400, "INVALID_BODY")
    response = await node_client.client.post("/v1/nodes/lock", json={"model": MODEL})
    assert response.status == 200
    await node_client.chat_ok()


async def test_decryption_failure_does_not_burn_the_replay_identity(node_client):
    """A forged request with a real request's (client key, salt, nonce) cannot pre-empt it."""
    outer, opener = node_client.seal(chat_body("first come"))
    await expect_error(await node_client.post(CONFIDENTIAL_CHAT, {**outer, "ciphertext": flip(outer["ciphertext"])}), 400, "DECRYPTION_FAILED")
    await expect_error(await node_client.post(CONFIDENTIAL_CHAT, {**outer, "plaintext_body_hash": b64e(bytes(32))}), 400, "HASH_MISMATCH")
    response = await node_client.post(CONFIDENTIAL_CHAT, outer)
    assert response.status == 200
    opener.open_response(await response.json())


async def test_replayed_request(node_client):
    outer, opener = node_client.seal(chat_body("only once"))
    first = await node_client.post(CONFIDENTIAL_CHAT, outer)
    assert first.status == 200
    opener.open_response(await first.json())
    await expect_error(await node_client.post(CONFIDENTIAL_CHAT, outer), 409, "REPLAYED_REQUEST")
    # the same identity with a different outer field (stream flag, stack id) is still a replay
    await expect_error(await node_client.post(CONFIDENTIAL_CHAT, {**outer, "stack_small_id": 9, "stream": None}), 409, "REPLAYED_REQUEST")
    await node_client.chat_ok()


async def test_body_too_large(make_node):
    node = await make_node(limits={"max_body_bytes": 1024})
    outer, _ = node.seal(chat_body("word " * 400))
    assert len(compact(outer)) > 1024
    await expect_error(await node.post(CONFIDENTIAL_CHAT, outer), 413, "BODY_TOO_LARGE")

    async def chunked():  # no Content-Length: the limit applies while reading
        data = compact(outer)
        for i in range(0, len(data), 256):
            yield data[i : i + 256]

    response = await node.client.post(CONFIDENTIAL_CHAT, data=chunked(), headers={"Content-Type": "application/json"})
    await expect_error(response, 413, "BODY_TOO_LARGE")
    await expect_error(await node.client.post("/v1/nodes/lock", data=b"x" * 2048), 413, "BODY_TOO_LARGE")
    await node.chat_ok("small enough")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer "}],
    ids=["missing", "wrong-token", "no-scheme", "basic-scheme", "empty-bearer"],
)
async def test_unauthorized(make_node, headers):
    node = await make_node(auth={"api_token_sha256": [TOKEN_SHA256]})
    outer, _ = node.seal(chat_body("needs a token"))
    await expect_error(await node.post(CONFIDENTIAL_CHAT, outer, headers), 401, "UNAUTHORIZED")
    await expect_error(await node.client.post("/v1/nodes/lock", json={"model": MODEL}, headers=headers), 401, "UNAUTHORIZED")
    good = {"Authorization": f"Bearer {TOKEN}"}
    # the refused request was not consumed: it goes through with the token
    response = await node.post(CONFIDENTIAL_CHAT, outer, good)
    assert response.status == 200
    lock = await node.client.post("/v1/nodes/lock", json={"model": MODEL}, headers=good)
    assert lock.status == 200
    await node.chat_ok(headers={"authorization": f"bearer {TOKEN}"})


PROXY = Signer.generate()
UNTRUSTED = Signer.generate()


def _sig_missing(outer):
    return {}


def _sig_garbage(outer):
    return {"X-Signature": "not base64 !"}


def _sig_untrusted(outer):
    return {"X-Signature": UNTRUSTED.sign_b64(b64d(outer["plaintext_body_hash"]))}


def _sig_other_message(outer):
    return {"X-Signature": PROXY.sign_b64(blake2b_256(b"another request"))}


def _sig_bad_flag(outer):
    raw = bytearray(PROXY.sign(b64d(outer["plaintext_body_hash"])))
    raw[0] = 0x01
    return {"X-Signature": b64e(bytes(raw))}


def _sig_truncated(outer):
    return {"X-Signature": b64e(PROXY.sign(b64d(outer["plaintext_body_hash"]))[:-1])}


@pytest.mark.parametrize(
    "make_headers",
    [_sig_missing, _sig_garbage, _sig_untrusted, _sig_other_message, _sig_bad_flag, _sig_truncated],
    ids=["missing", "garbage", "untrusted-key", "other-message", "bad-flag", "truncated"],
)
async def test_invalid_signature(make_node, make_headers):
    node = await make_node(auth={"trusted_proxy_keys": [PROXY.public_key_b64]})
    outer, opener = node.seal(chat_body("signed by the proxy"))
    await expect_error(await node.post(CONFIDENTIAL_CHAT, outer, make_headers(outer)), 401, "INVALID_SIGNATURE")
    # the same request, validly signed by the trusted proxy, succeeds
    valid = {"X-Signature": PROXY.sign_b64(b64d(outer["plaintext_body_hash"]))}
    response = await node.post(CONFIDENTIAL_CHAT, outer, valid)
    assert response.status == 200
    assert json.loads(opener.open_response(await response.json()))["choices"][0]["message"]["content"] == "signed by the proxy"


async def test_signature_ignored_without_trusted_keys(node_client):
    outer, _ = node_client.seal(chat_body("no proxy configured"))
    response = await node_client.post(CONFIDENTIAL_CHAT, outer, {"X-Signature": "garbage"})
    assert response.status == 200


async def test_overloaded_with_retry_after(make_node):
    engine = GatedEcho()
    node = await make_node(engine, limits={"max_in_flight": 1, "max_queue": 0, "retry_after": 7})
    engine.gate.clear()
    outer, opener = node.seal(chat_body("slow stream holds the slot", stream=True))
    first = await node.post(CONFIDENTIAL_CHAT, outer)  # headers sent: the slot is held
    assert first.status == 200
    second, _ = node.seal(chat_body("no room"))
    response = await node.post(CONFIDENTIAL_CHAT, second)
    await expect_error(response, 429, "OVERLOADED")
    assert response.headers["Retry-After"] == "7"
    engine.gate.set()
    sse = SSE.parse(await first.read())
    for event in sse.events:
        opener.open_event(event)
    opener.finish()
    # the refused request was not consumed either
    response = await node.post(CONFIDENTIAL_CHAT, second)
    assert response.status == 200
    await node.chat_ok()


async def test_overloaded_queue_full_and_queue_timeout(make_node):
    engine = GatedEcho()
    node = await make_node(engine, limits={"max_in_flight": 1, "max_queue": 1, "queue_timeout": 0.3})
    engine.gate.clear()
    holder, _ = node.seal(chat_body("holder", stream=True))
    first = await node.post(CONFIDENTIAL_CHAT, holder)
    assert first.status == 200
    queued_outer, _ = node.seal(chat_body("queued"))
    queued = asyncio.ensure_future(node.post(CONFIDENTIAL_CHAT, queued_outer))
    await wait_for(lambda: node.state.admission.queued == 1, what="a queued request")
    third, _ = node.seal(chat_body("queue full"))
    await expect_error(await node.post(CONFIDENTIAL_CHAT, third), 429, "OVERLOADED")
    response = await queued  # times out in the queue
    await expect_error(response, 429, "OVERLOADED")
    assert response.headers["Retry-After"] == "1"
    assert node.state.admission.queued == 0
    engine.gate.set()
    await first.read()
    await wait_for(lambda: node.state.admission.in_flight == 0, what="slot released")
    await node.chat_ok()


async def test_not_ready_until_engine_started(make_node):
    engine = GatedEcho()
    engine.start_gate.clear()
    node = await make_node(engine, wait_ready=False)
    assert (await node.client.get("/health")).status == 200
    await expect_error(await node.client.get("/ready"), 503, "NOT_READY")
    outer, _ = node.seal(chat_body("too early"))
    await expect_error(await node.post(CONFIDENTIAL_CHAT, outer), 503, "NOT_READY")
    engine.start_gate.set()
    await wait_for(lambda: engine.ready, what="engine ready")
    assert (await node.client.get("/ready")).status == 200
    # NOT_READY is decided before decryption: the same request now succeeds
    assert (await node.post(CONFIDENTIAL_CHAT, outer)).status == 200
    await node.chat_ok()


async def test_not_ready_when_engine_stopped(node_client):
    await node_client.engine.stop()
    await expect_error(await node_client.client.get("/ready"), 503, "NOT_READY")
    outer, _ = node_client.seal(chat_body("engine is down"))
    await expect_error(await node_client.post(CONFIDENTIAL_CHAT, outer), 503, "NOT_READY")
    await node_client.engine.start()
    await node_client.chat_ok()


async def test_internal_error_has_no_detail(make_node):
    prompt = "zebra-quartz-7781 secret words"
    engine = RaisingEcho(RuntimeError(f"engine exploded on {prompt}"))
    node = await make_node(engine)
    outer, _ = node.seal(chat_body(prompt))
    error = await expect_error(await node.post(CONFIDENTIAL_CHAT, outer), 500, "INTERNAL_ERROR")
    assert error == {"code": "INTERNAL_ERROR", "message": "internal error"}
    engine.fail = False
    await node.chat_ok()


async def test_internal_error_mid_stream_ends_with_error_event(make_node):
    """An unexpected engine exception after the headers went out ends the stream with the
    content-free error event, not a second HTTP response inside the body."""
    engine = RaisingEcho(RuntimeError("unexpected"))
    engine.fail_in_stream = True
    node = await make_node(engine)
    outer, opener = node.seal(chat_body("alpha beta gamma", stream=True))
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    assert response.status == 200
    sse = SSE.parse(await response.read())
    *events, last = sse.events
    assert len(events) == 1
    opener.open_event(events[0])
    assert last == {"error": {"code": "INTERNAL_ERROR", "message": "engine failed"}}
    with pytest.raises(MissingReceipt):
        opener.finish()
    engine.fail = False
    await node.chat_ok()
