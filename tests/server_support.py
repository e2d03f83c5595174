"""Helpers and fixtures of the server tests: echo configs and apps, sealing helpers, a real echo node.

Import helpers from here (`from server_support import ...`), never `from conftest import ...`:
tests/integration has a conftest.py too, and in a whole-suite run the name `conftest` can be
either. tests/conftest.py re-exports the fixtures.

In-process tests build an app with `create_app(config, engine)` around an `EchoEngine` (or a
test subclass) and talk to it through aiohttp's TestClient (`make_node`/`node_client`). Tests
that need a real socket server (the atoma SDK, SIGTERM) use `spawn_node`, which runs
`tee-node serve --engine echo` as a subprocess, or the session-scoped `echo_node`.
Nothing here is marked `integration` (that marker is for the real vLLM tests).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from aiohttp.web import AppRunner
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from node import envelope
from node.config import NodeConfig, load_config, merge_settings
from node.crypto import (
    Aead,
    b64e,
    blake2b_256,
    derive_hybrid_key,
    derive_key,
    kem_encapsulate,
    random_nonce,
    random_salt,
)
from node.engine.base import ModelCard
from node.engine.echo import EchoEngine
from node.server import create_app, server_settings
from node.server.state import NODE

MODEL = "echo-model"
SDK_MODEL = "test-model"  # tests/atoma_driver.py's default model name
ALL_TASKS = frozenset({"chat", "completions", "embeddings"})
CONFIDENTIAL_CHAT = "/v1/confidential/chat/completions"
CONFIDENTIAL_COMPLETIONS = "/v1/confidential/completions"
CONFIDENTIAL_EMBEDDINGS = "/v1/confidential/embeddings"
TEE_NODE = Path(sys.executable).with_name("tee-node")


def echo_config(**overrides: Any) -> NodeConfig:
    """`load_config(engine={"kind": "echo"})` serving MODEL, plus nested overrides."""
    base = {"engine": {"kind": "echo", "models": [{"name": MODEL, "source": "echo"}]},
        # One event per engine chunk: these tests check per-event protocol properties (the
        # node's default coalesces chunks a slow stream has queued; tests/test_coalesce.py).
        "limits": {"stream_coalesce_max": 1}}
    return load_config(**merge_settings(base, overrides))


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def chat_body(prompt: str, stream: bool = False, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"content": prompt, "role": "user"}], "model": model, "stream": stream, **extra}


def completion_body(prompt: str, stream: bool = False, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "stream": stream, **extra}


def embedding_body(text: str | list[str], model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "input": text}


@dataclass
class Sealed:
    """A sealed request with every secret the client holds (for the log-secrecy tests)."""

    outer: dict[str, Any]
    opener: envelope.ResponseOpener
    plaintext: bytes
    client_private_key: bytes
    shared_secret: bytes
    aes_key: bytes
    kem_shared_secret: bytes | None = None


def seal_with_secrets(
    plaintext: bytes,
    node_public_key: bytes,
    model_name: str,
    stream: bool | None = None,
    kem_public_key: bytes | None = None,
) -> Sealed:
    """What `envelope.seal_request` does, keeping the client's secrets for inspection; with
    `kem_public_key`, the hybrid key agreement."""
    client = X25519PrivateKey.generate()
    client_public = client.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = client.exchange(X25519PublicKey.from_public_bytes(node_public_key))
    salt, nonce = random_salt(), random_nonce()
    kem_secret = kem_ciphertext = None
    if kem_public_key is None:
        aes_key = derive_key(shared, salt)
    else:
        kem_secret, kem_ciphertext = kem_encapsulate(kem_public_key)
        aes_key = derive_hybrid_key(kem_secret, shared, salt, client_public, node_public_key, kem_ciphertext)
    aead = Aead(aes_key)
    request_hash = blake2b_256(plaintext)
    outer = {
        "ciphertext": b64e(aead.encrypt(nonce, plaintext)),
        "client_dh_public_key": b64e(client_public),
        "model_name": model_name,
        "node_dh_public_key": b64e(node_public_key),
        "nonce": b64e(nonce),
        "plaintext_body_hash": b64e(request_hash),
        "salt": b64e(salt),
        "stack_small_id": 0,
        "stream": stream,
    }
    if kem_ciphertext is not None:
        outer["kem_ciphertext"] = b64e(kem_ciphertext)
    private = client.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return Sealed(outer, envelope.ResponseOpener(aead, request_hash), plaintext, private, shared, aes_key, kem_secret)


@dataclass
class SSE:
    """A server-sent-event body split into data events (parsed JSON or raw text) and comments."""

    raw: bytes
    events: list[Any] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: bytes) -> SSE:
        out = cls(raw)
        for block in raw.decode("utf-8").split("\n\n"):
            if not block:
                continue
            if block.startswith(":"):
                out.comments.append(block)
            else:
                assert block.startswith("data: "), block
                data = block[len("data: ") :]
                out.events.append(data if data == "[DONE]" else json.loads(data))
        return out


async def next_block(response) -> bytes:
    """One SSE block (up to the blank line) of a streaming aiohttp ClientResponse."""
    return await response.content.readuntil(b"\n\n")


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def echo_engine(**kwargs: Any) -> EchoEngine:
    return EchoEngine([ModelCard(MODEL, ALL_TASKS)], **kwargs)


class Node:
    """An in-process app, its TestClient and its engine, with sealing helpers."""

    def __init__(self, app, client, engine) -> None:
        self.app = app
        self.client = client
        self.engine = engine

    @property
    def state(self):
        return self.app[NODE]

    @property
    def current_key(self) -> bytes:
        return self.state.keyring.current.public_key

    def seal(
        self,
        payload: dict[str, Any] | bytes,
        model_name: str | None = None,
        node_key: bytes | None = None,
        stream: bool | None = None,
        hybrid: bool = False,
        padding: bool = False,
    ) -> tuple[dict[str, Any], envelope.ResponseOpener]:
        """Seal against the app's current key (`hybrid`: and its ML-KEM key, docs/protocol.md;
        `padding`: pad the request and require padded answers); the opener pins the node's
        signing key."""
        plaintext = payload if isinstance(payload, bytes) else compact(payload)
        if model_name is None:
            model_name = payload.get("model", MODEL) if isinstance(payload, dict) else MODEL
        if stream is None and isinstance(payload, dict):
            stream = payload.get("stream")
        return envelope.seal_request(
            plaintext,
            node_key or self.current_key,
            model_name,
            kem_public_key=self.state.keyring.current.kem_public_key if hybrid else None,
            padding=padding,
            stream=stream,
            signing_key=self.state.signer.public_key,
        )

    async def post(self, path: str, outer: dict[str, Any] | bytes, headers: dict[str, str] | None = None):
        data = outer if isinstance(outer, bytes) else compact(outer)
        return await self.client.post(path, data=data, headers={"Content-Type": "application/json", **(headers or {})})

    async def call(self, path: str, payload: dict[str, Any], headers: dict[str, str] | None = None):
        """Seal, post, and for a 200 non-streaming answer open it: (status, body, plaintext dict | None)."""
        outer, opener = self.seal(payload)
        response = await self.post(path, outer, headers)
        if response.headers.get("Content-Type", "").startswith("text/event-stream"):
            raw = await response.read()
            sse = SSE.parse(raw)
            chunks = [json.loads(opener.open_event(e)) for e in sse.events]
            opener.finish()
            return response.status, sse, chunks
        body = await response.json()
        if response.status != 200:
            return response.status, body, None
        return response.status, body, json.loads(opener.open_response(body))

    async def chat_ok(self, prompt: str = "good request still works", headers: dict[str, str] | None = None) -> None:
        """A good confidential chat: 200, decrypts, receipt verifies, echoes the prompt."""
        status, body, answer = await self.call(CONFIDENTIAL_CHAT, chat_body(prompt), headers)
        assert status == 200, body
        assert answer["choices"][0]["message"]["content"] == prompt


class NodeTestServer(TestServer):
    """aiohttp's TestServer with the server settings of `tee-node serve` (`server_settings`) and
    `handler_cancellation` as it runs it (False, the `web.run_app` default: a client going away
    is noticed on the next write), not the TestServer's True, unless asked for."""

    def __init__(self, app, handler_cancellation: bool = False, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.handler_cancellation = handler_cancellation

    async def start_server(self, **kwargs: Any) -> None:
        tls = self.app[NODE].tls  # an attested-TLS node serves HTTPS, as `tee-node serve` does
        await super().start_server(**({"ssl": tls.context} if tls else {}), **kwargs)

    async def _make_runner(self, **kwargs: Any) -> AppRunner:
        kwargs["handler_cancellation"] = self.handler_cancellation
        return AppRunner(self.app, **{**kwargs, **server_settings(self.app[NODE].config)})


@pytest.fixture
def make_node(aiohttp_client):
    """`await make_node(engine=None, wait_ready=True, config=None, handler_cancellation=False,
    **config_overrides)` -> Node; `config` (a dict) is for overrides whose name clashes with a
    parameter (`engine`)."""

    async def make(
        engine=None,
        wait_ready: bool = True,
        config: dict[str, Any] | None = None,
        handler_cancellation: bool = False,
        **overrides: Any,
    ) -> Node:
        config = echo_config(**merge_settings(config or {}, overrides))
        engine = engine if engine is not None else echo_engine()
        app = create_app(config, engine)
        client = await aiohttp_client(NodeTestServer(app, handler_cancellation=handler_cancellation))
        if wait_ready:
            await wait_for(lambda: engine.ready, what="engine ready")
        return Node(app, client, engine)

    return make


@pytest.fixture
async def node_client(make_node) -> Node:
    return await make_node()


@pytest.fixture
def all_logs(caplog) -> Callable[[], str]:
    """Capture every log record at DEBUG (root, aiohttp, tee_node, asyncio); return a text getter
    with messages, raw args, exception tracebacks and stack info."""
    caplog.set_level(logging.DEBUG)
    for name in ("aiohttp", "aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.internal", "tee_node", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    formatter = logging.Formatter()

    def text() -> str:
        parts = []
        for record in caplog.records:
            parts.append(record.getMessage())
            parts.append(repr(record.args))
            if record.exc_info:
                parts.append(formatter.formatException(record.exc_info))
            if record.exc_text:
                parts.append(record.exc_text)
            if record.stack_info:
                parts.append(record.stack_info)
        return "\n".join(parts)

    return text


# --- real node subprocesses ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `url`; an https:// node's certificate is not checked (readiness polls only)."""
    unverified = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=unverified) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class NodeProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, scheme: str = "http") -> None:
        self.proc = proc
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def spawn_node(model: str = MODEL, env: dict[str, str] | None = None, extra_args: list[str] | None = None) -> NodeProcess:
    """`tee-node serve --engine echo --port P --model M` on a free port, once /ready answers 200
    (https:// with `--tls` among `extra_args`)."""
    port = free_port()
    return start_node_process(
        ["serve", "--engine", "echo", "--port", str(port), "--model", model, *(extra_args or [])],
        port,
        # one event per chunk, as in echo_config
        env={"TEE_NODE_LIMITS__STREAM_COALESCE_MAX": "1", **(env or {})},
        scheme="https" if "--tls" in (extra_args or []) else "http",
    )


