"""A tampering proxy between node.client and the node: every change is caught, no tampered text
is ever returned.

The proxy (an aiohttp server written here) forwards to a real echo node and can rewrite the
attestation document, the sealed response or the events of a stream. For streams, chunks
before the tamper point are the node's authentic chunks and may be yielded; the stream must
raise before it completes, and must never yield the tampered event's content.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from test_client import MODEL, RunningNode, chat_messages  # noqa: F401  (fixtures below)
from test_client import node, servers, start_node  # noqa: F401

from attestation import binding
from attestation.errors import DocumentInvalid, NonceMismatch, ReportDataMismatch, SignatureInvalid
from node.client import (
    BadSignature,
    ConfidentialClient,
    DuplicateEvent,
    EventAfterEnd,
    InternalServerError,
    MissingField,
    MissingReceipt,
    ReceiptInvalid,
    ResponseDecryptionFailed,
    ResponseHashMismatch,
    StaleNodeKeyError,
    TranscriptMismatch,
    UsageMismatch,
)
from node.keys import Signer

WORDS = [f"w{i}" for i in range(6)]
PROMPT = " ".join(WORDS)
LEGIT_CHUNKS = [w if i == 0 else " " + w for i, w in enumerate(WORDS)]  # then the usage chunk
TAMPERED = "TAMPERED"

Events = list[dict[str, Any]]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _flip(text: str, index: int = 0) -> str:
    data = bytearray(_unb64(text))
    data[index] ^= 0x01
    return _b64(bytes(data))


def _x25519_public() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class TamperProxy:
    """Forwards everything to the node; the hooks rewrite what comes back."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.on_document: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.on_body: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.on_events: Callable[[Events], Events] | None = None
        self.on_stream_bytes: Callable[[bytes], bytes] | None = None
        self.on_post: Callable[[dict[str, Any]], web.Response | None] | None = None
        self.documents: list[dict[str, Any]] = []  # every genuine document seen
        self.bodies: list[dict[str, Any]] = []  # every genuine sealed response seen
        self.streams: list[Events] = []  # every genuine stream seen
        self.posts: list[dict[str, Any]] = []  # every confidential request forwarded
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)

        async def close(_: web.Application) -> None:
            if self._session is not None:
                await self._session.close()

        app.on_cleanup.append(close)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        data = await request.read()
        if request.method == "POST" and request.path.startswith("/v1/confidential/"):
            outer = json.loads(data)
            if self.on_post is not None:
                forged = self.on_post(outer)
                if forged is not None:
                    return forged
            self.posts.append(outer)
        headers = {k: v for k, v in request.headers.items() if k in ("Authorization", "Content-Type", "Accept")}
        async with self._session.request(request.method, self.upstream + request.path_qs, data=data, headers=headers) as up:
            raw = await up.read()
            status, content_type = up.status, up.headers.get("Content-Type", "")
            passed = {k: v for k, v in up.headers.items() if k in ("Retry-After", "X-Request-Id")}
        if content_type.startswith("text/event-stream"):
            events = [json.loads(block[len(b"data: ") :]) for block in raw.split(b"\n\n") if block.startswith(b"data: ")]
            self.streams.append(copy.deepcopy(events))
            if self.on_events is not None:
                events = self.on_events(events)
            body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
            if self.on_stream_bytes is not None:
                body = self.on_stream_bytes(body)
            response = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream", **passed})
            await response.prepare(request)
            await response.write(body)
            await response.write_eof()
            return response
        if status == 200 and content_type.startswith("application/json"):
            obj = json.loads(raw)
            if request.path == "/v1/attestation":
                self.documents.append(copy.deepcopy(obj))
                if self.on_document is not None:
                    obj = self.on_document(obj)
            elif request.path.startswith("/v1/confidential/"):
                self.bodies.append(copy.deepcopy(obj))
                if self.on_body is not None:
                    obj = self.on_body(obj)
            raw = json.dumps(obj).encode()
        return web.Response(status=status, body=raw, content_type=content_type.split(";")[0] or None, headers=passed)


@pytest.fixture
def proxy(node: RunningNode) -> TamperProxy:  # noqa: F811
    tamper = TamperProxy(node.url)
    tamper.url = node.servers.serve(tamper.app())
    return tamper


@pytest.fixture
async def client(proxy: TamperProxy):
    async with ConfidentialClient(proxy.url, allow_simulated=True) as c:
        yield c


