"""`tee-node serve --engine upstream` in front of vLLM's own api_server on loopback."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from integration_support import BIN, CHAT_MODEL, QUESTION, Proc, clean_env, free_port, start_node  # type: ignore[import-not-found]
from node.config import load_config
from node.engine.upstream import UpstreamEngine
from node.errors import EngineBadRequest, EngineError, ModelNotFound
from tests.atoma import run_driver, run_driver_lines

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upstream(module_tmp: Path, chat_model_dir: Path) -> Iterator[str]:
    port = free_port()
    cmd = [
        str(BIN / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(chat_model_dir), "--served-model-name", CHAT_MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30),
    ]
    proc = Proc("vllm api_server", cmd, clean_env(), module_tmp / "vllm.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def upstream_node(module_tmp: Path, upstream: str) -> Iterator[str]:
    proc, url = start_node(module_tmp, "--engine", "upstream", "--upstream-url", upstream)
    try:
        proc.wait_http(url + "/ready", timeout=120)
        yield url
    finally:
        proc.stop()


def test_models_come_from_the_upstream(upstream_node: str) -> None:
    with urllib.request.urlopen(upstream_node + "/v1/models", timeout=5) as response:
        assert [m["id"] for m in json.loads(response.read())["data"]] == [CHAT_MODEL]


@pytest.mark.usefixtures("atoma_sdk")
@pytest.mark.parametrize("flags", [[], ["--stream"], ["--stream", "--async"]], ids=["unary", "stream", "stream-async"])
def test_sdk_chat_through_the_upstream(upstream_node: str, flags: list[str]) -> None:
    args = ["chat", "--url", upstream_node, "--model", CHAT_MODEL, "--prompt", QUESTION, "--max-tokens", "24", "--temperature", "0", *flags]
    if "--stream" in flags:
        result = run_driver_lines(args, timeout=180)[-1]
    else:
        result = run_driver(args, timeout=180)
        assert result["response"]["usage"]["prompt_tokens"] > 0
    assert result.get("ok") is True, result
    assert "Paris" in result["content"]


# --- UpstreamEngine against a scripted OpenAI-compatible server (fast, no model) -------------

class Scripted:
    """Answers like vLLM's api_server; `max_tokens` picks the behaviour."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.request_ids: list[str | None] = []
        self.disconnected = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m", "owned_by": "vllm", "max_model_len": 2048}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.request_ids.append(request.headers.get("X-Request-Id"))
        status = {400: 400, 404: 404, 500: 500}.get(body.get("max_tokens"))
        if status:
            return web.json_response({"error": {"message": "no", "type": "x", "code": status}}, status=status)
        if not body.get("stream"):
            return web.json_response({"id": "c", "choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 1}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(body["max_tokens"]):
                await response.write(b'data: {"choices":[{"delta":{"content":"%d"}}]}\n\n' % i)
                await asyncio.sleep(0.01)
            await response.write(b'data: {"choices":[],"usage":{"completion_tokens":%d}}\n\ndata: [DONE]\n\n' % body["max_tokens"])
        except (ConnectionError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response


@pytest.fixture(params=["tcp", "unix"])
async def scripted(request, aiohttp_server, tmp_path):
    """(script, engine, stop_upstream): the scripted upstream on loopback TCP or on a unix
    socket (`unix:/path`)."""
    script = Scripted()
    if request.param == "tcp":
        server = await aiohttp_server(script.app())
        url, stop_upstream = f"http://127.0.0.1:{server.port}/v1", server.close
    else:
        runner = web.AppRunner(script.app())
        await runner.setup()
        await web.UnixSite(runner, str(tmp_path / "upstream.sock")).start()
        url, stop_upstream = f"unix:{tmp_path / 'upstream.sock'}", runner.cleanup
    config = load_config(None, engine={"kind": "upstream", "upstream_url": url, "models": [{"name": "m", "source": "-"}]})
    engine = UpstreamEngine(config.engine)
    await engine.start()
    yield script, engine, stop_upstream
    await engine.stop()
    await stop_upstream()


async def test_scripted_unary_stream_and_models(scripted) -> None:
    script, engine, _ = scripted
    assert engine.ready
    (card,) = engine.models()
    assert (card.id, card.max_model_len, card.tasks) == ("m", 2048, {"chat", "completions"})
    assert (await engine.chat({"model": "m", "messages": []}, "req-1"))["choices"][0]["message"]["content"] == "hi"
    chunks = [c async for c in await engine.chat({"model": "m", "messages": [], "stream": True, "max_tokens": 3}, "req-2")]
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:-1]] == ["0", "1", "2"]
    assert chunks[-1] == {"choices": [], "usage": {"completion_tokens": 3}}
    # Usage is always asked for, and the node's request id travels to the upstream.
    assert script.bodies[-1]["stream_options"] == {"include_usage": True}
    assert script.request_ids == ["req-1", "req-2"]


@pytest.mark.parametrize("status, error", [(400, EngineBadRequest), (404, ModelNotFound), (500, EngineError)])
async def test_scripted_error_statuses_map_to_node_errors(scripted, status: int, error: type) -> None:
    _, engine, _ = scripted
    with pytest.raises(error):
        await engine.chat({"model": "m", "messages": [], "max_tokens": status}, "req-e")


async def test_scripted_unknown_model_and_task(scripted) -> None:
    script, engine, _ = scripted
    with pytest.raises(ModelNotFound):
        await engine.chat({"model": "other", "messages": []}, "req-m")
    with pytest.raises(ModelNotFound):
        await engine.embed({"model": "m", "input": "x"}, "req-m")
    assert script.bodies == []


async def test_scripted_abort_closes_the_upstream_stream(scripted) -> None:
    script, engine, _ = scripted
    stream = await engine.chat({"model": "m", "messages": [], "stream": True, "max_tokens": 1000}, "req-a")
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            await engine.abort("req-a")
    assert seen < 10
    await asyncio.wait_for(script.disconnected.wait(), 5)
    await engine.abort("req-a")  # idempotent


async def test_scripted_ready_follows_the_upstream(scripted) -> None:
    _, engine, stop_upstream = scripted
    assert await engine.poll()
    await stop_upstream()
    assert not await engine.poll() and not engine.ready
