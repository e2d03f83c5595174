"""VllmEngine in-process (chat model only): slot accounting on abort, error mapping, and
that vLLM's own OpenAI layer does the work (logprobs, stop, completions)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from integration_support import CHAT_MODEL, QUESTION  # type: ignore[import-not-found]
from node.config import load_config
from node.engine.vllm import VllmEngine
from node.errors import EngineBadRequest, ModelNotFound

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24, "temperature": 0}
LONG = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 1500, "stream": True}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[VllmEngine]:
    config = load_config(
        None,
        engine={"kind": "vllm", "models": [{"name": CHAT_MODEL, "source": "embedded:smollm2", "dtype": "float32", "max_model_len": 2048}]},
    )
    engine = VllmEngine(config.engine, config.cache_dir)
    await engine.start()
    assert engine.ready, "engine failed to start (see the log)"
    yield engine
    await engine.stop()
    assert not engine.ready
    # stop() releases the engine: nothing keeps an AsyncLLM alive until interpreter exit.
    from vllm.v1.engine.async_llm import AsyncLLM

    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, AsyncLLM)]


async def idle(engine: VllmEngine) -> bool:
    for _ in range(50):
        if engine.running_requests() == 0:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_chat_and_models(engine: VllmEngine) -> None:
    response = await engine.chat(dict(CHAT), "chat-1")
    assert "Paris" in response["choices"][0]["message"]["content"]
    assert response["usage"]["total_tokens"] == response["usage"]["prompt_tokens"] + response["usage"]["completion_tokens"]
    (card,) = engine.models()
    assert card.id == CHAT_MODEL and card.max_model_len == 2048 and card.tasks == {"chat", "completions"}


async def test_stream_always_ends_with_usage(engine: VllmEngine) -> None:
    # The client did not ask for usage; the node always does.
    chunks = [c async for c in await engine.chat({**CHAT, "stream": True}, "chat-2")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


async def test_abort_mid_stream_frees_the_slot(engine: VllmEngine) -> None:
    stream = await engine.chat(dict(LONG), "abort-1")
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            assert engine.running_requests() == 1
            await engine.abort("abort-1")
    assert seen < 50
    assert await idle(engine)
    await engine.abort("abort-1")  # idempotent


async def test_closing_the_iterator_frees_the_slot(engine: VllmEngine) -> None:
    stream = await engine.complete({"model": CHAT_MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "stream": True}, "close-1")
    async for _ in stream:
        break
    assert engine.running_requests() == 1
    await stream.aclose()
    assert await idle(engine)


async def test_cancelling_a_unary_request_frees_the_slot(engine: VllmEngine) -> None:
    task = asyncio.create_task(engine.chat({**LONG, "stream": False}, "cancel-1"))
    for _ in range(100):
        if engine.running_requests():
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await idle(engine)


async def test_vllm_features_pass_through(engine: VllmEngine) -> None:
    response = await engine.chat({**CHAT, "logprobs": True, "top_logprobs": 2, "stop": ["Paris"]}, "feat-1")
    choice = response["choices"][0]
    assert "Paris" not in choice["message"]["content"] and choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 2
    completion = await engine.complete({"model": CHAT_MODEL, "prompt": ["The capital of France is", "1, 2, 3,"], "max_tokens": 4, "temperature": 0}, "feat-2")
    assert [c["index"] for c in completion["choices"]] == [0, 1]
    assert "Paris" in completion["choices"][0]["text"]


@pytest.mark.parametrize(
    "request_body, error",
    [
        ({**CHAT, "model": "no/such-model"}, ModelNotFound),
        ({"model": CHAT_MODEL, "messages": "not a list"}, EngineBadRequest),
        ({**CHAT, "max_tokens": 100_000}, EngineBadRequest),
        ({**CHAT, "temperature": -1}, EngineBadRequest),
    ],
    ids=["unknown-model", "invalid-schema", "beyond-context", "bad-sampling"],
)
async def test_errors_map_to_node_errors(engine: VllmEngine, request_body: dict, error: type) -> None:
    with pytest.raises(error):
        await engine.chat(request_body, "err-1")
    with pytest.raises(ModelNotFound):
        await engine.embed({"model": CHAT_MODEL, "input": "x"}, "err-2")
    assert await idle(engine)
