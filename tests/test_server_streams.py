"""Confidential streams: per-event nonces and signatures, receipts over the transcript, usage in
clear, no [DONE], keep-alives, client disconnects, engine failures, and the plain routes."""

from __future__ import annotations

import asyncio
import json

import pytest
from server_support import (
    CONFIDENTIAL_CHAT,
    CONFIDENTIAL_COMPLETIONS,
    MODEL,
    SSE,
    GatedEcho,
    chat_body,
    compact,
    completion_body,
    embedding_body,
    next_block,
    seal_with_secrets,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from node import envelope
from node.crypto import Aead, b64d, blake2b_256
from node.errors import EventAfterEnd, MissingReceipt, ReceiptInvalid, TranscriptMismatch
from node.keys import verify_sui_signature
from node.protocol import Usage

PROMPT = "one two three four five six"


async def sealed_stream(node, payload, path=CONFIDENTIAL_CHAT, headers=None):
    """Post a stream sealed with known secrets: (response SSE, Sealed)."""
    sealed = seal_with_secrets(compact(payload), node.current_key, payload["model"], stream=True)
    response = await node.post(path, sealed.outer, headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return SSE.parse(await response.read()), sealed


def fresh_opener(node, sealed):
    return envelope.ResponseOpener(Aead(sealed.aes_key), sealed.opener.request_hash, node.state.signer.public_key)


def open_all(opener, events):
    chunks = [json.loads(opener.open_event(e)) for e in events]
    return chunks, opener.finish()


async def test_stream_events_are_sealed_signed_and_receipted(node_client):
    sse, sealed = await sealed_stream(node_client, chat_body(PROMPT, stream=True))
    assert b"[DONE]" not in sse.raw
    events = sse.events
    assert len(events) == len(PROMPT.split()) + 1  # one per word, then the usage chunk
    nonces = [e["nonce"] for e in events]
    assert len(set(nonces)) == len(nonces)
    assert all(len(b64d(n)) == 12 for n in nonces)
    signing_key = node_client.state.signer.public_key
    for event in events:
        assert {"ciphertext", "nonce", "response_hash", "signature"} <= set(event)
        assert verify_sui_signature(event["signature"], b64d(event["response_hash"])) == signing_key
    assert all("receipt" not in e for e in events[:-1])

    chunks, receipt = open_all(fresh_opener(node_client, sealed), events)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == PROMPT
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 6

    hashes = [b64d(e["response_hash"]) for e in events]
    assert receipt == envelope.verify_receipt(
        events[-1]["receipt"], signing_key=signing_key, request_hash=sealed.opener.request_hash, response_hashes=hashes
    )
    assert receipt["events"] == len(events)
    assert receipt["model"] == MODEL
    assert receipt["key_epoch"] == node_client.state.keyring.current.epoch
    assert b64d(receipt["transcript_hash"]) == envelope.transcript_hash(hashes)
    # usage in clear: only the event carrying it (the final one) and it matches the receipt
    assert all("usage" not in e for e in events[:-1])
    exact = Usage.from_openai(chunks[-1]["usage"]).model_dump()
    assert events[-1]["usage"] == receipt["usage"] == envelope.usage_in_clear(exact, "bucketed")


async def test_completions_stream(node_client):
    sse, sealed = await sealed_stream(node_client, completion_body("red green blue", stream=True), CONFIDENTIAL_COMPLETIONS)
    chunks, receipt = open_all(fresh_opener(node_client, sealed), sse.events)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "red green blue"
    assert receipt["events"] == 4
    assert b"[DONE]" not in sse.raw


@pytest.mark.parametrize(
    "tamper",
    [
        lambda ev: ev[:1] + ev[2:],  # drop an event
        lambda ev: [ev[1], ev[0], *ev[2:]],  # reorder two events
        lambda ev: ev[:-3] + [ev[-2], ev[-3], ev[-1]],  # reorder near the end
        lambda ev: [ev[0], *ev],  # duplicate an event
    ],
    ids=["drop", "swap-first", "swap-last", "duplicate"],
)
async def test_tampered_transcript_fails_receipt(node_client, tamper):
    sse, sealed = await sealed_stream(node_client, chat_body(PROMPT, stream=True))
    opener = fresh_opener(node_client, sealed)
    events = tamper(sse.events)
    with pytest.raises(TranscriptMismatch):
        for event in events:
            opener.open_event(event)
    hashes = [b64d(e["response_hash"]) for e in events]
    with pytest.raises(ReceiptInvalid):
        envelope.verify_receipt(
            sse.events[-1]["receipt"],
            signing_key=node_client.state.signer.public_key,
            request_hash=sealed.opener.request_hash,
            response_hashes=hashes,
        )


async def test_truncated_stream_has_no_receipt(node_client):
    sse, sealed = await sealed_stream(node_client, chat_body(PROMPT, stream=True))
    for cut in (0, 1, len(sse.events) - 1):
        opener = fresh_opener(node_client, sealed)
        for event in sse.events[:cut]:
            opener.open_event(event)
        with pytest.raises(MissingReceipt):
            opener.finish()
    # and nothing may follow the receipt
    opener = fresh_opener(node_client, sealed)
    open_all(opener, sse.events)
    with pytest.raises(EventAfterEnd):
        opener.open_event(sse.events[-1])


async def test_receipt_of_another_request_fails(node_client):
    sse_a, sealed_a = await sealed_stream(node_client, chat_body("alpha request", stream=True))
    sse_b, sealed_b = await sealed_stream(node_client, chat_body("alpha request", stream=True))
    with pytest.raises(ReceiptInvalid):
        envelope.verify_receipt(
            sse_b.events[-1]["receipt"],
            signing_key=node_client.state.signer.public_key,
            request_hash=b"\x00" * 32,
            response_hashes=[b64d(e["response_hash"]) for e in sse_b.events],
        )
    # a's receipt does not cover b's events (same plaintext, fresh nonces, different transcript)
    with pytest.raises(ReceiptInvalid):
        envelope.verify_receipt(
            sse_a.events[-1]["receipt"],
            signing_key=node_client.state.signer.public_key,
            request_hash=sealed_a.opener.request_hash,
            response_hashes=[b64d(e["response_hash"]) for e in sse_b.events],
        )


class ContinuousUsageEcho(GatedEcho):
    """An engine reporting usage from its second chunk on (vLLM's continuous usage stats)."""

    async def chat(self, request, request_id):
        async def chunks():
            base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
            yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}}]}
            for n, word in enumerate((" b", " c"), start=2):
                usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
                yield {**base, "choices": [{"index": 0, "delta": {"content": word}}], "usage": usage}
            yield {**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}

        self._model(request, "chat")
        return chunks()


