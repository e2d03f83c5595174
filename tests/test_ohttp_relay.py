"""Three processes on loopback: a client written from the RFCs (tests/ohttp_reference.py, none
of the node's OHTTP code) → `tee-node relay` → `tee-node serve --engine echo`. Models,
attestation, the lock, a confidential chat (whole and streamed) and embeddings round-trip; the
node's log for them shows no client address; the relay's upstream sees no client header."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from server_support import (
    CONFIDENTIAL_CHAT,
    CONFIDENTIAL_EMBEDDINGS,
    MODEL,
    TEE_NODE,
    NodeProcess,
    chat_body,
    embedding_body,
    free_port,
    http_get,
    seal_with_secrets,
    spawn_node,
)

import ohttp_reference as ref
from node.crypto import b64d
from node.relay import RelaySettings, create_relay_app

REQ, CHUNKED_REQ = "message/ohttp-req", "message/ohttp-chunked-req"


def spawn_relay(gateway: str, *extra: str) -> NodeProcess:
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="tee-node-relay-", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")}
    proc = subprocess.Popen(
        [str(TEE_NODE), "relay", "--gateway", gateway, "--port", str(port), *extra],
        stdout=log_file, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    log_file.close()
    relay = NodeProcess(proc, port, Path(log_file.name))
    deadline = time.monotonic() + 30
    while True:
        try:
            if http_get(relay.url + "/", timeout=1)[0] == 405:  # up: it answers GET with 405
                return relay
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            relay.stop()
            raise RuntimeError(f"relay did not start:\n{relay.log()}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def three() -> Iterator[tuple[NodeProcess, NodeProcess]]:
    node = spawn_node(env={"TEE_NODE_LOG_LEVEL": "DEBUG"})
    relay = None
    try:
        relay = spawn_relay(node.url + "/v1/ohttp")
        yield node, relay
    finally:
        if relay is not None:
            relay.stop()
        node.stop()


async def relayed(
    session: aiohttp.ClientSession, relay: str, config: ref.Config, method: str, path: str,
    body: object = None, chunked: bool = False, aead: int = 0x0001,
) -> tuple[ref.Answer, list[bytes]]:  # fmt: skip
    """One request through the relay; the answer and, chunked, each piece as it arrived."""
    exchange = ref.Exchange(config, aead=aead, chunked=chunked)
    headers = [("content-type", "application/json")] if body is not None else []
    content = orjson.dumps(body) if body is not None else b""
    outer = exchange.request(ref.encode_request(method, path, headers, content))
    async with session.post(relay + "/anything", data=outer, headers={"Content-Type": CHUNKED_REQ if chunked else REQ}) as response:
        assert response.status == 200, await response.text()
        if not chunked:
            assert response.content_type == "message/ohttp-res"
            return ref.decode_response(exchange.open(await response.read())), []
        assert response.content_type == "message/ohttp-chunked-res"
        pieces = [piece async for piece in response.content.iter_any()]
    chunks = exchange.open_chunks(pieces)
    return ref.decode_response(b"".join(chunks)), chunks


async def test_round_trips_through_the_relay(three) -> None:
    node, relay = three
    async with aiohttp.ClientSession() as session:
        async with session.get(relay.url + "/v1/ohttp/keys") as response:  # the relay fetches them from the gateway
            assert response.content_type == "application/ohttp-keys"
            keys = await response.read()
        (config,) = ref.parse_key_configs(keys)

        models, _ = await relayed(session, relay.url, config, "GET", "/v1/models")
        assert models.status == 200 and json.loads(models.content)["data"][0]["id"] == MODEL

        nonce = os.urandom(32).hex()
        attested, _ = await relayed(session, relay.url, config, "GET", f"/v1/attestation?nonce={nonce}", aead=0x0003)
        document = json.loads(attested.content)
        assert attested.status == 200 and document["nonce"] == nonce
        assert b64d(document["public_keys"]["ohttp"]) == keys  # the key configuration is attested

        lock, _ = await relayed(session, relay.url, config, "POST", "/v1/nodes/lock", {"model": MODEL})
        node_key = b64d(json.loads(lock.content)["public_key"])

        prompt = "Oblivious llamas graze unseen"
        sealed = seal_with_secrets(orjson.dumps(chat_body(prompt)), node_key, MODEL)
        answer, _ = await relayed(session, relay.url, config, "POST", CONFIDENTIAL_CHAT, sealed.outer)
        assert answer.status == 200
        plain = json.loads(sealed.opener.open_response(json.loads(answer.content)))
        assert plain["choices"][0]["message"]["content"] == prompt

        sealed = seal_with_secrets(orjson.dumps(chat_body(prompt, stream=True)), node_key, MODEL, stream=True)
        answer, chunks = await relayed(session, relay.url, config, "POST", CONFIDENTIAL_CHAT, sealed.outer, chunked=True)
        assert answer.status == 200 and answer.headers["content-type"] == "text/event-stream"
        events = [json.loads(block[len("data: "):]) for block in answer.content.decode().split("\n\n") if block.startswith("data: ")]
        words = []
        for event in events:
            chunk = json.loads(sealed.opener.open_event(event))
            words += [c["delta"].get("content", "") for c in chunk["choices"]]
        sealed.opener.finish()
        assert "".join(words).strip() == prompt
        # Sealed OHTTP chunks: the head, the node's writes of events (a write carries the events
        # ready by then), the end. tests/test_ohttp_gateway.py shows one event leaving at a time.
        assert len(chunks) >= 3 and chunks[-1] == b"\x00\x00"

        sealed = seal_with_secrets(orjson.dumps(embedding_body("llamas")), node_key, MODEL)
        answer, _ = await relayed(session, relay.url, config, "POST", CONFIDENTIAL_EMBEDDINGS, sealed.outer)
        assert answer.status == 200
        assert json.loads(sealed.opener.open_response(json.loads(answer.content)))["data"][0]["embedding"]

    # The node logged these requests (DEBUG included) without any address: only the relay's
    # connections reached it, and even those are not named.
    log = node.log()
    assert "route=/v1/confidential/chat/completions" in log and "route=/v1/ohttp" in log
    assert "127.0.0.1" not in log.replace(f"http://127.0.0.1:{node.port}", "")
    assert "127.0.0.1" not in relay.log().replace(node.url, "").replace(f"127.0.0.1:{relay.port}", "")


async def test_relay_forwards_no_client_header(aiohttp_client) -> None:
    seen: list[dict[str, str]] = []

    async def gateway(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(body=b"sealed", content_type="message/ohttp-res")

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/ohttp", gateway)
    upstream = await aiohttp_client(upstream_app)
    relay = await aiohttp_client(create_relay_app(RelaySettings(gateway=str(upstream.make_url("/v1/ohttp")))))
    identifying = {
        "User-Agent": "curl/8.0 (Alice's laptop)", "Cookie": "session=alice", "Authorization": "Bearer alice",
        "X-Forwarded-For": "203.0.113.7", "Forwarded": "for=203.0.113.7", "Accept-Language": "fr-CH",
        "X-Request-Id": "alice-1", "Via": "1.1 alice",
    }  # fmt: skip
    response = await relay.post("/", data=b"x" * 100, headers={**identifying, "Content-Type": REQ})
    assert response.status == 200 and await response.read() == b"sealed"
    (headers,) = seen
    assert {name.lower() for name in headers} == {"host", "content-type", "content-length"}
    assert headers["Content-Type"] == REQ

    wrong = await relay.post("/", data=b"x", headers={"Content-Type": "application/json"})
    assert wrong.status == 415
    assert (await relay.get("/")).status == 405
    too_big = await relay.post("/", data=b"x" * (4 * 1024 * 1024 + 1), headers={"Content-Type": REQ})
    assert too_big.status == 413
    assert len(seen) == 1  # none of the refusals reached the gateway


async def test_relay_rate_limits_per_address(aiohttp_client) -> None:
    async def gateway(request: web.Request) -> web.Response:
        return web.Response(body=b"sealed", content_type="message/ohttp-res")

    upstream_app = web.Application()
    upstream_app.router.add_post("/", gateway)
    upstream = await aiohttp_client(upstream_app)
    relay = await aiohttp_client(create_relay_app(RelaySettings(gateway=str(upstream.make_url("/")), per_address_per_minute=3)))
    statuses = [(await relay.post("/", data=b"x", headers={"Content-Type": REQ})).status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]


# --- the project's own client through the relay ------------------------------------------------


async def test_client_through_the_relay(three) -> None:
    from node.client import ConfidentialClient

    node, relay = three
    before = node.log()
    async with ConfidentialClient(node.url, relay=relay.url, allow_simulated=True) as client:
        models = await client.models.list()
        assert models.data[0].id == MODEL
        assert client.key_exchange == "hybrid ML-KEM-768 + X25519"  # post-quantum inside, unchanged
        answer = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "unlinkable words"}])
        assert answer.choices[0].message.content == "unlinkable words" and answer.receipt.key_epoch == client.attestation.key_epoch
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "streamed unlinkable words"}], stream=True)
        text = "".join([choice.delta.content or "" async for chunk in stream for choice in chunk.choices])
        assert text == "streamed unlinkable words" and stream.receipt is not None
        embedded = await client.embeddings.create(model=MODEL, input="llamas")
        assert embedded.data[0].embedding and embedded.receipt is not None
    # Every one of these went through the relay: the node's log grew only by relayed requests.
    added = node.log()[len(before):]
    assert added.count("route=/v1/ohttp ") >= 5 and "route=/v1/attestation" in added


def test_cli_chat_through_the_relay(three) -> None:
    node, relay = three
    before = len(node.log())
    done = subprocess.run(
        [str(TEE_NODE), "chat", node.url, "hello through the relay", "--relay", relay.url, "--allow-simulated"],
        capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "hello through the relay" in done.stdout
    added = node.log()[before:]
    assert "route=/v1/confidential/chat/completions" in added and "route=/v1/ohttp" in added
    assert "127.0.0.1" not in added  # the access log of the relayed chat names no address
    attest = subprocess.run(
        [str(TEE_NODE), "attest", node.url, "--relay", relay.url, "--allow-simulated"],
        capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")},
    )  # fmt: skip
    assert attest.returncode == 0 and "attestation verified" in attest.stdout, attest.stderr


async def test_client_refuses_a_relay_that_hands_out_its_own_key(three, aiohttp_client) -> None:
    """A relay in the middle with its own gateway key: it can open what the client sends it
    (only the attestation request, before the check), and re-encapsulate to the node; the
    document it passes on binds the node's key, not the relay's, so the client stops there."""
    from attestation.errors import OhttpKeyMismatch
    from node.client import ConfidentialClient
    from node.ohttp.encapsulation import GatewayKey, RequestEncapsulator, decapsulate_request, decode_key_configs, encode_key_configs

    node, _ = three
    own = GatewayKey.generate(9)
    opened_paths = []

    async def keys(request: web.Request) -> web.Response:
        return web.Response(body=encode_key_configs([own.config]), content_type="application/ohttp-keys")

    async def forward(request: web.Request) -> web.Response:
        inner, responder = decapsulate_request(await request.read(), {9: own}.get)
        opened_paths.append(inner)
        async with aiohttp.ClientSession() as session:
            async with session.get(node.url + "/v1/ohttp/keys") as response:
                real = decode_key_configs(await response.read())[0]
            exchange = RequestEncapsulator(real, chunked=False)
            async with session.post(node.url + "/v1/ohttp", data=exchange.encapsulate(inner), headers={"Content-Type": REQ}) as response:
                answer = exchange.open_response(await response.read())
        return web.Response(body=responder.seal(answer), content_type="message/ohttp-res")

    app = web.Application()
    app.router.add_get("/v1/ohttp/keys", keys)
    app.router.add_post("/{path:.*}", forward)
    evil = await aiohttp_client(app)
    async with ConfidentialClient(node.url, relay=str(evil.make_url("")), allow_simulated=True, api_key="secret") as client:
        with pytest.raises(OhttpKeyMismatch):
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "never sent"}])
    assert len(opened_paths) == 1  # the attestation request, and nothing after it


async def test_client_refuses_answers_a_relay_tampered_with(three, aiohttp_client) -> None:
    """A relay that flips one byte of each answer once the client has attested: the whole
    answer, and a streamed one, fail to open (ResponseDecryptionFailed), never pass as data."""
    from node.client import ConfidentialClient
    from node.errors import ResponseDecryptionFailed

    node, relay = three
    tamper = {"on": False}

    async def keys(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as session, session.get(relay.url + "/v1/ohttp/keys") as response:
            return web.Response(body=await response.read(), content_type="application/ohttp-keys")

    async def forward(request: web.Request) -> web.StreamResponse:
        async with aiohttp.ClientSession() as session:
            async with session.post(relay.url + "/", data=await request.read(), headers={"Content-Type": request.content_type}) as response:
                body = bytearray(await response.read())
                if tamper["on"]:
                    body[len(body) // 2] ^= 0x01
                return web.Response(body=bytes(body), content_type=response.content_type)

    app = web.Application()
    app.router.add_get("/v1/ohttp/keys", keys)
    app.router.add_post("/{path:.*}", forward)
    evil = await aiohttp_client(app)
    async with ConfidentialClient(node.url, relay=str(evil.make_url("")), allow_simulated=True) as client:
        await client.attest()
        tamper["on"] = True
        with pytest.raises(ResponseDecryptionFailed):
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "whole"}])
        with pytest.raises(ResponseDecryptionFailed):
            stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "streamed"}], stream=True)
            async for _ in stream:
                pass


async def test_relay_pins_a_node_serving_attested_tls() -> None:
    """A node on attested TLS (self-signed): the relay pins its certificate; unpinned, it refuses
    to forward (502) and the client says the relay could not reach the gateway."""
    from node.client import APIConnectionError, ConfidentialClient

    node = spawn_node(extra_args=["--tls"])
    relays = []
    try:
        unverified = ssl.create_default_context()
        unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", node.port)) as raw:
            with unverified.wrap_socket(raw) as tls:
                certificate = tls.getpeercert(binary_form=True)
        pinned = spawn_relay(node.url + "/v1/ohttp", "--gateway-cert-sha256", hashlib.sha256(certificate).hexdigest())
        relays.append(pinned)
        async with ConfidentialClient(node.url, relay=pinned.url, allow_simulated=True) as client:
            answer = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "over attested TLS"}])
            assert answer.choices[0].message.content == "over attested TLS"
        unpinned = spawn_relay(node.url + "/v1/ohttp")
        relays.append(unpinned)
        async with ConfidentialClient(node.url, relay=unpinned.url, allow_simulated=True) as client:
            with pytest.raises(APIConnectionError):
                await client.attest()
    finally:
        for relay in relays:
            relay.stop()
        node.stop()
