"""docs/protocol.md, length hiding, and the optional timing cover, against the echo node.

Padding: every stream event's plaintext is a multiple of 256 bytes and a non-streaming
answer's a 512 * 2^k bucket, whatever the token lengths; `stream_options.include_obfuscation:
false` turns it off; the engine never sees the request's padding; hashes, signatures and
receipts cover the padded bytes; coalesced events are padded after coalescing. Then the side
channel itself: a classifier that guesses each token's length from what an observer sees (the
size of each event on the wire) is measured against the best constant guess, with padding on
and off. Last, `limits.stream_cadence_ms`: events keep a fixed cadence whatever the engine does.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections import Counter
from typing import Any

import pytest
from server_support import (
    CONFIDENTIAL_CHAT,
    CONFIDENTIAL_COMPLETIONS,
    CONFIDENTIAL_EMBEDDINGS,
    SSE,
    GatedEcho,
    RaisingEcho,
    chat_body,
    completion_body,
    embedding_body,
    next_block,
)

from node.crypto import TAG_SIZE, b64d, b64e, blake2b_256
from node.envelope import PADDING_SECRET_SIZE
from node.keys import verify_sui_signature

OFF = {"include_obfuscation": False}


class Recording(GatedEcho):
    """The echo engine, keeping a copy of every request it is given."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.requests: list[dict[str, Any]] = []

    async def chat(self, request, request_id):
        self.requests.append(json.loads(json.dumps(request)))
        return await super().chat(request, request_id)

    async def complete(self, request, request_id):
        self.requests.append(json.loads(json.dumps(request)))
        return await super().complete(request, request_id)

    async def embed(self, request, request_id):
        self.requests.append(json.loads(json.dumps(request)))
        return await super().embed(request, request_id)


def words(rng: random.Random, count: int, lengths: range) -> list[str]:
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.choice(lengths))) for _ in range(count)]


async def stream(node, path: str, payload: dict[str, Any], padding: bool = False) -> tuple[SSE, list[bytes]]:
    """Post a sealed stream: its events and their plaintexts (every event opened and the receipt
    checked; with `padding` the request is padded and the opener requires padded events)."""
    outer, opener = node.seal(payload, padding=padding)
    response = await node.post(path, outer)
    assert response.status == 200, await response.text()
    sse = SSE.parse(await response.read())
    plaintexts = [opener.open_event(event) for event in sse.events]
    opener.finish()
    return sse, plaintexts