async def _stream_texts(
    client: ConfidentialClient, expected: type[BaseException], receipt_event: bool = True
) -> tuple[list[str], Any]:
    """Run a chat stream through the proxy; it must raise `expected`. Returns the texts yielded.

    The chunk of the event carrying the receipt is released only after the whole stream
    verified, so on failure it is never yielded (`receipt_event=False`: no event carries one).
    """
    stream = await client.chat.completions.create(model=MODEL, messages=chat_messages(PROMPT), stream=True)
    texts: list[str] = []
    with pytest.raises(expected):
        async for chunk in stream:
            texts.append(chunk.choices[0].delta.content if chunk.choices else "<usage>")
    assert not stream.completed and stream.receipt is None
    if receipt_event:
        assert "<usage>" not in texts
    return texts, stream


async def _legit_stream(client: ConfidentialClient) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=chat_messages(PROMPT), stream=True)
    assert [c.choices[0].delta.content for c in [c async for c in stream] if c.choices] == LEGIT_CHUNKS


def _other_signer_signature(response_hash_b64: str) -> str:
    return Signer.generate().sign_b64(_unb64(response_hash_b64))


# --- streams --------------------------------------------------------------------------------


async def test_untampered_stream_through_proxy_verifies(client, proxy):
    await _legit_stream(client)
    assert len(proxy.streams) == 1 and len(proxy.streams[0]) == len(WORDS) + 1


@pytest.mark.parametrize(
    "name, mutate, error",
    [
        ("flip ciphertext", lambda ev: ev[2].update(ciphertext=_flip(ev[2]["ciphertext"], 3)), ResponseDecryptionFailed),
        ("flip tag", lambda ev: ev[2].update(ciphertext=_flip(ev[2]["ciphertext"], -1)), ResponseDecryptionFailed),
        ("flip nonce", lambda ev: ev[2].update(nonce=_flip(ev[2]["nonce"])), ResponseDecryptionFailed),
        ("flip response_hash", lambda ev: ev[2].update(response_hash=_flip(ev[2]["response_hash"])), ResponseHashMismatch),
        ("re-signed by another key", lambda ev: ev[2].update(signature=_other_signer_signature(ev[2]["response_hash"])), BadSignature),
        ("signature stripped", lambda ev: ev[2].pop("signature"), MissingField),
    ],
)
async def test_tampered_event_never_yielded(client, proxy, name, mutate, error):
    proxy.on_events = lambda events: (mutate(events), events)[1]
    texts, _ = await _stream_texts(client, error)
    assert texts == LEGIT_CHUNKS[:2]  # the authentic prefix, never the tampered event or later ones


async def test_spliced_event_from_another_stream(client, proxy):
    await _legit_stream(client)
    other = proxy.streams[0]

    def splice(events: Events) -> Events:
        events[2] = copy.deepcopy(other[2])  # same node, same signing key, another request's key
        return events

    proxy.on_events = splice
    texts, _ = await _stream_texts(client, ResponseDecryptionFailed)
    assert texts == LEGIT_CHUNKS[:2]


async def test_dropped_event(client, proxy):
    proxy.on_events = lambda events: events[:3] + events[4:]
    texts, _ = await _stream_texts(client, TranscriptMismatch)
    assert texts == LEGIT_CHUNKS[:3] + LEGIT_CHUNKS[4:]


async def test_reordered_events(client, proxy):
    proxy.on_events = lambda events: events[:2] + [events[3], events[2]] + events[4:]
    texts, _ = await _stream_texts(client, TranscriptMismatch)
    assert sorted(texts) == sorted(LEGIT_CHUNKS)  # authentic chunks only, and the stream fails


async def test_receipt_event_moved_before_the_end(client, proxy):
    proxy.on_events = lambda events: events[:4] + [events[-1]] + events[4:-1]
    texts, _ = await _stream_texts(client, TranscriptMismatch)  # a transcript of 5 events, not 7
    assert texts == LEGIT_CHUNKS[:4]


async def test_duplicated_event(client, proxy):
    proxy.on_events = lambda events: events[:3] + [copy.deepcopy(events[2])] + events[3:]
    texts, _ = await _stream_texts(client, DuplicateEvent)
    assert texts == LEGIT_CHUNKS[:3]  # the duplicate is refused before it is yielded


async def test_duplicated_final_event(client, proxy):
    proxy.on_events = lambda events: events + [copy.deepcopy(events[-1])]
    texts, _ = await _stream_texts(client, EventAfterEnd)
    assert texts == LEGIT_CHUNKS


