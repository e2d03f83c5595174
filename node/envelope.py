"""The Atoma confidential envelope (docs/protocol.md), this node's receipts, and
the hybrid ML-KEM-768 + X25519 key agreement and length hiding.

Pure functions and small state objects over bytes and pydantic models, no I/O: the server,
the client and the tests all call this module. Node side: `parse_request`, `open_request`,
`ResponseSealer`, `take_obfuscation`. Client side: `seal_request`, `ResponseOpener`. Receipts:
`build_receipt`, `verify_receipt`. Length hiding: `pad_json`, `event_size`, `bucket_size`.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Callable, Iterable
from typing import Any, Literal

from pydantic import ValidationError

from .crypto import (
    HASH_SIZE,
    KEM_CIPHERTEXT_SIZE,
    NONCE_SIZE,
    SALT_SIZE,
    TAG_SIZE,
    X25519_KEY_SIZE,
    Aead,
    Base64Error,
    b64d,
    b64e,
    blake2b_256,
    constant_time_equal,
    derive_hybrid_key,
    kem_encapsulate,
    random_bytes,
    random_nonce,
    random_salt,
)
from .errors import (
    BadSignature,
    DecryptionFailed,
    EventAfterEnd,
    HashMismatch,
    InvalidBase64,
    InvalidLength,
    InvalidPlaintext,
    InvalidSignature,
    MalformedJson,
    MissingField,
    MissingReceipt,
    PaddingMissing,
    ReceiptInvalid,
    ResponseDecryptionFailed,
    ResponseHashMismatch,
    SchemaViolation,
    StaleNodeKey,
    TranscriptMismatch,
)
from .keys import KeyRing, NodeKey, Signer, replay_identity, verify_sui_signature
from .protocol import ConfidentialComputeRequest
from .wire import canonical_json

RECEIPT_VERSION = 1

# Length hiding: the padding is a JSON string field inside the plaintext.
OBFUSCATION_FIELD = "obfuscation"
EVENT_PAD_MULTIPLE = 256
BUCKET_BASE = 512
# Every pad starts with this many random bytes (as 24 base64 characters): the plaintext's hash
# travels in clear (response_hash, plaintext_body_hash), and without them a short, predictable
# plaintext (one token in a known chunk frame) could be confirmed by hashing guesses.
PADDING_SECRET_SIZE = 18
_PAD_FIELD = b'"' + OBFUSCATION_FIELD.encode() + b'":"'
_PAD_AFTER_MEMBER = b"," + _PAD_FIELD
_PAD_CLOSE = b'"}'
_PAD_FILL = b"x"
_JSON_WHITESPACE = b" \t\r\n"
_OPEN_BRACE = ord("{")


def _field(value: str, size: int | None, minimum: int = 0) -> bytes:
    try:
        data = b64d(value)
    except Base64Error:
        raise InvalidBase64() from None
    if (size is not None and len(data) != size) or len(data) < minimum:
        raise InvalidLength()
    return data


# --- node side ---------------------------------------------------------------------------


def parse_request(body: bytes) -> ConfidentialComputeRequest:
    """The outer JSON as a ConfidentialComputeRequest; MalformedJson or SchemaViolation."""
    try:
        return ConfidentialComputeRequest.model_validate_json(body)
    except ValidationError as exc:
        # Only error types, never input values, decide which error is raised.
        problems = exc.errors(include_input=False, include_url=False, include_context=False)
        if any(e["type"] == "json_invalid" for e in problems):
            raise MalformedJson() from None
        raise SchemaViolation.naming(problems) from None


class DecodedRequest:
    """The binary fields of a request, decoded and length-checked."""

    __slots__ = (
        "ciphertext", "client_public_key", "node_public_key", "nonce", "salt", "plaintext_body_hash", "kem_ciphertext",
    )  # fmt: skip

    def __init__(self, request: ConfidentialComputeRequest) -> None:
        self.salt = _field(request.salt, SALT_SIZE)
        self.nonce = _field(request.nonce, NONCE_SIZE)
        self.client_public_key = _field(request.client_dh_public_key, X25519_KEY_SIZE)
        self.node_public_key = _field(request.node_dh_public_key, X25519_KEY_SIZE)
        self.plaintext_body_hash = _field(request.plaintext_body_hash, HASH_SIZE)
        self.ciphertext = _field(request.ciphertext, None, minimum=TAG_SIZE)
        self.kem_ciphertext = None if request.kem_ciphertext is None else _field(request.kem_ciphertext, KEM_CIPHERTEXT_SIZE)

    def replay_identity(self) -> bytes:
        return replay_identity(self.client_public_key, self.salt, self.nonce, self.kem_ciphertext or b"")


def decode_request(request: ConfidentialComputeRequest) -> DecodedRequest:
    """Check base64 and decoded lengths of every binary field (InvalidBase64, InvalidLength)."""
    return DecodedRequest(request)


def verify_proxy_signature(
    decoded: DecodedRequest, header: str | None, trusted_keys: Iterable[bytes]
) -> None:
    """X-Signature: a trusted proxy's Sui signature over the decoded plaintext_body_hash."""
    if not header:
        raise InvalidSignature()
    try:
        signer = verify_sui_signature(header, decoded.plaintext_body_hash)
    except BadSignature:
        raise InvalidSignature() from None
    if signer not in trusted_keys:
        raise InvalidSignature()


