"""How the engines read the server-sent events of vLLM and of an upstream server (node.wire's
decoder): chunks in order, `[DONE]` ends, an error event becomes the node's error, and a stream
left early aborts the engine's sequences. vLLM itself is not needed: `VllmEngine._stream` reads
the strings vLLM's serving layer yields, given here."""

from __future__ import annotations

import orjson
import pytest

from node.config import load_config
from node.engine.vllm import VllmEngine, _Running, _Served
from node.errors import EngineBadRequest, EngineError


class FakeLlm:
    def __init__(self) -> None:
        self.aborted: list[list[str]] = []

    async def abort(self, ids: list[str]) -> None:
        self.aborted.append(ids)


async def vllm_sse(*events: str):
    """What OpenAIServingChat yields: one `data: ...\\n\\n` string per event."""
    for event in events:
        yield event


def chunk(text: str) -> str:
    return "data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).decode() + "\n\n"


def engine_with_running(request_id: str) -> tuple[VllmEngine, _Served]:
    config = load_config(None)
    engine = VllmEngine(config.engine, config.cache_dir)
    served = _Served(cfg=config.engine.models[0], llm=FakeLlm())
    engine._running[request_id] = _Running(served, [f"chatcmpl-{request_id}"])
    return engine, served


async def test_vllm_stream_reads_chunks_until_done():
    engine, served = engine_with_running("r1")
    usage = 'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    chunks = [c async for c in engine._stream(served, vllm_sse(chunk("Par"), chunk("is"), usage, "data: [DONE]\n\n"), "r1")]
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:2]] == ["Par", "is"]
    assert chunks[2]["usage"]["completion_tokens"] == 2 and len(chunks) == 3
    assert served.llm.aborted == [] and "r1" not in engine._running


@pytest.mark.parametrize(("code", "error"), [(400, EngineBadRequest), (500, EngineError), ("x", EngineError)])
async def test_vllm_error_event_becomes_the_node_error(code, error):
    engine, served = engine_with_running("r2")
    event = "data: " + orjson.dumps({"error": {"code": code, "message": "quoted prompt"}}).decode() + "\n\n"
    with pytest.raises(error) as info:
        async for _ in engine._stream(served, vllm_sse(chunk("a"), event), "r2"):
            pass
    assert "quoted prompt" not in str(info.value)
    assert served.llm.aborted == [["chatcmpl-r2"]]  # not finished: the sequences are freed


async def test_vllm_stream_left_early_aborts():
    engine, served = engine_with_running("r3")
    stream = engine._stream(served, vllm_sse(chunk("a"), chunk("b"), "data: [DONE]\n\n"), "r3")
    assert (await stream.__anext__())["choices"][0]["delta"]["content"] == "a"
    await stream.aclose()
    assert served.llm.aborted == [["chatcmpl-r3"]]