def start_node_process(
    args: list[str],
    port: int,
    *,
    env: dict[str, str] | None = None,
    scheme: str = "http",
    ready_within: float = 30,
    log_prefix: str = "tee-node-",
) -> NodeProcess:
    """`tee-node ARGS` serving on `port`, once /ready answers 200; its environment is this one's
    without the TEE_NODE_ settings (so the test decides them all), plus `env`."""
    log_file = tempfile.NamedTemporaryFile(prefix=log_prefix, suffix=".log", delete=False)
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")}
    proc_env.update(env or {})
    proc = subprocess.Popen([str(TEE_NODE), *args], stdout=log_file, stderr=subprocess.STDOUT, env=proc_env)
    log_file.close()
    node = NodeProcess(proc, port, Path(log_file.name), scheme)
    deadline = time.monotonic() + ready_within
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tee-node exited {proc.returncode}:\n{node.log()}")
        try:
            if http_get(node.url + "/ready", timeout=1)[0] == 200:
                return node
        except OSError:
            pass
        if time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"tee-node not ready in time:\n{node.log()}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def node_process() -> Iterator[NodeProcess]:
    """`tee-node serve` (echo engine) as its own process, shared by a module's tests."""
    node = spawn_node()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def echo_node():
    """A real `tee-node serve --engine echo` subprocess serving the SDK driver's model."""
    node = spawn_node(model=SDK_MODEL)
    try:
        yield node
    finally:
        node.stop()
        node.log_path.unlink(missing_ok=True)


