"""Abuse limits: attestation rate limits per client under a global cap, tokens on /metrics and
/v1/models, the header-read timeout (slowloris), and the loopback-only upstream of real modes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import aiohttp
import pytest
from pydantic import ValidationError
from server_support import NodeTestServer, echo_config, echo_engine, wait_for

from node.cli import EXIT_CANNOT_START, main
from node.config import REPO_CONFIGS, is_local_upstream, load_config
from node.errors import Overloaded
from node.server import create_app
from node.server.admission import RateLimiter

TOKEN_A, TOKEN_B = "token-a", "token-b"
DIGESTS = [hashlib.sha256(t.encode()).hexdigest() for t in (TOKEN_A, TOKEN_B)]


# --- the limiter ------------------------------------------------------------------------------


def test_one_client_takes_its_share_only():
    limiter = RateLimiter(per_minute=10, per_client_per_minute=3)
    for _ in range(3):
        limiter.admit("a", now=0.0)
    with pytest.raises(Overloaded) as info:
        limiter.admit("a", now=0.0)
    assert info.value.retry_after == 21  # one token every 20 s
    for _ in range(3):
        limiter.admit("b", now=0.0)
    limiter.admit("a", now=20.0)  # refilled


def test_global_cap_holds_across_clients():
    limiter = RateLimiter(per_minute=4, per_client_per_minute=3)
    for client in "abcd":
        limiter.admit(client, now=0.0)
    with pytest.raises(Overloaded) as info:
        limiter.admit("e", now=0.0)
    assert info.value.retry_after == 16  # one token every 15 s
    # A refusal by the global cap costs the client nothing.
    limiter.admit("e", now=15.0)


def test_client_buckets_are_bounded():
    limiter = RateLimiter(per_minute=10_000, per_client_per_minute=1, max_clients=100)
    for i in range(1000):
        limiter.admit(f"client-{i}", now=0.0)
    assert len(limiter._clients) == 100


# --- the node ---------------------------------------------------------------------------------


async def start(**overrides) -> NodeTestServer:
    """A node on a real loopback socket (requests come from the addresses the test picks)."""
    engine = echo_engine()
    server = NodeTestServer(create_app(echo_config(**overrides), engine), host="127.0.0.1")
    await server.start_server()
    await wait_for(lambda: engine.ready, what="engine ready")
    return server


async def attest(session: aiohttp.ClientSession, url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(f"{url}/v1/attestation", params={"nonce": os.urandom(32).hex()}, headers=headers) as r:
        await r.read()
        if r.status == 429:
            assert int(r.headers["Retry-After"]) >= 1
        return r.status


def session_from(address: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def test_a_burst_from_one_address_does_not_starve_another(tmp_path):
    server = await start(limits={"attestation_per_minute": 20, "attestation_per_client_per_minute": 5},
                         attestation={"state_dir": str(tmp_path)})
    url = str(server.make_url("")).rstrip("/")
    try:
        async with session_from("127.0.0.1") as greedy, session_from("127.0.0.2") as other:
            burst = await asyncio.gather(*(attest(greedy, url) for _ in range(30)))
            assert burst.count(200) == 5 and burst.count(429) == 25
            assert [await attest(other, url) for _ in range(5)] == [200] * 5
            assert await attest(other, url) == 429  # its own share is used up too
    finally:
        await server.close()


async def test_a_burst_with_one_token_does_not_starve_another_token(tmp_path):
    server = await start(limits={"attestation_per_minute": 20, "attestation_per_client_per_minute": 4},
                         auth={"api_token_sha256": DIGESTS}, attestation={"state_dir": str(tmp_path)})
    url = str(server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as session:
            burst = await asyncio.gather(*(attest(session, url, TOKEN_A) for _ in range(12)))
            assert burst.count(200) == 4
            assert [await attest(session, url, TOKEN_B) for _ in range(4)] == [200] * 4
            # No token, or a made-up one, counts as the address: its own share, untouched so far.
            assert [await attest(session, url, t) for t in (None, "made-up", None, "other")] == [200] * 4
            assert await attest(session, url, "made-up-again") == 429
    finally:
        await server.close()


async def test_metrics_and_models_need_a_token_when_tokens_are_configured(make_node):
    node = await make_node(auth={"api_token_sha256": DIGESTS})
    client = node.client
    for path in ("/metrics", "/v1/models"):
        response = await client.get(path)
        assert response.status == 401 and (await response.json())["error"]["code"] == "UNAUTHORIZED"
        assert (await client.get(path, headers={"Authorization": "Bearer wrong"})).status == 401
        assert (await client.get(path, headers={"Authorization": f"Bearer {TOKEN_B}"})).status == 200
    for path in ("/health", "/ready", "/openapi.json", f"/v1/attestation?nonce={'00' * 32}"):
        assert (await client.get(path)).status == 200, path


async def test_metrics_public_for_a_scraper(make_node):
    node = await make_node(auth={"api_token_sha256": DIGESTS, "metrics_public": True})
    assert (await node.client.get("/metrics")).status == 200
    assert (await node.client.get("/v1/models")).status == 401


async def test_open_node_serves_metrics_and_models_without_token(make_node):
    node = await make_node()
    assert (await node.client.get("/metrics")).status == 200
    assert (await node.client.get("/v1/models")).status == 200


# --- slowloris --------------------------------------------------------------------------------


async def test_slow_headers_are_cut_off(make_node):
    """A client that sends its headers a byte at a time is disconnected after header_timeout,
    long before it would have finished; other clients are served meanwhile."""
    node = await make_node(limits={"header_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", node.client.port)
    trickle = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100
    started = time.monotonic()
    closed_after = None  # seconds into the trickle when the node hung up
    try:
        for index, byte in enumerate(trickle):  # at most ~13 s: bounded by the header's length
            writer.write(bytes([byte]))
            try:
                await writer.drain()
                if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except asyncio.TimeoutError:
                continue
            except ConnectionError:
                closed_after = time.monotonic() - started
                break
            if index == 40:  # meanwhile, a well-behaved client is served
                assert (await node.client.get("/health")).status == 200
    finally:
        writer.close()
    # Cut off by the 0.5 s header timeout while the client still had most of its header to send.
    assert closed_after is not None, "the node kept waiting for the slow client's headers"


# --- upstream only on loopback in real modes --------------------------------------------------


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://127.8.9.10:8000/v1", True),
        ("https://[::1]:8443", True),
        ("http://localhost:8000", True),
        ("unix:/run/vllm.sock", True),
        ("http://10.0.0.5:8000", False),
        ("http://192.0.2.1:8000", False),
        ("http://vllm.internal:8000", False),
        ("http://127.0.0.1.example.com", False),
        ("unix:relative.sock", False),
        ("ftp://127.0.0.1", False),
        ("127.0.0.1:8000", False),
    ],
)
def test_local_upstream(url, local):
    assert is_local_upstream(url) is local


def test_non_loopback_upstream_refused_in_a_real_mode():
    with pytest.raises(ValidationError, match="not a loopback address or a unix socket"):
        load_config(REPO_CONFIGS / "upstream-vllm.toml", engine={"kind": "upstream", "upstream_url": "http://10.0.0.5:8000"})
    assert load_config(REPO_CONFIGS / "upstream-vllm.toml").engine.upstream_url == "http://127.0.0.1:8000"
    # The simulated mode (a laptop, CI) may point anywhere.
    load_config(None, engine={"kind": "upstream", "upstream_url": "http://10.0.0.5:8000"})


def test_serve_refuses_a_non_loopback_upstream(capfd):
    code = main(["serve", "--config", str(REPO_CONFIGS / "upstream-vllm.toml"), "--upstream-url", "http://192.0.2.1:8000"])
    assert code == EXIT_CANNOT_START
    err = capfd.readouterr().err
    assert "'http://192.0.2.1:8000' is not a loopback address or a unix socket" in err
    assert "decrypted prompts" in err