async def answer(node, path: str, payload: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    outer, opener = node.seal(payload)
    response = await node.post(path, outer)
    assert response.status == 200, await response.text()
    body = await response.json()
    return body, opener.open_response(body)


def ciphertext_size(message: dict[str, Any]) -> int:
    return len(b64d(message["ciphertext"])) - TAG_SIZE


def minimal_padded_size(padded: bytes, unit: int) -> int:
    """What length hiding asks for: the first multiple of 256 (`unit` 256) or the first 512 * 2^k
    bucket (`unit` 512) that holds the unpadded plaintext, the `obfuscation` field and the
    random part every pad starts with."""
    pad = json.loads(padded)["obfuscation"]
    smallest = len(padded) - len(pad) + 4 * math.ceil(PADDING_SECRET_SIZE / 3)
    if unit == 256:
        return -(-smallest // 256) * 256
    size = 512
    while size < smallest:
        size *= 2
    return size


# --- padding ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), [(CONFIDENTIAL_CHAT, chat_body), (CONFIDENTIAL_COMPLETIONS, completion_body)], ids=["chat", "completions"])
async def test_every_stream_event_is_padded_to_a_multiple_of_256(make_node, path, body):
    node = await make_node()
    rng = random.Random(1)
    # Tokens of 1 to 40 characters, and one of 300 that needs a second 256-byte block.
    prompt = " ".join(words(rng, 60, range(1, 41)) + ["y" * 300])
    sse, plaintexts = await stream(node, path, body(prompt, stream=True), padding=True)
    sizes = [ciphertext_size(event) for event in sse.events]
    assert all(size % 256 == 0 for size in sizes), sizes
    assert sizes == [len(p) for p in plaintexts]
    assert [size for size in sizes if size == sizes[0]] != sizes  # the long token took more blocks
    assert sizes == [minimal_padded_size(p, 256) for p in plaintexts]  # the next multiple, no more
    chunks = [json.loads(p) for p in plaintexts]
    assert all(isinstance(c["obfuscation"], str) for c in chunks)
    field = "delta" if path == CONFIDENTIAL_CHAT else None
    text = "".join((c["choices"][0][field].get("content", "") if field else c["choices"][0]["text"]) for c in chunks if c["choices"])
    assert text == prompt


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        (CONFIDENTIAL_CHAT, chat_body("short")),
        (CONFIDENTIAL_CHAT, chat_body(" ".join(["longer"] * 200))),
        (CONFIDENTIAL_COMPLETIONS, completion_body("short")),
        (CONFIDENTIAL_COMPLETIONS, completion_body(" ".join(["longer"] * 700))),
        (CONFIDENTIAL_EMBEDDINGS, embedding_body("short")),
        (CONFIDENTIAL_EMBEDDINGS, embedding_body(["a", "b", "c", "d", "e", "f"])),
    ],
    ids=["chat-short", "chat-long", "completions-short", "completions-long", "embeddings-one", "embeddings-six"],
)
async def test_non_streaming_answer_is_padded_to_a_bucket(make_node, path, payload):
    node = await make_node()
    body, plaintext = await answer(node, path, payload)
    size = ciphertext_size(body)
    assert size == len(plaintext)
    assert size >= 512 and size == 2 ** int(math.log2(size)), size
    assert size == minimal_padded_size(plaintext, 512)


async def test_padding_is_covered_by_hash_signature_and_receipt(make_node):
    node = await make_node()
    body, plaintext = await answer(node, CONFIDENTIAL_CHAT, chat_body("covered"))
    assert b'"obfuscation":"' in plaintext
    response_hash = b64d(body["response_hash"])
    assert blake2b_256(plaintext) == response_hash
    verify_sui_signature(body["signature"], response_hash, node.state.signer.public_key)
    assert body["receipt"]["transcript_hash"] == b64e(blake2b_256(response_hash))  # one answer, padded
    sse, plaintexts = await stream(node, CONFIDENTIAL_CHAT, chat_body("covered too", stream=True))
    for event, padded in zip(sse.events, plaintexts):
        assert b64d(event["response_hash"]) == blake2b_256(padded) and b'"obfuscation":"' in padded


async def test_include_obfuscation_false_turns_padding_off(make_node):
    engine = Recording()
    node = await make_node(engine)
    rng = random.Random(2)
    prompt = " ".join(words(rng, 30, range(1, 13)))
    sse, plaintexts = await stream(node, CONFIDENTIAL_CHAT, chat_body(prompt, stream=True, stream_options=OFF))
    assert all(b"obfuscation" not in p for p in plaintexts)
    sizes = {ciphertext_size(event) for event in sse.events}
    assert len(sizes) > 5  # the sizes follow the tokens again
    assert engine.requests[-1]["stream_options"] == {"include_usage": True}  # the node's option is the node's
    body, plaintext = await answer(node, CONFIDENTIAL_CHAT, chat_body(prompt, stream_options=OFF))
    assert b"obfuscation" not in plaintext and ciphertext_size(body) == len(plaintext)
    assert len(plaintext) & (len(plaintext) - 1)  # not a bucket: nothing was added
    body, plaintext = await answer(node, CONFIDENTIAL_EMBEDDINGS, {**embedding_body("x"), "stream_options": OFF})
    assert b"obfuscation" not in plaintext