async def test_event_from_another_stream_after_the_end(client, proxy):
    await _legit_stream(client)
    other = proxy.streams[0]
    proxy.on_events = lambda events: events + [copy.deepcopy(other[1])]
    texts, _ = await _stream_texts(client, EventAfterEnd)
    assert texts == LEGIT_CHUNKS


async def test_truncated_stream(client, proxy):
    proxy.on_events = lambda events: events[:5]
    texts, _ = await _stream_texts(client, MissingReceipt)
    assert texts == LEGIT_CHUNKS[:5]


async def test_stream_cut_inside_the_final_event(client, proxy):
    proxy.on_stream_bytes = lambda body: body[: body.rindex(b"data: ") + 40]
    texts, _ = await _stream_texts(client, MissingReceipt)
    assert texts == LEGIT_CHUNKS


async def test_receipt_stripped(client, proxy):
    proxy.on_events = lambda events: (events[-1].pop("receipt"), events)[1]
    texts, _ = await _stream_texts(client, MissingReceipt, receipt_event=False)
    assert texts == LEGIT_CHUNKS + ["<usage>"]  # authentic chunks, then the error instead of the end


async def test_receipt_altered(client, proxy):
    def alter(events: Events) -> Events:
        events[-1]["receipt"]["events"] = 3  # claims fewer events: the signature breaks
        return events

    proxy.on_events = alter
    await _stream_texts(client, ReceiptInvalid)


async def test_clear_usage_altered(client, proxy):
    def alter(events: Events) -> Events:
        events[-1]["usage"] = {**events[-1]["usage"], "completion_tokens": 1000, "total_tokens": 1000}
        return events

    proxy.on_events = alter
    texts, _ = await _stream_texts(client, UsageMismatch)
    assert texts == LEGIT_CHUNKS


async def test_injected_error_event(client, proxy):
    proxy.on_events = lambda events: events[:2] + [{"error": {"code": "INTERNAL_ERROR", "message": TAMPERED}}]
    texts, _ = await _stream_texts(client, InternalServerError)
    assert texts == LEGIT_CHUNKS[:2]


# --- non-streaming responses -------------------------------------------------------------------


async def _call(client: ConfidentialClient, error: type[BaseException]) -> None:
    with pytest.raises(error) as info:
        await client.chat.completions.create(model=MODEL, messages=chat_messages(PROMPT))
    assert PROMPT not in str(info.value)


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda b: b.update(ciphertext=_flip(b["ciphertext"], 5)), ResponseDecryptionFailed),
        (lambda b: b.update(nonce=_flip(b["nonce"])), ResponseDecryptionFailed),
        (lambda b: b.update(response_hash=_flip(b["response_hash"])), ResponseHashMismatch),
        (lambda b: b.update(signature=_other_signer_signature(b["response_hash"])), BadSignature),
        (lambda b: b.pop("receipt"), MissingReceipt),
        (lambda b: b["receipt"].update(events=2), ReceiptInvalid),
        (lambda b: b["receipt"].update(signature=_other_signer_signature(b["response_hash"])), ReceiptInvalid),
        (lambda b: b.update(usage={**b["usage"], "prompt_tokens": 0}), UsageMismatch),
    ],
)
async def test_tampered_response(client, proxy, mutate, error):
    proxy.on_body = lambda body: (mutate(body), body)[1]
    await _call(client, error)


async def test_replayed_old_response(client, proxy):
    first = await client.chat.completions.create(model=MODEL, messages=chat_messages("first answer"))
    assert first.choices[0].message.content == "first answer"
    old = proxy.bodies[0]
    proxy.on_body = lambda body: copy.deepcopy(old)
    await _call(client, ResponseDecryptionFailed)  # sealed to another request's key


async def test_old_receipt_on_new_response(client, proxy):
    await client.chat.completions.create(model=MODEL, messages=chat_messages(PROMPT))
    old_receipt = proxy.bodies[0]["receipt"]
    proxy.on_body = lambda body: {**body, "receipt": copy.deepcopy(old_receipt)}
    await _call(client, ReceiptInvalid)  # signed by the node, but for another request


# --- attestation ------------------------------------------------------------------------------


def _swap_keys(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "dh_public_key": _b64(_x25519_public()), "signing_public_key": Signer.generate().public_key_b64}