async def test_usage_in_clear_from_the_first_event_that_has_it(make_node):
    node = await make_node(ContinuousUsageEcho(), privacy={"clear_usage": "exact"})
    sse, sealed = await sealed_stream(node, chat_body("a b c", stream=True))
    chunks, receipt = open_all(fresh_opener(node, sealed), sse.events)
    assert len(sse.events) == 4
    assert "usage" not in sse.events[0] and "usage" not in chunks[0]
    for event, chunk in zip(sse.events[1:], chunks[1:]):
        assert event["usage"] == Usage.from_openai(chunk["usage"]).model_dump()
    assert [e["usage"]["completion_tokens"] for e in sse.events[1:]] == [2, 3, 3]
    assert receipt["usage"] == sse.events[-1]["usage"]


async def test_engine_asked_for_usage_on_streams(make_node):
    seen = []

    class Spy(GatedEcho):
        async def chat(self, request, request_id):
            seen.append(dict(request))
            return await super().chat(request, request_id)

    node = await make_node(Spy())
    await sealed_stream(node, chat_body("x y", stream=True, stream_options={"include_usage": False, "other": 1}))
    assert seen[-1]["stream_options"] == {"include_usage": True, "other": 1}
    # non-streaming: stream false and no stream_options reach the engine
    await node.call(CONFIDENTIAL_CHAT, chat_body("x y", stream_options={"include_usage": True}))
    assert seen[-1]["stream"] is False and "stream_options" not in seen[-1]