async def test_the_engine_never_sees_the_request_padding(make_node):
    engine = Recording()
    node = await make_node(engine)
    for path, payload in [
        (CONFIDENTIAL_CHAT, chat_body("padded request")),
        (CONFIDENTIAL_CHAT, chat_body("padded request", stream=True, stream_options={"include_obfuscation": True})),
        (CONFIDENTIAL_COMPLETIONS, completion_body("padded request", stream=True)),
        (CONFIDENTIAL_EMBEDDINGS, embedding_body("padded request")),
    ]:
        outer, opener = node.seal(payload, padding=True)
        response = await node.post(path, outer)
        assert response.status == 200
        if payload.get("stream"):
            for event in SSE.parse(await response.read()).events:
                opener.open_event(event)
        else:
            opener.open_response(await response.json())
        seen = engine.requests[-1]
        assert "obfuscation" not in seen
        assert "include_obfuscation" not in (seen.get("stream_options") or {})
    assert len(engine.requests) == 4


async def test_coalesced_events_are_padded_after_coalescing(make_node):
    # The echo engine makes every chunk at once, so the writer finds many queued and merges them.
    node = await make_node(limits={"stream_coalesce_max": 16})
    prompt = " ".join(f"word{i:02d}" + "z" * 24 for i in range(64))
    sse, plaintexts = await stream(node, CONFIDENTIAL_CHAT, chat_body(prompt, stream=True), padding=True)
    assert len(sse.events) < 64
    sizes = [ciphertext_size(event) for event in sse.events]
    assert all(size % 256 == 0 for size in sizes) and max(sizes) > 256  # merged text, then padded
    text = "".join(json.loads(p)["choices"][0]["delta"].get("content", "") for p in plaintexts if json.loads(p)["choices"])
    assert text == prompt


# --- the side channel ---------------------------------------------------------------------------

TOKEN_LENGTHS = range(1, 13)
STREAMS, WORDS_PER_STREAM = 40, 30


async def observed_events(node, rng: random.Random, padding_off: bool) -> list[list[tuple[int, int]]]:
    """Per stream, (size of the event on the wire, length of its token) for every token event:
    what an observer of the encrypted stream sees, and what it wants to learn."""
    streams = []
    for _ in range(STREAMS):
        tokens = words(rng, WORDS_PER_STREAM, TOKEN_LENGTHS)
        extra = {"stream_options": OFF} if padding_off else {}
        outer, opener = node.seal(chat_body(" ".join(tokens), stream=True, **extra))
        response = await node.post(CONFIDENTIAL_CHAT, outer)
        assert response.status == 200
        raw = await response.read()
        blocks = [block + b"\n\n" for block in raw.split(b"\n\n") if block]
        pairs = []
        for block in blocks:
            chunk = json.loads(opener.open_event(json.loads(block[len(b"data: ") :])))
            if chunk["choices"]:
                content = chunk["choices"][0]["delta"]["content"]
                pairs.append((len(block), len(content.strip())))
        opener.finish()
        assert [length for _, length in pairs] == [len(t) for t in tokens]  # one event per token
        streams.append(pairs)
    return streams


def nearest_size_classifier(train: list[tuple[int, int]]):
    """For each event size seen in training, the most frequent token length; an unseen size takes
    the answer of the nearest seen size."""
    by_size: dict[int, Counter] = {}
    for size, length in train:
        by_size.setdefault(size, Counter())[length] += 1
    table = {size: counts.most_common(1)[0][0] for size, counts in by_size.items()}

    def predict(size: int) -> int:
        return table[min(table, key=lambda seen: (abs(seen - size), seen))]

    return predict


def accuracy_against_chance(streams: list[list[tuple[int, int]]]) -> tuple[float, float, float, int]:
    """(classifier accuracy, chance, standard error of chance, distinct sizes): trained on the first
    half of the streams, tested on the other half; chance is the best constant guess on the test
    half (its most frequent token length)."""
    half = len(streams) // 2
    train = [pair for s in streams[:half] for pair in s]
    test = [pair for s in streams[half:] for pair in s]
    predict = nearest_size_classifier(train)
    accuracy = sum(predict(size) == length for size, length in test) / len(test)
    chance = Counter(length for _, length in test).most_common(1)[0][1] / len(test)
    return accuracy, chance, math.sqrt(chance * (1 - chance) / len(test)), len({size for size, _ in train + test})