class OpenedRequest:
    """A decrypted, hash-checked request and the sealer for its answer."""

    __slots__ = ("plaintext", "request_hash", "key", "replay_identity", "sealer")

    def __init__(self, plaintext: bytes, request_hash: bytes, key: NodeKey, replay_id: bytes, sealer: ResponseSealer):
        self.plaintext = plaintext
        self.request_hash = request_hash
        self.key = key
        self.replay_identity = replay_id
        self.sealer = sealer

    def __repr__(self) -> str:
        return f"OpenedRequest(epoch={self.key.epoch}, size={len(self.plaintext)})"


def open_request(decoded: DecodedRequest, keyring: KeyRing, signer: Signer) -> OpenedRequest:
    """Pick the live key, derive the request key (v1, or hybrid with a `kem_ciphertext`),
    decrypt, compare the BLAKE2b-256 in constant time.

    Raises StaleNodeKey (with the current keys), DecryptionFailed or HashMismatch. The replay
    check is the caller's (`KeyRing.claim`), made only after this succeeds so that forged
    traffic cannot fill the cache with identities of requests still to come.
    """
    key = keyring.live_key(decoded.node_public_key)
    if key is None:
        current = keyring.current
        raise StaleNodeKey(current.public_key_b64, current.epoch, current.kem_public_key_b64)
    try:
        shared_secret = key.exchange(decoded.client_public_key)
    except ValueError:  # low-order client key: the all-zero shared secret is refused
        raise DecryptionFailed() from None
    if decoded.kem_ciphertext is None:
        aead = Aead.from_shared_secret(shared_secret, decoded.salt)
    else:
        # A wrong ciphertext decapsulates to an unrelated secret (implicit rejection): the
        # decryption below fails, as it would for any other wrong key.
        aead = Aead(
            derive_hybrid_key(
                key.decapsulate(decoded.kem_ciphertext),
                shared_secret,
                decoded.salt,
                decoded.client_public_key,
                decoded.node_public_key,
                decoded.kem_ciphertext,
            )
        )
    plaintext = aead.decrypt(decoded.nonce, decoded.ciphertext)
    if plaintext is None:
        raise DecryptionFailed()
    if not constant_time_equal(blake2b_256(plaintext), decoded.plaintext_body_hash):
        raise HashMismatch()
    sealer = ResponseSealer(aead, signer, decoded.plaintext_body_hash, key.epoch)
    return OpenedRequest(plaintext, decoded.plaintext_body_hash, key, decoded.replay_identity(), sealer)