async def test_stream_decided_by_the_plaintext(node_client):
    # outer says stream, plaintext does not: one sealed JSON response
    outer, opener = node_client.seal(chat_body("inner decides"), stream=True)
    response = await node_client.post(CONFIDENTIAL_CHAT, outer)
    assert response.headers["Content-Type"].startswith("application/json")
    opener.open_response(await response.json())
    # plaintext says stream, outer does not: a stream
    outer, opener = node_client.seal(chat_body("inner decides", stream=True), stream=False)
    response = await node_client.post(CONFIDENTIAL_CHAT, outer)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    for event in SSE.parse(await response.read()).events:
        opener.open_event(event)
    opener.finish()


async def test_keepalive_comments_during_silence(make_node):
    engine = GatedEcho()
    node = await make_node(engine, limits={"keepalive_interval": 0.02})
    engine.gate.clear()
    outer, opener = node.seal(chat_body("after the silence", stream=True))
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    assert response.status == 200
    # the engine is blocked: only keep-alive comments can arrive
    assert await next_block(response) == b": keep-alive\n\n"
    assert await next_block(response) == b": keep-alive\n\n"
    engine.gate.set()
    sse = SSE.parse(await response.read())
    assert all(c == ": keep-alive" for c in sse.comments)
    for event in sse.events:
        opener.open_event(event)
    assert opener.finish()["events"] == len(sse.events) == 4


@pytest.mark.parametrize("handler_cancellation", [False, True], ids=["noticed-on-write", "handler-cancelled"])
async def test_client_disconnect_aborts_engine_request(make_node, handler_cancellation):
    engine = GatedEcho(token_delay=0.01)
    node = await make_node(engine, handler_cancellation=handler_cancellation)
    outer, opener = node.seal(chat_body(" ".join(f"w{i}" for i in range(2000)), stream=True))
    response = await node.post(CONFIDENTIAL_CHAT, outer, {"X-Request-Id": "disconnecting-client"})
    assert response.status == 200
    opener.open_event(json.loads((await next_block(response))[len(b"data: ") :]))
    await wait_for(lambda: len(engine.running) == 1, what="engine request running")
    (engine_id,) = engine.running
    assert engine_id != "disconnecting-client"  # the node's own id, never the client's
    response.close()
    await wait_for(lambda: not engine.running, what="engine request aborted")
    assert engine.aborted == [engine_id]
    await wait_for(lambda: node.state.admission.in_flight == 0, what="slot released")
    metrics = await (await node.client.get("/metrics")).text()
    samples = {
        (s.labels.get("route"), s.labels.get("status")): s.value
        for f in text_string_to_metric_families(metrics)
        if f.name == "tee_node_requests"
        for s in f.samples
        if s.name == "tee_node_requests_total"
    }
    assert samples[(CONFIDENTIAL_CHAT, "499")] == 1
    await node.chat_ok()


async def test_finished_stream_is_not_aborted(make_node):
    engine = GatedEcho()
    node = await make_node(engine)
    await sealed_stream(node, chat_body("a b c", stream=True))
    assert engine.aborted == [] and not engine.running


