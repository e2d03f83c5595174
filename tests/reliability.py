"""Helpers of the reliability tests (fuzz, schemathesis, bad inputs, load, faults).

Real loopback servers: `ServerThread` runs `create_app(config, engine)` under aiohttp's
`AppRunner` + `TCPSite` on 127.0.0.1 in a background thread with its own event loop (for
synchronous tests: hypothesis, schemathesis, raw sockets); `LoopServer` does the same in the
running loop (for async tests: load, key rotation). Clients seal with `node.envelope` and
check every response and receipt with `ResponseOpener`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from node import envelope
from node.config import NodeConfig, load_config, merge_settings
from node.engine.base import ModelCard
from node.engine.echo import EchoEngine
from node.server import create_app
from node.server.state import NODE, NodeState

MODEL = "echo-model"
CHAT = "/v1/confidential/chat/completions"
COMPLETIONS = "/v1/confidential/completions"
EMBEDDINGS = "/v1/confidential/embeddings"
TASKS = frozenset({"chat", "completions", "embeddings"})

# the protocol's error table: every (status, code) a confidential route may answer.
ERROR_TABLE = {
    (400, "INVALID_BODY"),
    (401, "UNAUTHORIZED"),
    (401, "INVALID_SIGNATURE"),
    (400, "DECRYPTION_FAILED"),
    (400, "HASH_MISMATCH"),
    (404, "MODEL_NOT_FOUND"),
    (413, "BODY_TOO_LARGE"),
    (409, "REPLAYED_REQUEST"),
    (422, "STALE_NODE_KEY"),
    (429, "OVERLOADED"),
    (503, "NOT_READY"),
    (500, "INTERNAL_ERROR"),
}


def node_config(**overrides: Any) -> NodeConfig:
    """An echo-engine config serving MODEL, with nested overrides (e.g. limits={...})."""
    base = {"engine": {"kind": "echo", "models": [{"name": MODEL, "source": "echo"}]},
        # One event per engine chunk: these tests check per-event protocol properties (the
        # node's default coalesces chunks a slow stream has queued; tests/test_coalesce.py).
        "limits": {"stream_coalesce_max": 1}}
    return load_config(**merge_settings(base, overrides))


def echo(**kwargs: Any) -> EchoEngine:
    return EchoEngine([ModelCard(MODEL, TASKS)], **kwargs)


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def chat(prompt: str = "hello confidential world", stream: bool = False, model: str = MODEL, **extra: Any) -> dict:
    return {"messages": [{"content": prompt, "role": "user"}], "model": model, "stream": stream, **extra}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _start(app: web.Application, engine) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while not engine.ready:
        if time.monotonic() > deadline:
            raise RuntimeError("engine not ready")
        await asyncio.sleep(0.005)
    return runner, port


class _Base:
    app: web.Application
    engine: Any
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> NodeState:
        return self.app[NODE]

    @property
    def node_key(self) -> bytes:
        return self.state.keyring.current.public_key

    @property
    def signing_key(self) -> bytes:
        return self.state.signer.public_key

    def seal(
        self,
        payload: dict | bytes,
        model_name: str = MODEL,
        node_key: bytes | None = None,
        stream=None,
        hybrid: bool = False,
        padding: bool = False,
    ):
        """Seal to the current key (`hybrid`: and its ML-KEM key; `padding`: pad the request and
        require padded answers)."""
        plaintext = payload if isinstance(payload, bytes) else compact(payload)
        kem_key = self.state.keyring.current.kem_public_key if hybrid else None
        return envelope.seal_request(
            plaintext,
            node_key or self.node_key,
            model_name,
            kem_public_key=kem_key,
            padding=padding,
            stream=stream,
            signing_key=self.signing_key,
        )


class ServerThread(_Base):
    """A real loopback node in a background thread (its own loop): `with ServerThread(...) as node`."""

    def __init__(self, config: NodeConfig | None = None, engine: Any = None) -> None:
        self.config = config or node_config()
        self.engine = engine if engine is not None else echo()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tee-node-test-server", daemon=True)

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> ServerThread:
        self.thread.start()

        async def start():
            self.app = create_app(self.config, self.engine)
            return await _start(self.app, self.engine)

        self.runner, self.port = self.run(start())
        return self

    def __exit__(self, *exc) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(self.runner.cleanup())
            self.run(drain())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    # --- synchronous client -------------------------------------------------------------
    def post(
        self, path: str, body: bytes | dict, headers: dict[str, str] | None = None, timeout: float = 15.0
    ) -> tuple[int, dict[str, str], bytes]:
        data = body if isinstance(body, bytes) else compact(body)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def get(self, path: str, timeout: float = 15.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def settled(self, timeout: float = 5.0) -> bool:
        """Wait until no request holds a slot or runs in the engine (handlers finish just after
        their last byte is sent); whether that happened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state.admission.in_flight == 0 and self.state.admission.queued == 0 and not self.engine.running:
                return True
            time.sleep(0.01)
        return False

    def good_request(
        self,
        prompt: str = "still serving after that",
        stream: bool = False,
        headers: Callable[[dict], dict[str, str]] | None = None,
    ) -> dict:
        """A good confidential chat: 200, opens, receipt verifies, echoes the prompt; the receipt.
        `headers(outer)` gives the request's extra headers (auth, X-Signature)."""
        outer, opener = self.seal(chat(prompt, stream=stream), stream=stream)
        status, _, raw = self.post(CHAT, outer, headers(outer) if headers else None)
        assert status == 200, (status, raw[:300])
        if stream:
            text = ""
            for block in raw.decode().split("\n\n"):
                if block.startswith("data: "):
                    chunk = json.loads(opener.open_event(json.loads(block[6:])))
                    for choice in chunk["choices"]:
                        text += choice["delta"].get("content", "")
            receipt = opener.finish()
        else:
            answer = json.loads(opener.open_response(json.loads(raw)))
            text = answer["choices"][0]["message"]["content"]
            receipt = opener.receipt
        assert text == prompt
        assert self.engine.ready
        return receipt


