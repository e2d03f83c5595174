"""The Atoma confidential envelope (PROTOCOL.md part A) and this node's receipts (part B).

Pure functions and small state objects over bytes and pydantic models, no I/O: the server,
the client and the tests all call this module. Node side: `parse_request`, `open_request`,
`ResponseSealer`. Client side: `seal_request`, `ResponseOpener`. Receipts: `build_receipt`,
`verify_receipt`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from .crypto import (
    HASH_SIZE,
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
    InvalidSignature,
    MalformedJson,
    MissingField,
    MissingReceipt,
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
        if any(e["type"] == "json_invalid" for e in exc.errors(include_input=False, include_url=False)):
            raise MalformedJson() from None
        raise SchemaViolation() from None


class DecodedRequest:
    """The binary fields of a request, decoded and length-checked."""

    __slots__ = ("ciphertext", "client_public_key", "node_public_key", "nonce", "salt", "plaintext_body_hash")

    def __init__(self, request: ConfidentialComputeRequest) -> None:
        self.salt = _field(request.salt, SALT_SIZE)
        self.nonce = _field(request.nonce, NONCE_SIZE)
        self.client_public_key = _field(request.client_dh_public_key, X25519_KEY_SIZE)
        self.node_public_key = _field(request.node_dh_public_key, X25519_KEY_SIZE)
        self.plaintext_body_hash = _field(request.plaintext_body_hash, HASH_SIZE)
        self.ciphertext = _field(request.ciphertext, None, minimum=TAG_SIZE)

    def replay_identity(self) -> bytes:
        return replay_identity(self.client_public_key, self.salt, self.nonce)


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
    """Pick the live key, decrypt, compare the BLAKE2b-256 in constant time.

    Raises StaleNodeKey (with the current key), DecryptionFailed or HashMismatch. The replay
    check is the caller's (`KeyRing.claim`), made only after this succeeds so that forged
    traffic cannot fill the cache with identities of requests still to come.
    """
    key = keyring.live_key(decoded.node_public_key)
    if key is None:
        raise StaleNodeKey(keyring.current.public_key_b64, keyring.current.epoch)
    try:
        shared_secret = key.exchange(decoded.client_public_key)
    except ValueError:  # low-order client key: the all-zero shared secret is refused
        raise DecryptionFailed() from None
    aead = Aead.from_shared_secret(shared_secret, decoded.salt)
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
    receipt attached to the response or to the final event.
    """

    __slots__ = ("_aead", "_signer", "request_hash", "key_epoch", "_transcript", "events", "finished")

    def __init__(self, aead: Aead, signer: Signer, request_hash: bytes, key_epoch: int) -> None:
        self._aead = aead
        self._signer = signer
        self.request_hash = request_hash
        self.key_epoch = key_epoch
        self._transcript = hashlib.blake2b(digest_size=HASH_SIZE)
        self.events = 0
        self.finished = False

    def _seal(self, plaintext: bytes) -> dict[str, Any]:
        if self.finished:
            raise RuntimeError("response already finished")
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
        event = self._seal(plaintext)
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
        response = self._seal(plaintext)
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
    against that key.
    """

    __slots__ = ("_aead", "request_hash", "signing_key", "_transcript", "response_hashes", "receipt", "ended")

    def __init__(self, aead: Aead, request_hash: bytes, signing_key: bytes | None = None) -> None:
        self._aead = aead
        self.request_hash = request_hash
        self.signing_key = signing_key
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
        self._check_receipt(body.get("receipt"), require_receipt)
        return plaintext

    def open_event(self, event: dict[str, Any]) -> bytes:
        """One stream event's plaintext; the event carrying the receipt ends the stream."""
        if self.ended:
            raise EventAfterEnd()
        plaintext = self._open(event)
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
    stack_small_id: int = 0,
    stream: bool | None = None,
    num_compute_units: int | None = None,
    signing_key: bytes | None = None,
) -> tuple[dict[str, Any], ResponseOpener]:
    """Encrypt an OpenAI request body to the node's key: the outer JSON and its opener."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    client_key = X25519PrivateKey.generate()
    shared_secret = client_key.exchange(X25519PublicKey.from_public_bytes(node_public_key))
    salt, nonce = random_salt(), random_nonce()
    aead = Aead.from_shared_secret(shared_secret, salt)
    request_hash = blake2b_256(plaintext)
    outer: dict[str, Any] = {
        "ciphertext": b64e(aead.encrypt(nonce, plaintext)),
        "client_dh_public_key": b64e(client_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)),
        "model_name": model_name,
        "node_dh_public_key": b64e(node_public_key),
        "nonce": b64e(nonce),
        "plaintext_body_hash": b64e(request_hash),
        "salt": b64e(salt),
        "stack_small_id": stack_small_id,
        "num_compute_units": num_compute_units,
        "stream": stream,
    }
    return outer, ResponseOpener(aead, request_hash, signing_key)