async def test_token_lengths_cannot_be_read_from_padded_event_sizes(make_node):
    node = await make_node()  # one event per engine chunk (stream_coalesce_max = 1): the worst case
    rng = random.Random(14)
    padded_streams = await observed_events(node, rng, padding_off=False)
    padded = accuracy_against_chance(padded_streams)
    unpadded = accuracy_against_chance(await observed_events(node, rng, padding_off=True))
    accuracy, chance, error, sizes = padded
    # Padded: no guess from the sizes beats the constant one. Every token event after the first
    # has one size on the wire; the echo engine's first chunk also carries the role, which makes
    # it cross 256 bytes for tokens of 3 characters or more (a boundary leaks, by design of
    # fixed-size padding; it is counted in the accuracy).
    assert len({size for events in padded_streams for size, _ in events[1:]}) == 1
    assert sizes == 2, padded
    assert accuracy <= chance + 3 * error, padded
    # Unpadded: the sizes give the lengths away (base64 rounds to 3 bytes, so a size names ~3 lengths).
    accuracy, chance, error, sizes = unpadded
    assert sizes >= len(TOKEN_LENGTHS) // 3, unpadded
    assert accuracy >= chance + 10 * error and accuracy >= 2 * chance, unpadded


# --- timing cover -------------------------------------------------------------------------------


async def test_cadence_sends_fillers_while_the_engine_is_silent(make_node):
    engine = GatedEcho()
    node = await make_node(engine, limits={"stream_cadence_ms": 20})
    engine.gate.clear()
    outer, opener = node.seal(chat_body("after the silence", stream=True), padding=True)
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    assert response.status == 200
    # No token exists yet, and events still come, each the size of a one-token event.
    for _ in range(3):
        event = json.loads((await next_block(response))[len(b"data: ") :])
        assert json.loads(opener.open_event(event))["choices"] == []
        assert ciphertext_size(event) == 256
    engine.gate.set()
    sse = SSE.parse(await response.read())
    assert not sse.comments  # no keep-alives needed: the stream is never silent
    chunks = [json.loads(opener.open_event(event)) for event in sse.events]
    assert opener.finish()["events"] == 3 + len(sse.events)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "after the silence"
    assert all(ciphertext_size(event) % 256 == 0 for event in sse.events)


async def test_cadence_merges_the_text_ready_at_each_tick(make_node):
    # The echo engine makes all 40 chunks at once: the first tick carries all the text, the
    # next one the usage chunk and the receipt.
    node = await make_node(limits={"stream_cadence_ms": 200})
    prompt = " ".join(f"w{i}" for i in range(40))
    sse, plaintexts = await stream(node, CONFIDENTIAL_CHAT, chat_body(prompt, stream=True), padding=True)
    chunks = [json.loads(p) for p in plaintexts]
    assert len(sse.events) == 2
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": prompt}
    assert chunks[0]["choices"][0]["finish_reason"] == "stop"
    assert chunks[1]["choices"] == [] and chunks[1]["usage"]["completion_tokens"] == 40


async def test_cadence_stream_ends_with_the_error_event_when_the_engine_fails(make_node):
    engine = RaisingEcho(RuntimeError("boom"))
    engine.fail_in_stream = True
    node = await make_node(engine, limits={"stream_cadence_ms": 10})
    outer, opener = node.seal(chat_body("a b c", stream=True))
    response = await node.post(CONFIDENTIAL_CHAT, outer, {"X-Request-Id": "cadence-failure"})
    sse = SSE.parse(await response.read())
    assert sse.events[-1] == {"error": {"code": "INTERNAL_ERROR", "message": "engine failed"}}
    # The engine request was aborted, under the node's own id (never the client's X-Request-Id).
    assert len(engine.aborted) == 1 and engine.aborted != ["cadence-failure"]
    await node.chat_ok()
