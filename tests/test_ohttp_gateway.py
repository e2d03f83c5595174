"""The node's Oblivious HTTP gateway in-process: keys and their epochs, dispatch of every route
as if direct (auth, admission and rate limits included) with no address in sight, streamed
answers leaving chunk by chunk, the documented refusals (and the node serving on), and
hypothesis fuzzing of decapsulation over HTTP (never a 500, never a hang)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import ServerThread, node_config
from server_support import CONFIDENTIAL_CHAT, MODEL, chat_body, echo_config, echo_engine, seal_with_secrets

import ohttp_reference as ref
from node.crypto import b64d
from node.server import create_app
from node.server.ohttp import RELAYED
from node.server.state import NODE

REQ, CHUNKED_REQ = "message/ohttp-req", "message/ohttp-chunked-req"


async def _ready(client) -> None:
    for _ in range(200):
        if (await client.get("/ready")).status == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("node not ready")


async def _config(client, index: int = 0) -> ref.Config:
    response = await client.get("/v1/ohttp/keys")
    assert response.status == 200 and response.content_type == "application/ohttp-keys"
    return ref.parse_key_configs(await response.read())[index]


async def _call(client, config, method, path, body=None, headers=(), chunked=False) -> ref.Answer:
    exchange = ref.Exchange(config, chunked=chunked)
    fields = list(headers) + ([("content-type", "application/json")] if body is not None else [])
    outer = exchange.request(ref.encode_request(method, path, fields, orjson.dumps(body) if body is not None else b""))
    response = await client.post("/v1/ohttp", data=outer, headers={"Content-Type": CHUNKED_REQ if chunked else REQ})
    assert response.status == 200, await response.text()
    raw = await response.read()
    return ref.decode_response(b"".join(exchange.open_chunks([raw])) if chunked else exchange.open(raw))


async def test_every_route_is_dispatched_as_if_direct(aiohttp_client) -> None:
    token = "s3cret-token"
    config = echo_config(auth={"api_token_sha256": [hashlib.sha256(token.encode()).hexdigest()]}, allow_plaintext=True)
    client = await aiohttp_client(create_app(config, echo_engine()))
    await _ready(client)
    key = await _config(client)
    bearer = [("authorization", f"Bearer {token}")]
    assert (await _call(client, key, "GET", "/health")).status == 200
    assert (await _call(client, key, "GET", "/ready")).status == 200
    assert (await _call(client, key, "GET", "/v1/models")).status == 401  # the inner request's own auth
    models = await _call(client, key, "GET", "/v1/models", headers=bearer, chunked=True)
    assert models.status == 200 and json.loads(models.content)["data"][0]["id"] == MODEL
    assert (await _call(client, key, "GET", "/openapi.json")).status == 200
    assert (await _call(client, key, "GET", "/no/such/path")).status == 404
    assert (await _call(client, key, "DELETE", "/v1/models")).status == 405
    framing = [("expect", "100-continue"), ("transfer-encoding", "chunked"), ("content-length", "1"), ("connection", "close")]
    plain = await _call(client, key, "POST", "/v1/chat/completions", chat_body("plain words"), headers=bearer + framing, chunked=True)
    assert json.loads(plain.content)["choices"][0]["message"]["content"] == "plain words"
    lock = await _call(client, key, "POST", "/v1/nodes/lock", {"model": MODEL}, headers=bearer)
    node_key = b64d(json.loads(lock.content)["public_key"])
    sealed = seal_with_secrets(orjson.dumps(chat_body("sealed words")), node_key, MODEL)
    answer = await _call(client, key, "POST", CONFIDENTIAL_CHAT, sealed.outer, headers=bearer)
    assert json.loads(sealed.opener.open_response(json.loads(answer.content)))["choices"][0]["message"]["content"] == "sealed words"
    # The same sealed request again: the replay cache sees it, as for a direct request.
    assert (await _call(client, key, "POST", CONFIDENTIAL_CHAT, sealed.outer, headers=bearer)).status == 409
    # Attestation: rate-limited per client like a direct request, and an anonymous relayed
    # request is counted as "relayed", never under an address.
    nonce = os.urandom(32).hex()
    document = json.loads((await _call(client, key, "GET", f"/v1/attestation?nonce={nonce}")).content)
    assert b64d(document["public_keys"]["ohttp"]) == await (await client.get("/v1/ohttp/keys")).read()
    state = client.server.app[NODE]
    assert list(state.attestation.rate_limit._clients) == [f"address:{RELAYED}"]


async def test_streams_leave_one_sealed_chunk_per_event(aiohttp_client) -> None:
    client = await aiohttp_client(create_app(echo_config(allow_plaintext=True), echo_engine(token_delay=0.05)))
    await _ready(client)
    config = await _config(client)
    exchange = ref.Exchange(config, chunked=True)
    body = orjson.dumps(chat_body("one two three four", stream=True))
    outer = exchange.request(ref.encode_request("POST", "/v1/chat/completions", [("content-type", "application/json")], body))
    response = await client.post("/v1/ohttp", data=outer, headers={"Content-Type": CHUNKED_REQ})
    assert response.status == 200 and response.headers["Content-Type"] == "message/ohttp-chunked-res"
    pieces = []
    async for piece in response.content.iter_any():  # each arrives as its own network read
        pieces.append(piece)
    chunks = exchange.open_chunks(pieces)
    events = [c for c in chunks if b"data: " in c]
    assert len(pieces) >= 4 and len(events) >= 4  # tokens 50 ms apart: one chunk each, not one at the end
    answer = ref.decode_response(b"".join(chunks))
    assert answer.content.endswith(b"data: [DONE]\n\n")


async def test_refusals_have_their_documented_answers_and_the_node_serves_on(aiohttp_client) -> None:
    client = await aiohttp_client(create_app(echo_config(limits={"max_body_bytes": 64 * 1024}), echo_engine()))
    await _ready(client)
    config = await _config(client)
    good = ref.Exchange(config).request(ref.encode_request("GET", "/health", []))

    wrong_type = await client.post("/v1/ohttp", data=good, headers={"Content-Type": "application/octet-stream"})
    assert wrong_type.status == 415 and (await wrong_type.json())["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    too_big = await client.post("/v1/ohttp", data=good + bytes(64 * 1024), headers={"Content-Type": REQ})
    assert too_big.status == 413 and (await too_big.json())["error"]["code"] == "BODY_TOO_LARGE"

    bodies = {}
    for name, index in (("encapsulated key", 10), ("ciphertext", 45), ("tag", len(good) - 1)):
        tampered = bytearray(good)
        tampered[index] ^= 0x01
        response = await client.post("/v1/ohttp", data=bytes(tampered), headers={"Content-Type": REQ})
        assert response.status == 400 and response.content_type == "application/problem+json", name
        bodies[name] = await response.read()
    truncated = await client.post("/v1/ohttp", data=good[:20], headers={"Content-Type": REQ})
    bodies["truncated"] = await truncated.read()
    assert len(set(bodies.values())) == 1  # one answer, whatever part failed
    assert json.loads(bodies["tag"])["error"]["code"] == "OHTTP_DECAPSULATION_FAILED"

    unknown = bytearray(good)
    unknown[0] ^= 0xFF
    response = await client.post("/v1/ohttp", data=bytes(unknown), headers={"Content-Type": REQ})
    problem = await response.json(content_type="application/problem+json")
    assert response.status == 400 and problem["type"] == "https://iana.org/assignments/http-problem-types#ohttp-key"
    assert problem["error"]["code"] == "OHTTP_KEY_UNKNOWN"

    # A request that decapsulates but is no Binary HTTP request for a path here: an encapsulated 400.
    nested = ref.encode_request("POST", "/v1/ohttp", [("content-type", REQ)], good)  # OHTTP inside OHTTP: refused
    for bad in (b"\x05junk", ref.encode_request("GET", "//elsewhere.example/x", []), ref.encode_request("GET", "*", []), nested):
        exchange = ref.Exchange(config)
        response = await client.post("/v1/ohttp", data=exchange.request(bad), headers={"Content-Type": REQ})
        inner = ref.decode_response(exchange.open(await response.read()))
        assert inner.status == 400 and json.loads(inner.content)["error"]["code"] == "INVALID_BODY"

    assert (await _call(client, config, "GET", "/health")).status == 200


async def test_keys_follow_the_envelope_epochs(aiohttp_client) -> None:
    client = await aiohttp_client(create_app(echo_config(keys={"overlap": 60}), echo_engine()))
    await _ready(client)
    state = client.server.app[NODE]
    first = await _config(client)
    assert first.key_id == state.keyring.current.epoch % 256 and (0x0001, 0x0003) in first.suites
    state.keyring.rotate()
    current, previous = await _config(client, 0), await _config(client, 1)
    assert previous.public_key == first.public_key and current.key_id != first.key_id
    assert (await _call(client, first, "GET", "/health")).status == 200  # still live during the overlap
    state.keyring.rotate()  # the first epoch leaves the ring
    body = ref.Exchange(first).request(ref.encode_request("GET", "/health", []))
    response = await client.post("/v1/ohttp", data=body, headers={"Content-Type": REQ})
    assert response.status == 400 and (await response.json(content_type=None))["error"]["code"] == "OHTTP_KEY_UNKNOWN"


@pytest.fixture(scope="module")
def node():
    with ServerThread(node_config(limits={"max_body_bytes": 256 * 1024})) as server:
        yield server


FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=st.data())
def test_fuzz_decapsulation_over_http(node, data) -> None:
    status, raw = node.get("/v1/ohttp/keys")
    config = ref.parse_key_configs(raw)[0]
    chunked = data.draw(st.booleans())
    good = ref.Exchange(config, chunked=chunked).request(ref.encode_request("GET", "/health", []))
    mutation = data.draw(st.sampled_from(["flip", "cut", "noise", "splice"]))
    if mutation == "flip":
        body = bytearray(good)
        for index in data.draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=4)):
            body[index] ^= data.draw(st.integers(1, 255))
        body = bytes(body)
    elif mutation == "cut":
        body = good[: data.draw(st.integers(0, len(good) - 1))]
    elif mutation == "noise":
        body = data.draw(st.binary(max_size=400))
    else:
        body = good[:39] + data.draw(st.binary(max_size=200))
    status, headers, answer = node.post("/v1/ohttp", body, {"Content-Type": CHUNKED_REQ if chunked else REQ}, timeout=10)
    assert status in (200, 400), (status, answer[:200])
    if status == 400:
        assert headers["content-type"].startswith("application/problem+json")
        assert json.loads(answer)["error"]["code"] in ("OHTTP_DECAPSULATION_FAILED", "OHTTP_KEY_UNKNOWN")
    assert node.get("/health")[0] == 200


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~", min_size=1, max_size=12)
_PATHS = st.sampled_from(["/health", "/v1/models", "/v1/attestation", "/v1/nodes/lock", "/v1/confidential/chat/completions", "/v1/ohttp/keys", "/metrics"]) | st.text(
    alphabet="".join(chr(c) for c in range(0x21, 0x7F)), max_size=40
).map(lambda tail: "/" + tail)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE"]) | _TOKEN.map(str.upper),
    path=_PATHS,
    headers=st.lists(st.tuples(_TOKEN, st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ;=/-", max_size=20).map(str.strip)), max_size=5),
    content=st.binary(max_size=300) | st.just(b'{"model":"echo-model"}'),
    chunked=st.booleans(),
    raw=st.none() | st.binary(max_size=120),
)
def test_fuzz_inner_requests_never_fail_the_node(node, method, path, headers, content, chunked, raw) -> None:
    """Well encapsulated, anything inside: a Binary HTTP request for any method, path, fields
    and content (or raw bytes). The answer is always encapsulated, never a 500 inside or out."""
    status, keys = node.get("/v1/ohttp/keys")
    exchange = ref.Exchange(ref.parse_key_configs(keys)[0], chunked=chunked)
    inner = raw if raw is not None else ref.encode_request(method, path, headers, content)
    status, _, answer = node.post("/v1/ohttp", exchange.request(inner), {"Content-Type": CHUNKED_REQ if chunked else REQ}, timeout=10)
    assert status == 200, answer[:200]
    opened = ref.decode_response(b"".join(exchange.open_chunks([answer])) if chunked else exchange.open(answer))
    assert opened.status != 500 and opened.status < 600, (method, path, opened.status)
    assert node.get("/health")[0] == 200
