"""The UpstreamEngine's hop, against a small OpenAI server on loopback: answers and stream
chunks reach the node parsed, one pooled session holds up to `max_in_flight` keep-alive
connections, an answer that is not a JSON object is the node's error, and the node holds no
weights of its own."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from node.config import EngineConfig, ModelConfig
from node.engine.upstream import UpstreamEngine
from node.errors import EngineError, ModelNotFound

MODEL = "up"
ANSWER = b'{"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
CHUNKS = [
    b'{"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "h"}}]}',
    b'{"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "i"}}]}',
    b'{"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}',
]


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body.get("stream"):
        assert body["stream_options"]["include_usage"] is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for data in CHUNKS:
            await response.write(b"data: " + data + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response
    if body.get("messages") == "array":
        return web.Response(body=b"[1]", content_type="application/json")
    return web.Response(body=ANSWER, content_type="application/json")


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"data": [{"id": MODEL}]})


@pytest.fixture
async def engine(aiohttp_server):
    app = web.Application()
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat)
    server = await aiohttp_server(app)
    engine = UpstreamEngine(EngineConfig(kind="upstream", upstream_url=str(server.make_url("/v1")), models=[]), max_connections=7)
    await engine.start()
    yield engine
    await engine.stop()


async def test_answer_is_parsed(engine):
    result = await engine.chat({"model": MODEL, "messages": [], "stream": False}, "r1")
    assert result == json.loads(ANSWER)


async def test_stream_chunks_are_parsed_in_order(engine):
    stream = await engine.chat({"model": MODEL, "messages": [], "stream": True}, "r2")
    chunks = [chunk async for chunk in stream]
    assert chunks == [json.loads(data) for data in CHUNKS]


async def test_pool_is_sized_to_max_in_flight_and_reused(engine):
    connector = engine._session.connector
    assert connector.limit == 7 + 1  # the admitted requests and the health poller
    for request_id in ("a", "b", "c"):
        await engine.chat({"model": MODEL, "messages": [], "stream": False}, request_id)
    assert len(connector._conns) == 1 and sum(len(c) for c in connector._conns.values()) == 1  # one keep-alive connection


async def test_no_weights_of_its_own(engine):
    assert engine.weights_sha256() == {}


async def test_an_answer_that_is_not_an_object_is_an_engine_error(engine):
    with pytest.raises(EngineError):
        await engine.chat({"model": MODEL, "messages": "array", "stream": False}, "r3")


async def test_image_requests_pass_through_to_the_upstream_images_api(aiohttp_server):
    """An image model on an upstream (vLLM-Omni serves diffusion models with OpenAI's images API)."""
    seen = []

    async def images(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response({"created": 1, "data": [{"b64_json": "iVBORw0KGgo="}]})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "omni-image"}]})

    app = web.Application()
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/images/generations", images)
    server = await aiohttp_server(app)
    configured = ModelConfig(name="omni-image", source="upstream", task="image", sizes=["1024x1024"], max_images=2)
    engine = UpstreamEngine(EngineConfig(kind="upstream", upstream_url=str(server.make_url("/v1")), models=[configured]))
    await engine.start()
    try:
        (card,) = engine.models()
        assert (card.tasks, card.image_sizes, card.max_images) == (frozenset({"images"}), ("1024x1024",), 2)
        request = {"model": "omni-image", "prompt": "a cat", "n": 1, "size": "1024x1024", "response_format": "b64_json"}
        assert await engine.generate_images(request, "i1") == {"created": 1, "data": [{"b64_json": "iVBORw0KGgo="}]}
        assert seen == [request]
        with pytest.raises(ModelNotFound):
            await engine.chat({"model": "omni-image", "messages": []}, "i2")
    finally:
        await engine.stop()
