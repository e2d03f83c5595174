"""Faults: an engine failing mid-stream, SIGTERM on a real `tee-node serve` with streams in
flight, and key rotation while requests run."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import pytest

from node import envelope
from node.crypto import b64d, b64e
from node.errors import MissingReceipt
from reliability import CHAT, MODEL, LoopServer, chat, compact, echo, node_config, spawn_echo_node, stream_chat


async def read_events(response: aiohttp.ClientResponse) -> list[dict]:
    events = []
    for block in (await response.read()).split(b"\n\n"):
        if block and not block.startswith(b":"):
            assert block.startswith(b"data: "), block[:80]
            events.append(json.loads(block[6:]))
    return events


# --- the engine fails mid-stream -------------------------------------------------------------


async def test_engine_failure_mid_stream_ends_stream_with_error_event_and_not_ready():
    engine = echo(fail_after_tokens=3)
    async with LoopServer(node_config(), engine) as node:
        async with aiohttp.ClientSession() as session:
            outer, opener = node.seal(chat("one two three four five six", stream=True), stream=True)
            async with session.post(node.url + CHAT, data=compact(outer)) as response:
                assert response.status == 200
                events = await read_events(response)
            # Three sealed events, then one clear error event with no detail; no receipt.
            *sealed, last = events
            assert len(sealed) == 3
            for event in sealed:
                opener.open_event(event)
            assert last == {"error": {"code": "INTERNAL_ERROR", "message": "engine failed"}}
            with pytest.raises(MissingReceipt):
                opener.finish()
            assert engine.running == set()
            assert node.state.admission.in_flight == 0
            # /ready reports the engine down; new requests are refused as NOT_READY, not 500.
            async with session.get(node.url + "/ready") as response:
                assert response.status == 503
                assert (await response.json())["error"]["code"] == "NOT_READY"
            outer, _ = node.seal(chat("after the failure"))
            async with session.post(node.url + CHAT, data=compact(outer)) as response:
                assert response.status == 503
                assert (await response.json())["error"]["code"] == "NOT_READY"
            # /health still answers: the process is alive, only the engine is down.
            async with session.get(node.url + "/health") as response:
                assert response.status == 200


async def test_engine_failure_ends_every_concurrent_stream_cleanly():
    """Other streams running when the engine fails also end (sealed events, then the error
    event, or a complete stream with its receipt if they finished first); nothing is held."""
    engine = echo(fail_after_tokens=5, token_delay=0.01)
    async with LoopServer(node_config(), engine) as node:
        async with aiohttp.ClientSession() as session:

            async def one(words: int) -> str:
                outer, opener = node.seal(chat(" ".join(["w"] * words), stream=True), stream=True)
                async with session.post(node.url + CHAT, data=compact(outer)) as response:
                    if response.status == 503:
                        return "not-ready"
                    assert response.status == 200
                    events = await read_events(response)
                if "error" in events[-1]:
                    for event in events[:-1]:
                        opener.open_event(event)
                    return "error-event"
                for event in events:
                    opener.open_event(event)
                opener.finish()
                return "complete"

            outcomes = await asyncio.gather(*(one(3 if i % 2 else 20) for i in range(10)))
            assert "error-event" in outcomes
            assert set(outcomes) <= {"error-event", "complete", "not-ready"}
        for _ in range(100):
            if not engine.running and node.state.admission.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.running == set() and node.state.admission.in_flight == 0


# --- SIGTERM drains in-flight streams ----------------------------------------------------------


async def test_sigterm_drains_in_flight_streams():
    proc, url, log = spawn_echo_node(env={"TEE_NODE_ENGINE__ECHO_TOKEN_DELAY": "0.05", "TEE_NODE_SHUTDOWN_GRACE": "30"})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/nodes/lock", json={"model": MODEL}) as response:
                node_key = b64d((await response.json())["public_key"])
            words = [f"drain{i}" for i in range(30)]  # ~1.5 s per stream
            started = asyncio.Event()
            first_events = 0
            clients = 8

            async def one() -> dict:
                nonlocal first_events
                outer, opener = envelope.seal_request(compact(chat(" ".join(words), stream=True)), node_key, MODEL, stream=True)
                async with session.post(url + CHAT, data=compact(outer)) as response:
                    assert response.status == 200
                    text = ""
                    first = True
                    buffer = b""
                    async for data in response.content.iter_any():
                        buffer += data
                        while b"\n\n" in buffer:
                            block, buffer = buffer.split(b"\n\n", 1)
                            if block.startswith(b":"):
                                continue
                            chunk = json.loads(opener.open_event(json.loads(block[6:])))
                            text += "".join(c["delta"].get("content", "") for c in chunk["choices"])
                            if first:
                                first = False
                                first_events += 1
                                if first_events == clients:
                                    started.set()
                    receipt = opener.finish()
                    assert text == " ".join(words)
                    return receipt

            tasks = [asyncio.create_task(one()) for _ in range(clients)]
            await asyncio.wait_for(started.wait(), 20)
            proc.send_signal(signal.SIGTERM)
            receipts = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            assert len(receipts) == clients
            assert all(r["events"] == len(words) + 1 for r in receipts)
        # The process exits cleanly within the grace period, and takes no new connections.
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as session:
                await session.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.unlink(missing_ok=True)


# --- key rotation while requests run -----------------------------------------------------------


async def test_rotation_overlap_and_stale_retry():
    async with LoopServer(node_config(keys={"overlap": 300.0}), echo()) as node:
        keyring = node.state.keyring
        async with aiohttp.ClientSession() as session:
            # Sealed to the key that was current, sent after one rotation: the previous key is live.
            outer, opener = node.seal(chat("previous key still works"))
            epoch = keyring.current.epoch
            keyring.rotate()
            async with session.post(node.url + CHAT, data=compact(outer)) as response:
                assert response.status == 200
                opener.open_response(await response.json())
                assert opener.receipt["key_epoch"] == epoch
            # Two rotations later it is stale: 422 with the current key, and a retry succeeds.
            outer, _ = node.seal(chat("stale"))
            keyring.rotate()
            keyring.rotate()
            async with session.post(node.url + CHAT, data=compact(outer)) as response:
                assert response.status == 422
                error = (await response.json())["error"]
                assert error["code"] == "STALE_NODE_KEY"
                assert error["node_dh_public_key"] == b64e(keyring.current.public_key)
                assert error["key_epoch"] == keyring.current.epoch
            receipt = await stream_chat(session, node.url, b64d(error["node_dh_public_key"]), node.signing_key, "retried")
            assert receipt["key_epoch"] == keyring.current.epoch


async def run_rotation_load(clients: int, duration: float, period: float) -> dict:
    async with LoopServer(node_config(keys={"overlap": 300.0}, limits={"max_in_flight": 256}), echo(token_delay=0.002)) as node:
        keyring = node.state.keyring
        stats = {"completed": 0, "stale_retries": 0, "served_by_previous_key": 0, "rotations": 0, "errors": []}
        loop = asyncio.get_running_loop()
        stop = loop.time() + duration

        async def rotate() -> None:
            while loop.time() < stop:
                await asyncio.sleep(period)
                keyring.rotate()
                stats["rotations"] += 1

        def on_status(status: int, key: bytes) -> None:
            stats["stale_retries"] += 1

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def client(index: int) -> None:
                key = keyring.current.public_key  # a client keeps the key it learnt until told otherwise
                while loop.time() < stop:
                    try:
                        receipt = await stream_chat(session, node.url, key, node.signing_key, f"rotate {index} a b c d", on_status)
                    except Exception as exc:
                        stats["errors"].append(f"{type(exc).__name__}: {str(exc)[:200]}")
                        continue
                    stats["completed"] += 1
                    if receipt["key_epoch"] < keyring.current.epoch:
                        stats["served_by_previous_key"] += 1
                    if receipt["key_epoch"] != keyring.current.epoch and key != keyring.current.public_key:
                        key = keyring.current.public_key if index % 2 else key  # half the clients refresh lazily

            await asyncio.gather(rotate(), *(client(i) for i in range(clients)))
        print(f"\nrotation under load: { {k: (len(v) if isinstance(v, list) else v) for k, v in stats.items()} }")
        assert not stats["errors"], stats["errors"][:5]
        assert stats["rotations"] > 5
        assert stats["served_by_previous_key"] > 0  # overlap honoured while rotating
        assert stats["stale_retries"] > 0  # and stale clients recovered with the key in the body
        assert stats["completed"] >= clients
        return stats


async def test_rotation_during_load():
    await run_rotation_load(clients=20, duration=3, period=0.05)


@pytest.mark.long
async def test_rotation_during_load_long():
    await run_rotation_load(clients=100, duration=30, period=0.25)