# --- test engines ---------------------------------------------------------------------------


class GatedEcho(EchoEngine):
    """Echo whose streams wait on `gate` before their first chunk (non-streaming answers too),
    and whose `start` waits on `start_gate`; records `aborted` request ids."""

    def __init__(self, models: list[ModelCard] | None = None, **kwargs: Any) -> None:
        super().__init__(models or [ModelCard(MODEL, ALL_TASKS)], **kwargs)
        self.gate = asyncio.Event()
        self.gate.set()
        self.start_gate = asyncio.Event()
        self.start_gate.set()
        self.aborted: list[str] = []
        self.streams_waiting = 0

    async def start(self) -> None:
        await self.start_gate.wait()
        await super().start()

    async def _gated(self, chunks):
        self.streams_waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.streams_waiting -= 1
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def _call(self, result):
        if isinstance(result, dict):
            await self.gate.wait()
            return result
        return self._gated(result)

    async def chat(self, request, request_id):
        return await self._call(await super().chat(request, request_id))

    async def complete(self, request, request_id):
        return await self._call(await super().complete(request, request_id))

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        await super().abort(request_id)


class RaisingEcho(GatedEcho):
    """Echo that raises `error` (an unexpected exception) from chat when `fail` is set; with
    `fail_in_stream` the stream raises it after its first chunk instead."""

    def __init__(self, error: BaseException, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error = error
        self.fail = True
        self.fail_in_stream = False

    async def _failing(self, chunks):
        async for chunk in chunks:
            yield chunk
            raise self.error

    async def chat(self, request, request_id):
        if self.fail and not self.fail_in_stream:
            raise self.error
        result = await super().chat(request, request_id)
        if self.fail and self.fail_in_stream and not isinstance(result, dict):
            return self._failing(result)
        return result
