"""Load on loopback against a real node (aiohttp AppRunner + TCPSite, echo engine), time-bounded.

Concurrent streaming clients seal with `node.envelope`, open every event and verify every
receipt: zero errors allowed. RSS before and after is printed (and its growth bounded
generously); timings are never asserted. A storm of clients that hang up after the first event
leaves no request in the engine and no slot held.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time

import aiohttp
import pytest

from reliability import CHAT, LoopServer, chat, compact, echo, node_config, rss_mb, stream_chat
from node import envelope

PROMPT = "the quick brown fox jumps over the lazy dog again"


async def settle(node: LoopServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while node.engine.running or node.state.admission.in_flight or node.state.admission.queued:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not settled: running={len(node.engine.running)} in_flight={node.state.admission.in_flight}"
            )
        await asyncio.sleep(0.02)


async def run_load(clients: int, duration: float) -> dict:
    config = node_config(
        limits={"max_in_flight": clients * 2, "max_queue": clients * 2, "queue_timeout": 120, "read_timeout": 60}
    )
    async with LoopServer(config, echo()) as node:
        gc.collect()
        rss_before = rss_mb()
        completed = 0
        errors: list[str] = []
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            loop = asyncio.get_running_loop()
            stop = loop.time() + duration

            async def client(index: int) -> None:
                nonlocal completed
                prompt = f"{PROMPT} client {index}"
                while loop.time() < stop:
                    try:
                        receipt = await stream_chat(session, node.url, node.node_key, node.signing_key, prompt)
                        # The receipt signs the clear usage: rounded up (privacy.clear_usage = "bucketed").
                        assert receipt["model"] and receipt["usage"]["completion_tokens"] == envelope.usage_bucket(len(prompt.split()))
                    except Exception as exc:  # counted, and shown below
                        errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                    else:
                        completed += 1

            started = time.monotonic()
            await asyncio.gather(*(client(i) for i in range(clients)))
            elapsed = time.monotonic() - started
        await settle(node)
        gc.collect()
        rss_after = rss_mb()
        figures = {
            "clients": clients,
            "seconds": round(elapsed, 1),
            "completed": completed,
            "errors": len(errors),
            "rss_before_mb": round(rss_before, 1),
            "rss_after_mb": round(rss_after, 1),
            "replay_entries": node.state.keyring.current.replay_entries,
        }
        print(f"\nload: {figures}")
        assert not errors, errors[:5]
        assert completed >= clients
        assert node.state.keyring.current.replay_entries >= completed  # every request was claimed once
        assert rss_after - rss_before < 200, figures
        return figures


async def test_load_short():
    await run_load(clients=50, duration=5)


@pytest.mark.long
@pytest.mark.timeout(600)
async def test_load_500_clients_60s():
    await run_load(clients=500, duration=60)


async def hang_up_storm(clients: int) -> None:
    """Clients that close their connection right after the first event of a long stream."""
    config = node_config(limits={"max_in_flight": clients * 2, "max_queue": clients * 2})
    engine = echo(token_delay=0.02)
    async with LoopServer(config, engine) as node:
        long_prompt = " ".join(f"w{i}" for i in range(200))  # ~4 s of tokens if nobody hung up
        first_events = 0

        async def hang_up() -> None:
            nonlocal first_events
            outer, opener = node.seal(chat(long_prompt, stream=True), stream=True)
            async with aiohttp.ClientSession() as session:  # one connection each, closed below
                response = await session.post(node.url + CHAT, data=compact(outer), headers={"Content-Type": "application/json"})
                assert response.status == 200
                block = await response.content.readuntil(b"\n\n")
                assert block.startswith(b"data: ")
                first_events += 1
                response.close()  # drop the connection mid-stream

        await asyncio.gather(*(hang_up() for _ in range(clients)))
        assert first_events == clients
        await settle(node)  # every engine request aborted, every slot released
        assert engine.running == set()
        # And the node serves a full stream afterwards.
        async with aiohttp.ClientSession() as session:
            await stream_chat(session, node.url, node.node_key, node.signing_key, "after the storm")
        await settle(node)


async def test_hang_up_storm():
    await hang_up_storm(100)


@pytest.mark.long
async def test_hang_up_storm_long():
    await hang_up_storm(500)


async def test_overload_answers_429_and_recovers():
    """Beyond max_in_flight + max_queue the node answers 429 OVERLOADED with Retry-After, and
    serves again once the load is gone."""
    config = node_config(limits={"max_in_flight": 2, "max_queue": 1, "retry_after": 3})
    engine = echo(token_delay=0.05)
    async with LoopServer(config, engine) as node:
        prompt = " ".join(["slow"] * 20)
        async with aiohttp.ClientSession() as session:
            statuses: list[int] = []

            async def one() -> None:
                outer, opener = node.seal(chat(prompt, stream=True), stream=True)
                async with session.post(node.url + CHAT, data=compact(outer)) as response:
                    statuses.append(response.status)
                    if response.status == 429:
                        assert response.headers["Retry-After"] == "3"
                        assert (await response.json())["error"]["code"] == "OVERLOADED"
                    else:
                        assert response.status == 200
                        body = await response.read()
                        for block in body.split(b"\n\n"):
                            if block:
                                opener.open_event(json.loads(block[6:]))
                        opener.finish()

            await asyncio.gather(*(one() for _ in range(8)))
            assert statuses.count(200) >= 3 and statuses.count(429) >= 1, statuses
            await settle(node)
            await stream_chat(session, node.url, node.node_key, node.signing_key, "recovered")


def test_envelope_is_importable():
    assert envelope.seal_request  # the client side used above is the package's own