class LoopServer(_Base):
    """A real loopback node in the running loop: `async with LoopServer(...) as node`."""

    def __init__(self, config: NodeConfig | None = None, engine: Any = None) -> None:
        self.config = config or node_config()
        self.engine = engine if engine is not None else echo()

    async def __aenter__(self) -> LoopServer:
        self.app = create_app(self.config, self.engine)
        self.runner, self.port = await _start(self.app, self.engine)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


async def stream_chat(
    session: aiohttp.ClientSession,
    url: str,
    node_key: bytes,
    signing_key: bytes,
    prompt: str,
    on_status: Callable[[int, bytes], bytes | None] | None = None,
) -> dict:
    """One confidential streaming chat: every event opened, the receipt verified; the receipt.

    A 422 STALE_NODE_KEY answer is retried with the key it carries (as a client should).
    """
    for _ in range(5):
        outer, opener = envelope.seal_request(
            compact(chat(prompt, stream=True)), node_key, MODEL, stream=True, signing_key=signing_key
        )
        async with session.post(url + CHAT, data=compact(outer), headers={"Content-Type": "application/json"}) as response:
            if response.status == 422:
                error = (await response.json())["error"]
                assert error["code"] == "STALE_NODE_KEY", error
                from node.crypto import b64d

                node_key = b64d(error["node_dh_public_key"])
                if on_status:
                    on_status(422, node_key)
                continue
            if response.status != 200:
                raise AssertionError(f"status {response.status}: {(await response.read())[:200]!r}")
            assert response.headers["Content-Type"].startswith("text/event-stream")
            text = ""
            buffer = b""
            async for data in response.content.iter_any():
                buffer += data
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    if block.startswith(b":"):
                        continue
                    assert block.startswith(b"data: "), block[:80]
                    event = json.loads(block[6:])
                    assert "error" not in event, event
                    chunk = json.loads(opener.open_event(event))
                    for choice in chunk["choices"]:
                        text += choice["delta"].get("content", "")
            assert not buffer.strip(), buffer[:80]
            receipt = opener.finish()
            assert text == prompt, (text, prompt)
            assert receipt["events"] == len(opener.response_hashes)
            return receipt
    raise AssertionError("still STALE_NODE_KEY after 5 retries")


def spawn_echo_node(env: dict[str, str] | None = None, model: str = MODEL):
    """`tee-node serve --engine echo` on a free loopback port, once /ready answers: (Popen, url, log path)."""
    import socket
    import subprocess
    import sys
    import tempfile
    import urllib.request
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tempfile.NamedTemporaryFile(prefix="tee-node-faults-", suffix=".log", delete=False)
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")}
    proc_env["TEE_NODE_LIMITS__STREAM_COALESCE_MAX"] = "1"  # one event per chunk, as in node_config
    proc_env.update(env or {})
    tee_node = Path(sys.executable).with_name("tee-node")
    proc = subprocess.Popen(
        [str(tee_node), "serve", "--engine", "echo", "--port", str(port), "--model", model],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=proc_env,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tee-node exited {proc.returncode}: {Path(log.name).read_text()}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=1) as response:
                if response.status == 200:
                    return proc, url, Path(log.name)
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"tee-node not ready: {Path(log.name).read_text()}")
        time.sleep(0.05)


def error_of(raw: bytes) -> tuple[str, dict]:
    """(code, error object) of an error body, which carries only public fields."""
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"]
    assert set(error) <= {"code", "message", "node_dh_public_key", "key_epoch", "kem_public_key"}, error
    return error["code"], error