def _swap_keys_and_report_data(doc: dict[str, Any]) -> dict[str, Any]:
    """An attacker's keys with a report_data recomputed to match: the quote still binds the node's."""
    doc = _swap_keys(doc)
    doc["report_data"] = binding.report_data(
        nonce=bytes.fromhex(doc["nonce"]),
        dh_public_key=_unb64(doc["dh_public_key"]),
        signing_public_key=_unb64(doc["signing_public_key"]),
        key_epoch=doc["key_epoch"],
        config_digest=bytes.fromhex(doc["config_digest"]),
        gpu_evidence=doc["gpu_evidence"],
        kem_public_key=_unb64(doc["kem_public_key"]) if doc["kem_public_key"] else None,
        tls_cert_sha256=bytes.fromhex(doc["tls_cert_sha256"]) if doc["tls_cert_sha256"] else None,
        public_keys=doc["public_keys"],
        workers=doc["workers"],
    ).hex()
    return doc


def _flip_quote(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["cpu_evidence"]["quote"] = _flip(doc["cpu_evidence"]["quote"], 200)
    return doc


@pytest.mark.parametrize(
    "mutate, error",
    [
        (_swap_keys, ReportDataMismatch),
        (lambda d: {**d, "dh_public_key": _b64(_x25519_public())}, ReportDataMismatch),
        (lambda d: {**d, "key_epoch": d["key_epoch"] + 1}, ReportDataMismatch),
        (_swap_keys_and_report_data, ReportDataMismatch),
        (_flip_quote, SignatureInvalid),
        (lambda d: {**d, "tee": "tdx", "simulated": False}, DocumentInvalid),  # claims do not match the evidence
    ],
)
async def test_tampered_attestation_refused_before_sending(client, proxy, mutate, error):
    proxy.on_document = mutate
    with pytest.raises(error):
        await client.chat.completions.create(model=MODEL, messages=chat_messages(PROMPT))
    with pytest.raises(error):
        await client.chat.completions.create(model=MODEL, messages=chat_messages(PROMPT), stream=True)
    assert proxy.posts == []  # nothing was sealed to unverified keys
    assert client.attestation is None


async def test_replayed_attestation_with_another_nonce(proxy):
    async with ConfidentialClient(proxy.url, allow_simulated=True) as first:
        await first.attest()
    old = proxy.documents[0]
    proxy.on_document = lambda doc: copy.deepcopy(old)
    async with ConfidentialClient(proxy.url, allow_simulated=True) as second:
        with pytest.raises(NonceMismatch):
            await second.chat.completions.create(model=MODEL, messages=chat_messages(PROMPT))
    proxy.on_document = lambda doc: {**copy.deepcopy(old), "nonce": doc["nonce"]}  # nonce field rewritten
    async with ConfidentialClient(proxy.url, allow_simulated=True) as third:
        with pytest.raises(ReportDataMismatch):
            await third.chat.completions.create(model=MODEL, messages=chat_messages(PROMPT))
    assert proxy.posts == []


async def test_replayed_attestation_on_reattestation(client, proxy, node):  # noqa: F811
    """After a rotation the client re-attests; an old document (old nonce, old key) is refused."""
    await client.chat.completions.create(model=MODEL, messages=chat_messages("one"))
    old = proxy.documents[0]
    node.rotate(), node.rotate()
    proxy.on_document = lambda doc: copy.deepcopy(old)
    with pytest.raises(NonceMismatch):
        await client.chat.completions.create(model=MODEL, messages=chat_messages(PROMPT))
    assert len(proxy.posts) == 2  # the first request and the one refused with 422; no more


async def test_forged_stale_key_answer_does_not_redirect_the_client(client, proxy):
    """A 422 carrying an attacker's key makes the client re-attest, never use that key."""
    attacker_key = _b64(_x25519_public())
    forged: list[int] = []

    def forge(outer: dict[str, Any]) -> web.Response | None:
        if forged:
            return None
        forged.append(1)
        body = {"error": {"code": "STALE_NODE_KEY", "message": "stale", "node_dh_public_key": attacker_key, "key_epoch": 99}}
        return web.json_response(body, status=422)

    proxy.on_post = forge
    response = await client.chat.completions.create(model=MODEL, messages=chat_messages("still fine"))
    assert response.choices[0].message.content == "still fine"
    assert client.attestations == 2
    assert [p["node_dh_public_key"] for p in proxy.posts] == [_b64(client.attestation.dh_public_key)]


async def test_endless_stale_key_answers_are_bounded(client, proxy):
    proxy.on_post = lambda outer: web.json_response({"error": {"code": "STALE_NODE_KEY", "message": "x"}}, status=422)
    with pytest.raises(StaleNodeKeyError):
        await client.chat.completions.create(model=MODEL, messages=chat_messages(PROMPT))
    assert client.attestations == 2  # first use, then exactly one re-attestation
