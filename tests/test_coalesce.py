"""Coalescing of queued engine chunks (node/server/coalesce.py) and its use on streams."""

from __future__ import annotations

import json

from server_support import CONFIDENTIAL_CHAT, SSE, chat_body, echo_engine

from node.server.coalesce import coalesce


def chat_chunk(content, *, role=None, finish=None, cid="c1", index=0, **choice_extra):
    delta = {"content": content} if role is None else {"role": role, "content": content}
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish, **choice_extra}],
    }


def text_chunk(text, finish=None):
    return {"id": "t", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def test_run_of_deltas_becomes_one_chunk_with_the_role_and_last_finish_reason():
    chunks = [chat_chunk("", role="assistant"), chat_chunk("Paris"), chat_chunk(" is", finish=None), chat_chunk(".", finish="stop")]
    (merged,) = coalesce(chunks, 16)
    choice = merged["choices"][0]
    assert choice["delta"] == {"role": "assistant", "content": "Paris is."}
    assert choice["finish_reason"] == "stop"
    assert {k: merged[k] for k in ("id", "object", "created", "model")} == {
        "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Paris"}  # inputs are not mutated


def test_text_completion_chunks_merge():
    (merged,) = coalesce([text_chunk("a"), text_chunk(" b"), text_chunk(" c", "length")], 8)
    assert merged["choices"][0]["text"] == "a b c" and merged["choices"][0]["finish_reason"] == "length"


def test_limit_bounds_chunks_per_event():
    chunks = [chat_chunk(str(i)) for i in range(10)]
    merged = coalesce(chunks, 4)
    assert [c["choices"][0]["delta"]["content"] for c in merged] == ["0123", "4567", "89"]
    assert coalesce(chunks, 1) == chunks


def test_nothing_but_text_is_merged():
    usage = {**chat_chunk("x"), "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    cases = {
        "after finish": [chat_chunk("a", finish="stop"), chat_chunk("b")],
        "usage chunk": [chat_chunk("a"), usage],
        "logprobs": [chat_chunk("a"), chat_chunk("b", logprobs={"content": []})],
        "tool call": [chat_chunk("a"), {**chat_chunk("b"), "choices": [{"index": 0, "delta": {"tool_calls": []}, "finish_reason": None}]}],
        "other choice": [chat_chunk("a"), chat_chunk("b", index=1)],
        "other id": [chat_chunk("a"), chat_chunk("b", cid="c2")],
        "second role": [chat_chunk("a"), chat_chunk("b", role="assistant")],
        "two choices": [chat_chunk("a"), {**chat_chunk("b"), "choices": chat_chunk("b")["choices"] * 2}],
        "chat then text": [chat_chunk("a"), text_chunk("b")],
    }
    for name, chunks in cases.items():
        assert coalesce(chunks, 16) == chunks, name


async def test_a_stream_that_falls_behind_is_coalesced_and_still_verifies(make_node):
    # The echo engine makes every chunk at once, so the writer always finds many queued.
    node = await make_node(limits={"stream_coalesce_max": 16})
    prompt = " ".join(f"w{i}" for i in range(100))
    outer, opener = node.seal(chat_body(prompt, stream=True))
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    sse = SSE.parse(await response.read())
    chunks = [json.loads(opener.open_event(e)) for e in sse.events]
    receipt = opener.finish()
    assert len(sse.events) < 100 and receipt["events"] == len(sse.events)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == prompt
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 100  # usage counts engine tokens, not events


async def test_a_stream_that_keeps_up_gets_one_event_per_chunk(make_node):
    # A slow engine: every chunk is written before the next exists, so nothing is merged.
    node = await make_node(engine=echo_engine(token_delay=0.01), limits={"stream_coalesce_max": 16})
    outer, opener = node.seal(chat_body("one two three four", stream=True))
    sse = SSE.parse(await (await node.post(CONFIDENTIAL_CHAT, outer)).read())
    for event in sse.events:
        opener.open_event(event)
    assert opener.finish()["events"] == len(sse.events) == 5
