"""Wire encodings shared by the node, the client, the engines and the attestation verifier.

Each lives here once:
- canonical JSON (defined in `attestation.canonical`, the lower layer, and re-exported here):
  receipts, the report_data binding and the config digest all hash it;
- server-sent events: `sse_event` writes one, `SSEDecoder` reads them (the client reading the
  node, the engines reading vLLM and an upstream server);
- the error table (`ERROR_TABLE`): every error code the node answers, from which the node's
  exceptions (`node.errors`), the client's (`node.client.errors`) and the OpenAPI error
  responses (`node.server.openapi`) are made.

Adding an error code: add an `ErrorKind` row to `ERROR_TABLE`, then declare its exception on
both sides with the code, `class NewThing(NodeError, code="NEW_THING")` in node/errors.py and
`class NewThingError(NodeAPIError, code="NEW_THING")` in node/client/errors.py (importing
either module fails while a row lacks its class); the OpenAPI document lists it by itself.
A code of the protocol's table (docs/protocol.md) keeps its status there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Re-exported: the node hashes and signs the same bytes the verifier does.
from attestation.canonical import canonical_json as canonical_json


# --- server-sent events --------------------------------------------------------------------------

SSE_KEEPALIVE = b": keep-alive\n\n"
SSE_DONE = b"[DONE]"  # the OpenAI end marker (plain routes and engines; never on confidential routes)
MAX_EVENT_BYTES = 16 * 1024 * 1024


def sse_event(data: bytes) -> bytes:
    """One event carrying `data` (a single line: compact JSON has no line breaks)."""
    return b"data: " + data + b"\n\n"


class EventTooLarge(ValueError):
    """An event grew past the decoder's limit without ending."""