async def test_engine_failure_mid_stream(make_node):
    engine = GatedEcho(fail_after_tokens=2)
    node = await make_node(engine)
    sealed = seal_with_secrets(compact(chat_body(PROMPT, stream=True)), node.current_key, MODEL, stream=True)
    response = await node.post(CONFIDENTIAL_CHAT, sealed.outer)
    assert response.status == 200
    sse = SSE.parse(await response.read())
    *events, last = sse.events
    assert len(events) == 2
    opener = fresh_opener(node, sealed)
    for event in events:
        opener.open_event(event)
    assert last == {"error": {"code": "INTERNAL_ERROR", "message": "engine failed"}}
    with pytest.raises(MissingReceipt):
        opener.finish()
    assert (await node.client.get("/ready")).status == 503
    outer, _ = node.seal(chat_body("after failure"))
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "NOT_READY"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
async def test_plain_routes_off_by_default_say_so(node_client, path):
    response = await node_client.client.post(path, json=chat_body("plain"))
    assert response.status == 404
    error = (await response.json())["error"]
    assert error["code"] == "PLAINTEXT_DISABLED" and "allow_plaintext" in error["message"]


async def test_plain_routes_with_allow_plaintext(make_node):
    node = await make_node(allow_plaintext=True)
    response = await node.client.post("/v1/chat/completions", json=chat_body("plain text chat"))
    assert response.status == 200
    assert (await response.json())["choices"][0]["message"]["content"] == "plain text chat"

    response = await node.client.post("/v1/chat/completions", json=chat_body("plain text stream", stream=True))
    assert response.headers["Content-Type"].startswith("text/event-stream")
    sse = SSE.parse(await response.read())
    assert sse.events[-1] == "[DONE]"
    chunks = sse.events[:-1]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == "plain text stream"
    assert chunks[-1]["usage"]["completion_tokens"] == 3  # include_usage forced
    assert all("ciphertext" not in c for c in chunks)

    response = await node.client.post("/v1/completions", json=completion_body("plain completion", stream=True))
    sse = SSE.parse(await response.read())
    assert sse.events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in sse.events[:-1] if c["choices"]) == "plain completion"

    response = await node.client.post("/v1/embeddings", json=embedding_body("plain"))
    assert response.status == 200
    assert len((await response.json())["data"]) == 1

    response = await node.client.post("/v1/chat/completions", json={"model": MODEL})
    assert response.status == 400
    response = await node.client.post("/v1/chat/completions", json=chat_body("x", model="nope"))
    assert response.status == 404
    # the confidential routes still work beside them
    await node.chat_ok()


async def test_response_hash_is_of_the_exact_plaintext(node_client):
    sse, sealed = await sealed_stream(node_client, chat_body("hash me", stream=True))
    aead = Aead(sealed.aes_key)
    for event in sse.events:
        plaintext = aead.decrypt(b64d(event["nonce"]), b64d(event["ciphertext"]))
        assert blake2b_256(plaintext) == b64d(event["response_hash"])


class NoUsageEcho(GatedEcho):
    """An engine that ignores include_usage (some upstream servers), or yields nothing at all."""

    def __init__(self, words: list[str]) -> None:
        super().__init__()
        self.words = words

    async def chat(self, request, request_id):
        async def chunks():
            for i, word in enumerate(self.words):
                delta = {"content": word if i == 0 else " " + word}
                yield {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": MODEL, "choices": [{"index": 0, "delta": delta}]}

        self._model(request, "chat")
        return chunks()


@pytest.mark.parametrize("words", [["no", "usage", "here"], []], ids=["without-usage", "empty"])
async def test_stream_without_usage_chunk_still_ends_with_receipt(make_node, words):
    node = await make_node(NoUsageEcho(words))
    sse, sealed = await sealed_stream(node, chat_body("no usage here", stream=True))
    chunks, receipt = open_all(fresh_opener(node, sealed), sse.events)
    assert len(sse.events) == len(words) + 1
    assert receipt["events"] == len(sse.events) and receipt["usage"] is None
    assert chunks[-1]["choices"] == []
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1]) == " ".join(words)
    if words:
        assert {k: chunks[-1][k] for k in ("id", "object", "created", "model")} == {k: chunks[0][k] for k in ("id", "object", "created", "model")}