class ResponseSealer:
    """Seals a request's answer: one response, or a stream of events each with a fresh nonce.

    Keeps the running transcript (BLAKE2b-256 over every response_hash in order) for the
    receipt attached to the response or to the final event. With `padding` on (length hiding;
    the server sets it from the request, `take_obfuscation`) every plaintext is padded before it
    is encrypted, hashed and signed: events to `event_size`, the response to `bucket_size`.
    """

    __slots__ = ("_aead", "_signer", "request_hash", "key_epoch", "_transcript", "events", "finished", "padding")

    def __init__(self, aead: Aead, signer: Signer, request_hash: bytes, key_epoch: int) -> None:
        self._aead = aead
        self._signer = signer
        self.request_hash = request_hash
        self.key_epoch = key_epoch
        self._transcript = hashlib.blake2b(digest_size=HASH_SIZE)
        self.events = 0
        self.finished = False
        self.padding = False

    def _seal(self, plaintext: bytes, padded_size: Callable[[int], int]) -> dict[str, Any]:
        if self.finished:
            raise RuntimeError("response already finished")
        if self.padding:
            # One draw for the nonce and the pad's secret: each draw is a system call.
            fresh = random_bytes(NONCE_SIZE + PADDING_SECRET_SIZE)
            nonce = fresh[:NONCE_SIZE]
            plaintext = pad_json(plaintext, fresh[NONCE_SIZE:], padded_size)
        else:
            nonce = random_nonce()
        ciphertext = self._aead.encrypt(nonce, plaintext)
        response_hash = blake2b_256(plaintext)
        self._transcript.update(response_hash)
        self.events += 1
        return {
            "ciphertext": b64e(ciphertext),
            "nonce": b64e(nonce),
            "response_hash": b64e(response_hash),
            "signature": self._signer.sign_b64(response_hash),
        }

    def seal_event(self, plaintext: bytes, usage: dict | None = None) -> dict[str, Any]:
        """One stream event; `usage` (seeds' Usage shape) travels in clear when given."""
        event = self._seal(plaintext, event_size)
        if usage is not None:
            event["usage"] = usage
        return event

    def seal_final_event(self, plaintext: bytes, model: str, usage: dict | None) -> dict[str, Any]:
        """The last event of a stream, with its receipt."""
        event = self.seal_event(plaintext, usage)
        event["receipt"] = self._finish(model, usage)
        return event

    def seal_response(self, plaintext: bytes, model: str, usage: dict | None) -> dict[str, Any]:
        """The non-streaming response: ciphertext, nonce, response_hash, signature, usage, receipt."""
        response = self._seal(plaintext, bucket_size)
        response["usage"] = usage
        response["receipt"] = self._finish(model, usage)
        return response

    def _finish(self, model: str, usage: dict | None) -> dict[str, Any]:
        self.finished = True
        return build_receipt(
            self._signer,
            request_hash=self.request_hash,
            transcript_hash=self._transcript.digest(),
            events=self.events,
            model=model,
            usage=usage,
            key_epoch=self.key_epoch,
        )

    def __repr__(self) -> str:
        return f"ResponseSealer(epoch={self.key_epoch}, events={self.events})"


# --- length hiding -------------------------------------------------------------------


