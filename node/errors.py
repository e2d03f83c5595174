"""Exception types of the node, one per row of PROTOCOL.md's error table, and the client's.

Messages are fixed, safe texts: they never carry plaintext, key material or ciphertext, so
an exception can be logged or sent back as is. The server's error middleware maps
`NodeError.status`/`code` to the wire.
"""

from __future__ import annotations


class TeeNodeError(Exception):
    """Base of every error this package raises on purpose."""

    message = "error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)

    @property
    def safe_message(self) -> str:
        return str(self)


class NodeError(TeeNodeError):
    """An error answered to a client with a status and a code from the error table."""

    status = 500
    code = "INTERNAL_ERROR"
    message = "internal error"

    def extra(self) -> dict:
        """Additional fields for the error object (only public values)."""
        return {}


class InvalidBody(NodeError):
    status, code, message = 400, "INVALID_BODY", "invalid request body"


class MalformedJson(InvalidBody):
    message = "request body is not valid JSON"


class SchemaViolation(InvalidBody):
    message = "request body does not match the schema"


class InvalidBase64(InvalidBody):
    message = "a field is not standard base64 with padding"


class InvalidLength(InvalidBody):
    message = "a field has the wrong decoded length"


class InvalidPlaintext(InvalidBody):
    message = "decrypted body is not a valid request for this endpoint"


class Unauthorized(NodeError):
    status, code, message = 401, "UNAUTHORIZED", "missing or unknown bearer token"


class InvalidSignature(NodeError):
    status, code, message = 401, "INVALID_SIGNATURE", "missing or invalid X-Signature"


class DecryptionFailed(NodeError):
    status, code, message = 400, "DECRYPTION_FAILED", "decryption failed"


class HashMismatch(NodeError):
    status, code, message = 400, "HASH_MISMATCH", "plaintext_body_hash does not match"


class ModelNotFound(NodeError):
    status, code, message = 404, "MODEL_NOT_FOUND", "model not found"


class BodyTooLarge(NodeError):
    status, code, message = 413, "BODY_TOO_LARGE", "request body too large"


class ReplayedRequest(NodeError):
    status, code, message = 409, "REPLAYED_REQUEST", "request was already seen"


class StaleNodeKey(NodeError):
    status, code, message = 422, "STALE_NODE_KEY", "node_dh_public_key is not a live key"

    def __init__(self, current_public_key_b64: str, key_epoch: int, kem_public_key_b64: str) -> None:
        super().__init__()
        self.current_public_key_b64 = current_public_key_b64
        self.key_epoch = key_epoch
        self.kem_public_key_b64 = kem_public_key_b64

    def extra(self) -> dict:
        return {
            "node_dh_public_key": self.current_public_key_b64,
            "key_epoch": self.key_epoch,
            "kem_public_key": self.kem_public_key_b64,
        }


class Overloaded(NodeError):
    status, code, message = 429, "OVERLOADED", "too many requests in flight"

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__()
        self.retry_after = retry_after


class NotReady(NodeError):
    status, code, message = 503, "NOT_READY", "engine not ready"


class InternalError(NodeError):
    status, code, message = 500, "INTERNAL_ERROR", "internal error"


class EngineError(NodeError):
    """The engine failed while serving a request; answered as INTERNAL_ERROR with no detail."""


class EngineBadRequest(InvalidBody):
    """The engine refused the request's parameters (e.g. max_tokens beyond the context)."""

    message = "request parameters were refused by the engine"


NODE_ERRORS: tuple[type[NodeError], ...] = (
    InvalidBody,
    Unauthorized,
    InvalidSignature,
    DecryptionFailed,
    HashMismatch,
    ModelNotFound,
    BodyTooLarge,
    ReplayedRequest,
    StaleNodeKey,
    Overloaded,
    NotReady,
    InternalError,
)


# Client side: what a client finds wrong with a node's answer.
class VerificationError(TeeNodeError):
    """The node's answer failed a check; its content must not be used."""

    message = "response verification failed"


class ResponseDecryptionFailed(VerificationError):
    message = "response does not decrypt"


class ResponseHashMismatch(VerificationError):
    message = "response_hash does not match the decrypted response"


class BadSignature(VerificationError):
    message = "signature does not verify"


class MissingField(VerificationError):
    message = "a required field is missing from the response"


class ReceiptInvalid(VerificationError):
    message = "receipt does not verify"


class TranscriptMismatch(ReceiptInvalid):
    message = "receipt transcript does not match the events received"


class MissingReceipt(ReceiptInvalid):
    message = "stream ended without a receipt"


class EventAfterEnd(ReceiptInvalid):
    message = "event received after the final event"


class PaddingMissing(VerificationError):
    message = "response is not padded to hide its length, though the request asked for it"