class SteppedEcho(GatedEcho):
    """Chunk 1 at once; chunks 2 and 3 together once `gate_a` opens; then waits on `gate_b`."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_a = asyncio.Event()
        self.gate_b = asyncio.Event()
        self.closed: list[str] = []

    async def chat(self, request, request_id):
        if not request.get("stream"):
            return await super().chat(request, request_id)
        self._model(request, "chat")

        async def chunks():
            self.running.add(request_id)
            try:
                base = {"id": "s", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
                yield {**base, "choices": [{"index": 0, "delta": {"content": "one"}}]}
                await self.gate_a.wait()
                yield {**base, "choices": [{"index": 0, "delta": {"content": " two"}}]}
                yield {**base, "choices": [{"index": 0, "delta": {"content": " three"}}]}
                await self.gate_b.wait()
                yield {**base, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3}}
            finally:
                self.running.discard(request_id)
                self.closed.append(request_id)

        return chunks()


async def test_client_gone_while_events_wait_to_be_written(make_node):
    """The client goes away; the engine then has two chunks ready and waits for a third: the
    write of the ready events fails while the next engine step is under way. That step must be
    closed too, so the engine request ends (not left suspended forever)."""
    engine = SteppedEcho()
    node = await make_node(engine)
    outer, opener = node.seal(chat_body("one two three", stream=True))
    response = await node.post(CONFIDENTIAL_CHAT, outer, {"X-Request-Id": "gone-client"})
    opener.open_event(json.loads((await next_block(response))[len(b"data: ") :]))
    response.close()
    connections = node.client.server.runner.server.connections
    await wait_for(lambda: all(h.transport is None for h in connections), what="server saw the disconnect")
    engine.gate_a.set()
    await wait_for(lambda: len(engine.closed) == 1, what="engine request closed")
    assert not engine.running
    assert engine.aborted == engine.closed and engine.closed != ["gone-client"]
    await wait_for(lambda: node.state.admission.in_flight == 0, what="slot released")
    await node.chat_ok()


async def test_same_request_id_streams_are_isolated(make_node):
    """Two concurrent streams with the same X-Request-Id: each gets its own engine request, and
    one client hanging up aborts only its own; the other ends with a verified receipt."""
    engine = GatedEcho(token_delay=0.01)
    node = await make_node(engine)
    headers = {"X-Request-Id": "shared-id"}
    words = " ".join(f"w{i}" for i in range(30))
    outer_a, opener_a = node.seal(chat_body("a " + words, stream=True))
    outer_b, opener_b = node.seal(chat_body("b " + words, stream=True))
    response_a = await node.post(CONFIDENTIAL_CHAT, outer_a, headers)
    response_b = await node.post(CONFIDENTIAL_CHAT, outer_b, headers)
    assert response_a.headers["X-Request-Id"] == response_b.headers["X-Request-Id"] == "shared-id"
    first_a = json.loads(opener_a.open_event(json.loads((await next_block(response_a))[len(b"data: ") :])))
    first_b = json.loads(opener_b.open_event(json.loads((await next_block(response_b))[len(b"data: ") :])))
    await wait_for(lambda: len(engine.running) == 2, what="both engine requests running")
    assert "shared-id" not in engine.running
    engine_id_a = first_a["id"].removeprefix("chatcmpl-")  # the echo engine names chunks by engine id
    response_a.close()
    await wait_for(lambda: engine.aborted == [engine_id_a], what="the hung-up stream aborted")
    sse = SSE.parse(await response_b.read())
    chunks = [first_b] + [json.loads(opener_b.open_event(event)) for event in sse.events]
    receipt = opener_b.finish()
    assert receipt["events"] == len(chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == "b " + words
    assert engine.aborted == [engine_id_a]
    await wait_for(lambda: node.state.admission.in_flight == 0, what="slots released")
