"""Exception types of the node, one per row of the error table (`node.wire.ERROR_TABLE`), and
the client's verification errors.

Messages are fixed, safe texts: they never carry plaintext, key material or ciphertext, so
an exception can be logged or sent back as is. A class declared with `code=` takes its status,
code and message from its table row; subclasses refine the message. The server's error
middleware maps `NodeError.status`/`code` to the wire.
"""

from __future__ import annotations

from .wire import ERRORS, ErrorKind, declared_by_code


class TeeNodeError(Exception):
    """Base of every error this package raises on purpose."""

    message = "error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)

    @property
    def safe_message(self) -> str:
        return str(self)


_DECLARED: dict[str, type[NodeError]] = {}


class NodeError(TeeNodeError):
    """An error answered to a client with a status and a code from the error table."""

    kind: ErrorKind = ERRORS["INTERNAL_ERROR"]
    status = kind.status
    code = kind.code
    message = kind.message

    def __init_subclass__(cls, code: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.kind = ERRORS[code]
            cls.status, cls.code, cls.message = cls.kind.status, cls.kind.code, cls.kind.message
            _DECLARED[code] = cls

    def extra(self) -> dict:
        """Additional fields for the error object (only public values)."""
        return {}


class InvalidBody(NodeError, code="INVALID_BODY"):
    pass


class MalformedJson(InvalidBody):
    message = "request body is not valid JSON"


class SchemaViolation(InvalidBody):
    message = "request body does not match the schema"

    @classmethod
    def naming(cls, problems: list[dict]) -> SchemaViolation:
        """The error naming each offending field of a public body (the envelope, a lock request)
        by its path and pydantic's error type, never by its value. Not for decrypted bodies:
        even their field names are confidential."""
        named = [f"{_field_path(p.get('loc', ()))} ({p.get('type', 'invalid')})" for p in problems[:MAX_NAMED_FIELDS]]
        more = len(problems) - len(named)
        return cls(f"{cls.message}: " + ", ".join(named) + (f" and {more} more" if more > 0 else ""))


# Fields a schema error names; names are cut to this length and to safe characters.
MAX_NAMED_FIELDS = 3
_MAX_FIELD_NAME = 40


def _field_path(loc: tuple) -> str:
    parts = []
    for part in loc:
        text = str(part)[:_MAX_FIELD_NAME]
        parts.append("".join(c if c.isascii() and (c.isalnum() or c in "_-") else "?" for c in text))
    return ".".join(parts) or "(the body)"


class InvalidBase64(InvalidBody):
    message = "a field is not standard base64 with padding"


class InvalidLength(InvalidBody):
    message = "a field has the wrong decoded length"


class InvalidPlaintext(InvalidBody):
    message = "decrypted body is not a valid request for this endpoint"


class ComputeUnitsMismatch(InvalidBody):
    message = "num_compute_units is not width x height x n of the image request"


class Unauthorized(NodeError, code="UNAUTHORIZED"):
    pass


class InvalidSignature(NodeError, code="INVALID_SIGNATURE"):
    pass


class DecryptionFailed(NodeError, code="DECRYPTION_FAILED"):
    pass


class HashMismatch(NodeError, code="HASH_MISMATCH"):
    pass


class ModelNotFound(NodeError, code="MODEL_NOT_FOUND"):
    pass


class BodyTooLarge(NodeError, code="BODY_TOO_LARGE"):
    pass


class ReplayedRequest(NodeError, code="REPLAYED_REQUEST"):
    pass


class StaleNodeKey(NodeError, code="STALE_NODE_KEY"):
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


class Overloaded(NodeError, code="OVERLOADED"):
    def __init__(self, retry_after: int = 1) -> None:
        super().__init__()
        self.retry_after = retry_after


class TokenSpent(NodeError, code="TOKEN_SPENT"):
    pass


class InvalidToken(NodeError, code="INVALID_TOKEN"):
    pass


class TokenKeyRetired(NodeError, code="TOKEN_KEY_RETIRED"):
    pass


class InvalidTokenRequest(NodeError, code="INVALID_TOKEN_REQUEST"):
    pass


class TokenBatchTooLarge(NodeError, code="TOKEN_BATCH_TOO_LARGE"):
    pass


class TokenQuotaExceeded(NodeError, code="TOKEN_QUOTA_EXCEEDED"):
    def __init__(self, retry_after: int) -> None:
        super().__init__()
        self.retry_after = retry_after


class WorkerRefused(NodeError, code="WORKER_REFUSED"):
    """A worker VM's join refused; `failed_claims` says why (claims of public evidence, nothing secret)."""

    def __init__(self, failed_claims: tuple[str, ...] | list[str]) -> None:
        super().__init__()
        self.failed_claims = list(failed_claims)

    def extra(self) -> dict:
        return {"failed_claims": self.failed_claims}


class UnsupportedImageSize(NodeError, code="UNSUPPORTED_IMAGE_SIZE"):
    def __init__(self, sizes: tuple[str, ...]) -> None:
        super().__init__()
        self.sizes = sizes

    def extra(self) -> dict:
        return {"sizes": list(self.sizes)}  # the model's config: public


class TooManyImages(NodeError, code="TOO_MANY_IMAGES"):
    def __init__(self, max_images: int) -> None:
        super().__init__()
        self.max_images = max_images

    def extra(self) -> dict:
        return {"max_images": self.max_images}


class PromptTooLong(NodeError, code="PROMPT_TOO_LONG"):
    def __init__(self, max_prompt_tokens: int) -> None:
        super().__init__()
        self.max_prompt_tokens = max_prompt_tokens

    def extra(self) -> dict:
        return {"max_prompt_tokens": self.max_prompt_tokens}


class NotReady(NodeError, code="NOT_READY"):
    pass


class WaitingForWorkers(NotReady):
    """A multi-VM head before its model loads: how many worker VMs it has, and why any were refused."""

    message = "waiting for worker VMs to join"

    def __init__(self, expected: int, admitted: int, refused: list[str]) -> None:
        super().__init__()
        self.workers = {"expected": expected, "admitted": admitted, "refused": list(refused)}

    def extra(self) -> dict:
        return {"workers": self.workers}


class InternalError(NodeError, code="INTERNAL_ERROR"):
    pass


class NotFound(NodeError, code="NOT_FOUND"):
    pass


class MethodNotAllowed(NodeError, code="METHOD_NOT_ALLOWED"):
    pass


class PlaintextDisabled(NodeError, code="PLAINTEXT_DISABLED"):
    pass


class OhttpDecapsulationFailed(NodeError, code="OHTTP_DECAPSULATION_FAILED"):
    pass


class OhttpKeyUnknown(NodeError, code="OHTTP_KEY_UNKNOWN"):
    pass


class UnsupportedMediaType(NodeError, code="UNSUPPORTED_MEDIA_TYPE"):
    pass


class EngineError(InternalError):
    """The engine failed while serving a request; answered as INTERNAL_ERROR with no detail."""


class EngineBadRequest(InvalidBody):
    """The engine refused the request's parameters (e.g. max_tokens beyond the context)."""

    message = "request parameters were refused by the engine"


# One class per row of the error table, in its order (importing fails while a row has none).
NODE_ERRORS: tuple[type[NodeError], ...] = tuple(declared_by_code(_DECLARED, "node").values())


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


class TokenIssuanceInvalid(VerificationError):
    message = "the token issuance does not verify"


class PaddingMissing(VerificationError):
    message = "response is not padded to hide its length, though the request asked for it"