def event_size(length: int) -> int:
    """A stream event's padded plaintext size: the next multiple of 256 bytes."""
    return -(-length // EVENT_PAD_MULTIPLE) * EVENT_PAD_MULTIPLE


def bucket_size(length: int) -> int:
    """A whole request's or response's padded plaintext size: the next of 512 * 2^k bytes."""
    return max(BUCKET_BASE, 1 << (length - 1).bit_length())


def is_bucket_size(length: int) -> bool:
    return length >= BUCKET_BASE and length & (length - 1) == 0


def pad_json(document: bytes, secret: bytes, padded_size: Callable[[int], int]) -> bytes:
    """`document` (a JSON object without an `obfuscation` key) with an `obfuscation` string
    added so that its length is `padded_size` of the smallest padded form.

    The pad is the base64 of `secret` then filler; the smallest form carries the secret and no
    filler. Spliced in before the closing brace: the document is not parsed or re-serialised
    (this runs once per stream event).
    """
    if document[:1] != b"{" or document[-1:] != b"}":
        raise ValueError("only a JSON object can be padded")
    last = document[-2]  # what precedes the closing brace: "{" only in an empty object
    if last in _JSON_WHITESPACE:
        last = document[:-1].rstrip()[-1]
    field = _PAD_FIELD if last == _OPEN_BRACE else _PAD_AFTER_MEMBER
    head = binascii.b2a_base64(secret, newline=False)  # text for the pad, not a wire field
    smallest = len(document) - 1 + len(field) + len(head) + len(_PAD_CLOSE)
    fill = _PAD_FILL * (padded_size(smallest) - smallest)
    return b"".join((document[:-1], field, head, fill, _PAD_CLOSE))


def take_obfuscation(payload: dict[str, Any]) -> bool:
    """Remove the protocol's fields from a request plaintext before the engine sees it; return
    whether the answer is padded (on unless `stream_options.include_obfuscation` is false).

    Raises InvalidPlaintext when `include_obfuscation` is present and not a boolean.
    """
    payload.pop(OBFUSCATION_FIELD, None)
    options = payload.get("stream_options")
    if not isinstance(options, dict) or "include_obfuscation" not in options:
        return True
    include = options["include_obfuscation"]
    if not isinstance(include, bool):
        raise InvalidPlaintext()
    payload["stream_options"] = {k: v for k, v in options.items() if k != "include_obfuscation"}
    return include


# --- usage in clear -----------------------------------------------------------------------

ClearUsage = Literal["bucketed", "exact", "none"]
USAGE_BUCKET_MIN = 16


def usage_bucket(count: int) -> int:
    """`count` rounded up to the next power of two, at least USAGE_BUCKET_MIN; 0 stays 0 (a
    count that is always 0 for the endpoint, such as an embedding's completion, tells nothing)."""
    return 0 if count <= 0 else max(USAGE_BUCKET_MIN, 1 << (count - 1).bit_length())


def usage_in_clear(usage: dict[str, Any] | None, mode: ClearUsage) -> dict[str, Any] | None:
    """What an answer's clear `usage` and its receipt show (`privacy.clear_usage`) for the exact
    `usage` (the seeds' Usage shape), which stays inside the encrypted answer.

    Bucketed: every count rounded up by `usage_bucket`, so counts give lengths away no finer than
    the padding does; `total_tokens` is the sum of the rounded prompt and completion counts, so a
    proxy that checks total = prompt + completion still can.
    """
    if usage is None or mode == "none":
        return None
    if mode == "exact":
        return usage
    clear = {key: _bucketed(value) for key, value in usage.items()}
    clear["total_tokens"] = clear["prompt_tokens"] + clear["completion_tokens"]
    return clear


def _bucketed(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _bucketed(item) for key, item in value.items()}
    return usage_bucket(value) if isinstance(value, int) and not isinstance(value, bool) else value


# --- receipts -----------------------------------------------------------------------------


def transcript_hash(response_hashes: Iterable[bytes]) -> bytes:
    digest = hashlib.blake2b(digest_size=HASH_SIZE)
    for response_hash in response_hashes:
        digest.update(response_hash)
    return digest.digest()


def receipt_digest(receipt: dict[str, Any]) -> bytes:
    """BLAKE2b-256 of the receipt's canonical JSON without `signature`: what the node signs."""
    return blake2b_256(canonical_json({k: v for k, v in receipt.items() if k != "signature"}))


def build_receipt(
    signer: Signer,
    *,
    request_hash: bytes,
    transcript_hash: bytes,
    events: int,
    model: str,
    usage: dict | None,
    key_epoch: int,
) -> dict[str, Any]:
    receipt: dict[str, Any] = {
        "version": RECEIPT_VERSION,
        "request_hash": b64e(request_hash),
        "transcript_hash": b64e(transcript_hash),
        "events": events,
        "model": model,
        "usage": usage,
        "key_epoch": key_epoch,
    }
    receipt["signature"] = signer.sign_b64(receipt_digest(receipt))
    return receipt


def verify_receipt(
    receipt: Any,
    *,
    signing_key: bytes,
    request_hash: bytes,
    response_hashes: list[bytes] | None = None,
    transcript: bytes | None = None,
) -> dict[str, Any]:
    """Check a receipt against the request and the events received; return it.

    Pass the response hashes in the order received, or their running `transcript` digest.
    Raises ReceiptInvalid (BadSignature's sibling), TranscriptMismatch.
    """
    if not isinstance(receipt, dict) or not isinstance(receipt.get("signature"), str):
        raise ReceiptInvalid("receipt is missing or malformed")
    if receipt.get("version") != RECEIPT_VERSION:
        raise ReceiptInvalid("unsupported receipt version")
    try:
        verify_sui_signature(receipt["signature"], receipt_digest(receipt), signing_key)
    except BadSignature:
        raise ReceiptInvalid("receipt signature does not verify") from None
    if receipt.get("request_hash") != b64e(request_hash):
        raise ReceiptInvalid("receipt is for another request")
    if transcript is None:
        if response_hashes is None:
            raise ValueError("pass response_hashes or transcript")
        transcript = transcript_hash(response_hashes)
    if response_hashes is not None and receipt.get("events") != len(response_hashes):
        raise TranscriptMismatch()
    if receipt.get("transcript_hash") != b64e(transcript):
        raise TranscriptMismatch()
    return receipt


# --- client side --------------------------------------------------------------------------


class ResponseOpener:
    """The client's half of one request: opens the response or each event and checks them.

    With `signing_key` (pinned from attestation) every signature must be by that key; without
    it the signature must still verify under the key it names, and receipts are checked
    against that key. With `padding` (the request asked for length hiding) every plaintext
    must have a padded size (PaddingMissing otherwise): a node that leaks lengths is caught.
    """

    __slots__ = ("_aead", "request_hash", "signing_key", "padding", "_transcript", "response_hashes", "receipt", "ended")

    def __init__(self, aead: Aead, request_hash: bytes, signing_key: bytes | None = None, padding: bool = False) -> None:
        self._aead = aead
        self.request_hash = request_hash
        self.signing_key = signing_key
        self.padding = padding
        self._transcript = hashlib.blake2b(digest_size=HASH_SIZE)
        self.response_hashes: list[bytes] = []
        self.receipt: dict[str, Any] | None = None
        self.ended = False

    def _open(self, message: dict[str, Any]) -> bytes:
        for name in ("ciphertext", "nonce", "response_hash", "signature"):
            if not isinstance(message.get(name), str):
                raise MissingField(f"response field {name} is missing")
        try:
            nonce = b64d(message["nonce"])
            ciphertext = b64d(message["ciphertext"])
            response_hash = b64d(message["response_hash"])
        except Base64Error:
            raise ResponseDecryptionFailed("response field is not base64") from None
        if len(nonce) != NONCE_SIZE or len(ciphertext) < TAG_SIZE:
            raise ResponseDecryptionFailed()
        plaintext = self._aead.decrypt(nonce, ciphertext)
        if plaintext is None:
            raise ResponseDecryptionFailed()
        if not constant_time_equal(blake2b_256(plaintext), response_hash):
            raise ResponseHashMismatch()
        signer = verify_sui_signature(message["signature"], response_hash, self.signing_key)
        if self.signing_key is None:
            self.signing_key = signer
        self._transcript.update(response_hash)
        self.response_hashes.append(response_hash)
        return plaintext

    def open_response(self, body: dict[str, Any], require_receipt: bool = True) -> bytes:
        plaintext = self._open(body)
        if self.padding and not is_bucket_size(len(plaintext)):
            raise PaddingMissing()
        self._check_receipt(body.get("receipt"), require_receipt)
        return plaintext

    def open_event(self, event: dict[str, Any]) -> bytes:
        """One stream event's plaintext; the event carrying the receipt ends the stream."""
        if self.ended:
            raise EventAfterEnd()
        plaintext = self._open(event)
        if self.padding and len(plaintext) % EVENT_PAD_MULTIPLE:
            raise PaddingMissing()
        if event.get("receipt") is not None:
            self._check_receipt(event["receipt"], True)
        return plaintext

    def finish(self) -> dict[str, Any]:
        """Call when the stream closes: the verified receipt, or MissingReceipt."""
        if self.receipt is None:
            raise MissingReceipt()
        return self.receipt

    def _check_receipt(self, receipt: Any, required: bool) -> None:
        if receipt is None:
            if required:
                raise MissingReceipt()
            return
        if self.signing_key is None:
            raise BadSignature()
        self.receipt = verify_receipt(
            receipt,
            signing_key=self.signing_key,
            request_hash=self.request_hash,
            transcript=self._transcript.digest(),
        )
        if self.receipt.get("events") != len(self.response_hashes):
            raise TranscriptMismatch()
        self.ended = True

    def __repr__(self) -> str:
        return f"ResponseOpener(events={len(self.response_hashes)}, ended={self.ended})"


def seal_request(
    plaintext: bytes,
    node_public_key: bytes,
    model_name: str,
    *,
    kem_public_key: bytes | None = None,
    padding: bool = False,
    stack_small_id: int = 0,
    stream: bool | None = None,
    num_compute_units: int | None = None,
    signing_key: bytes | None = None,
) -> tuple[dict[str, Any], ResponseOpener]:
    """Encrypt an OpenAI request body to the node's key: the outer JSON and its opener.

    With `kem_public_key` (the node's attested ML-KEM-768 key) the key comes from the hybrid
    derivation and the request carries `kem_ciphertext`. With `padding` the plaintext
    (a JSON object) is padded to its bucket and the opener requires padded answers, which the
    node sends unless the plaintext turned them off (`stream_options.include_obfuscation`).
    """
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    client_key = X25519PrivateKey.generate()
    client_public_key = client_key.public_key().public_bytes_raw()
    shared_secret = client_key.exchange(X25519PublicKey.from_public_bytes(node_public_key))
    salt, nonce = random_salt(), random_nonce()
    kem_ciphertext = None
    if kem_public_key is None:
        aead = Aead.from_shared_secret(shared_secret, salt)
    else:
        kem_secret, kem_ciphertext = kem_encapsulate(kem_public_key)
        aead = Aead(derive_hybrid_key(kem_secret, shared_secret, salt, client_public_key, node_public_key, kem_ciphertext))
    if padding:
        plaintext = pad_json(plaintext, random_bytes(PADDING_SECRET_SIZE), bucket_size)
    request_hash = blake2b_256(plaintext)
    outer: dict[str, Any] = {
        "ciphertext": b64e(aead.encrypt(nonce, plaintext)),
        "client_dh_public_key": b64e(client_public_key),
        "model_name": model_name,
        "node_dh_public_key": b64e(node_public_key),
        "nonce": b64e(nonce),
        "plaintext_body_hash": b64e(request_hash),
        "salt": b64e(salt),
        "stack_small_id": stack_small_id,
        "num_compute_units": num_compute_units,
        "stream": stream,
    }
    if kem_ciphertext is not None:
        outer["kem_ciphertext"] = b64e(kem_ciphertext)
    return outer, ResponseOpener(aead, request_hash, signing_key, padding)