class SSEDecoder:
    """Server-sent events from byte chunks, as the event-stream format defines them: lines end
    in LF, CRLF or CR (also when split across chunks), a blank line ends an event, an event's
    `data` lines are joined with LF, comments and other fields are skipped. Nothing but the
    data is kept, and an unfinished event larger than `limit` raises EventTooLarge."""

    __slots__ = ("_after_cr", "_buffer", "_limit", "_scanned")

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._after_cr = False  # the last chunk ended in CR: an LF starting the next one ends no line
        self._limit = limit
        self._scanned = 0  # where the search for the next blank line resumes

    def feed(self, data: bytes) -> list[bytes]:
        """The data of every event that `data` completes, in order."""
        if not self._buffer and not self._after_cr and data.find(b"\n\n") == len(data) - 2 >= 0 and b"\r" not in data:
            event = self._data_of(data[:-2])  # the usual chunk: exactly one whole event
            return [event] if event is not None else []
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]
        self._after_cr = data.endswith(b"\r")
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer
        buffer += data
        events = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", max(start, self._scanned - 1))
            if end < 0:
                break
            self._scanned = 0
            event = self._data_of(bytes(buffer[start:end]))
            if event is not None:
                events.append(event)
            start = end + 2
        if start:
            del buffer[:start]
        self._scanned = len(buffer)
        if len(buffer) > self._limit:
            raise EventTooLarge(f"a server-sent event exceeds {self._limit} bytes")
        return events

    @staticmethod
    def _data_of(block: bytes) -> bytes | None:
        if block.startswith(b"data: ") and b"\n" not in block:  # the usual event: one data line
            return block[6:]
        lines = [line for line in block.split(b"\n") if line == b"data" or line.startswith(b"data:")]
        if not lines:
            return None  # comments only, or other fields
        return b"\n".join(line[5:].removeprefix(b" ") for line in lines)

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished event are left (the stream was cut mid-event)."""
        return bool(bytes(self._buffer).strip())


# --- the error table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorKind:
    """One error the node answers: `{"error": {"code": code, "message": ...}}` with `status`."""

    code: str
    status: int
    when: str  # when the node answers it (the protocol's "case"; the OpenAPI descriptions)
    message: str  # the node's message: a fixed text, so no input can ever reach it
    client_message: str  # what the client's exception says
    retry_after: bool = False  # the answer carries Retry-After
    routing: bool = False  # answered in place of a route (none there, or turned off), not by an operation
    # Answered as application/problem+json (RFC 9457) with this `type`, the code kept in `error`.
    problem_type: str | None = None
    gateway: bool = False  # answered only by the Oblivious HTTP gateway (POST /v1/ohttp)


ERROR_TABLE: tuple[ErrorKind, ...] = (
    ErrorKind(
        "INVALID_BODY", 400,
        "outer JSON malformed, a field missing or of the wrong type, bad base64, a wrong decoded length; "
        "or the decrypted plaintext is not a valid request for the endpoint (an image request's "
        "response_format other than url or b64_json included); or num_compute_units is not what an image "
        "request asks for (width x height x n)",
        "invalid request body", "the node refused the request body",
    ),
    ErrorKind("UNAUTHORIZED", 401, "missing or unknown bearer token",
              "missing or unknown bearer token", "missing or unknown API key"),
    ErrorKind("INVALID_SIGNATURE", 401, "X-Signature required and missing or invalid",
              "missing or invalid X-Signature", "missing or invalid X-Signature"),
    ErrorKind("DECRYPTION_FAILED", 400, "decryption fails (tampered ciphertext, tag, nonce, salt or client key)",
              "decryption failed", "the node could not decrypt the request"),
    ErrorKind("HASH_MISMATCH", 400, "BLAKE2b of the plaintext differs from plaintext_body_hash",
              "plaintext_body_hash does not match", "the node found another plaintext hash"),
    ErrorKind("MODEL_NOT_FOUND", 404, "model unknown, or model_name differs from the plaintext's model",
              "model not found", "model not found"),
    ErrorKind("BODY_TOO_LARGE", 413, "request body over the size limit",
              "request body too large", "request body too large"),
    ErrorKind("REPLAYED_REQUEST", 409, "the same (client key, salt, nonce) seen before under a live key",
              "request was already seen", "the node saw this request before"),
    ErrorKind(
        "STALE_NODE_KEY", 422,
        "node_dh_public_key is not a live key (rotated away or never ours); the body also carries the current "
        "X25519 and ML-KEM-768 keys",
        "node_dh_public_key is not a live key", "the node's key was rotated",
    ),
    ErrorKind("OVERLOADED", 429, "admission or rate limit reached; Retry-After says when to come back",
              "too many requests: come back after Retry-After seconds", "the node is overloaded",
              retry_after=True),
    ErrorKind("TOKEN_SPENT", 401, "the PrivateToken was redeemed before (each token is good for one request)",
              "token already spent", "the node has seen this token before: spend another"),
    ErrorKind(
        "INVALID_TOKEN", 401,
        "the PrivateToken credential is malformed (not one base64url token of type 0x0001 and 146 bytes), was "
        "made for another challenge, or its authenticator does not verify",
        "invalid token", "the node refused the token",
    ),
    ErrorKind(
        "TOKEN_KEY_RETIRED", 401,
        "the PrivateToken's key is not one of the node's live token keys (retired after its overlap, or never "
        "this node's)",
        "token key retired or unknown: fetch new tokens",
        "the token's key is retired: fetch new tokens",
    ),
    ErrorKind(
        "INVALID_TOKEN_REQUEST", 422,
        "a token request that is not application/private-token-request, not token type 0x0001, of a wrong "
        "size, for another key than the current token key, or with a blinded element that is not a P-384 point",
        "invalid token request", "the node refused the token request",
    ),
    ErrorKind("TOKEN_BATCH_TOO_LARGE", 422,
              "a token request asking for more tokens than auth.privacy_pass.max_batch or an hour's quota",
              "too many tokens in one request", "the node issues fewer tokens per request"),
    ErrorKind("TOKEN_QUOTA_EXCEEDED", 429,
              "the account has been issued auth.privacy_pass.tokens_per_hour tokens; Retry-After says when "
              "the batch asked for is available", "token quota exceeded: come back after Retry-After seconds",
              "the account's token quota is used up", retry_after=True),
    ErrorKind(
        "WORKER_REFUSED", 403,
        "a worker VM's join: its evidence does not verify or fails the node's worker policy, its challenge "
        "is unknown or used, or the node takes no more workers; `failed_claims` names each reason",
        "worker refused", "the head refused this worker VM",
    ),
    ErrorKind(
        "UNSUPPORTED_IMAGE_SIZE", 400, "an image request's size is not WIDTHxHEIGHT or not one the model serves; "
        "the body lists the sizes it serves",
        "image size not served by this model", "the model does not make images of this size",
    ),
    ErrorKind("TOO_MANY_IMAGES", 400, "an image request's n is over the model's max_images; the body says the most",
              "too many images in one request", "the model makes fewer images per request"),
    ErrorKind("PROMPT_TOO_LONG", 400, "an image request's prompt has more tokens than the model's text encoder "
              "takes (it would be cut); the body says the limit",
              "prompt longer than the model takes", "the prompt is longer than the model takes"),
    ErrorKind("NOT_READY", 503, "engine not ready", "engine not ready", "the node's engine is not ready"),
    ErrorKind("INTERNAL_ERROR", 500, "anything else (no detail)", "internal error", "the node failed"),
    ErrorKind("NOT_FOUND", 404, "no such path", "not found", "the node has no such path", routing=True),
    ErrorKind("METHOD_NOT_ALLOWED", 405, "the path does not take this method",
              "method not allowed", "the path does not take this method", routing=True),
    ErrorKind(
        "PLAINTEXT_DISABLED", 404, "a plain OpenAI route on a node with allow_plaintext off",
        "plain OpenAI routes are off on this node (allow_plaintext = false): send the request sealed to "
        "/v1/confidential/...",
        "the node serves only its confidential routes (/v1/confidential/...)", routing=True,
    ),
    ErrorKind(
        "OHTTP_DECAPSULATION_FAILED", 400,
        "an Oblivious HTTP request that does not decapsulate (encapsulated key, ciphertext, chunk framing: "
        "the answer never says which part)",
        "Oblivious HTTP request does not decapsulate", "the node could not decapsulate the Oblivious HTTP request",
        problem_type="about:blank", gateway=True,
    ),
    ErrorKind(
        "OHTTP_KEY_UNKNOWN", 400,
        "an Oblivious HTTP request to a key id or algorithms the node does not hold (rotated away): "
        "fetch GET /v1/ohttp/keys again",
        "Oblivious HTTP key configuration not acceptable",
        "the node does not hold that Oblivious HTTP key (rotated): fetch its keys again",
        problem_type="https://iana.org/assignments/http-problem-types#ohttp-key", gateway=True,
    ),
    ErrorKind(
        "UNSUPPORTED_MEDIA_TYPE", 415,
        "POST /v1/ohttp with a Content-Type other than message/ohttp-req or message/ohttp-chunked-req",
        "unsupported media type: send message/ohttp-req or message/ohttp-chunked-req",
        "the node refused the request's media type", gateway=True,
    ),
)
ERRORS: dict[str, ErrorKind] = {kind.code: kind for kind in ERROR_TABLE}


def declared_by_code(declared: dict[str, type], side: str) -> dict[str, type]:
    """`declared` (code -> exception class) in table order, once every row has its class."""
    missing = [kind.code for kind in ERROR_TABLE if kind.code not in declared]
    if missing:
        raise TypeError(f"error table rows without {side} exception: {', '.join(missing)}")
    return {kind.code: declared[kind.code] for kind in ERROR_TABLE}
