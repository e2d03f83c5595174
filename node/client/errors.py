"""The client's exceptions: one class per node error code, and what the client itself refuses.

Every message is a fixed text plus public values (HTTP status, error code, request id): never
plaintext, key material or ciphertext. The node's own message text is kept, shortened and
unprinted, in `.server_message`.

    TeeNodeError
    ├── NodeAPIError (.status, .code, .request_id, .server_message)
    │   ├── InvalidBodyError          400 INVALID_BODY
    │   ├── UnauthorizedError         401 UNAUTHORIZED
    │   ├── InvalidSignatureError     401 INVALID_SIGNATURE
    │   ├── DecryptionFailedError     400 DECRYPTION_FAILED
    │   ├── HashMismatchError         400 HASH_MISMATCH
    │   ├── ModelNotFoundError        404 MODEL_NOT_FOUND
    │   ├── BodyTooLargeError         413 BODY_TOO_LARGE
    │   ├── ReplayedRequestError      409 REPLAYED_REQUEST
    │   ├── StaleNodeKeyError         422 STALE_NODE_KEY (.key_epoch)
    │   ├── OverloadedError           429 OVERLOADED (.retry_after)
    │   ├── NotReadyError             503 NOT_READY
    │   └── InternalServerError       500 INTERNAL_ERROR
    ├── APIConnectionError / APITimeoutError
    └── VerificationError (node.errors: ResponseDecryptionFailed, ResponseHashMismatch,
        BadSignature, MissingField, ReceiptInvalid > TranscriptMismatch, MissingReceipt,
        EventAfterEnd, PaddingMissing; here: DuplicateEvent, MalformedEvent, UsageMismatch,
        UnexpectedResponse)

Attestation failures are `attestation.errors.AttestationError` (re-exported by `node.client`).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ReceiptInvalid, TeeNodeError, TranscriptMismatch, VerificationError

_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class NodeAPIError(TeeNodeError):
    """The node answered with an error (status and code from PROTOCOL.md's error table)."""

    status = 0
    code = "UNKNOWN"
    message = "node error"

    def __init__(
        self,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        server_message: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.request_id = request_id
        self.server_message = server_message
        self.body = body or {}
        text = f"HTTP {self.status} {self.code}: {self.message}"
        if request_id:
            text += f" (request id {request_id})"
        super().__init__(text)


class InvalidBodyError(NodeAPIError):
    status, code, message = 400, "INVALID_BODY", "the node refused the request body"


class UnauthorizedError(NodeAPIError):
    status, code, message = 401, "UNAUTHORIZED", "missing or unknown API key"


class InvalidSignatureError(NodeAPIError):
    status, code, message = 401, "INVALID_SIGNATURE", "missing or invalid X-Signature"


class DecryptionFailedError(NodeAPIError):
    status, code, message = 400, "DECRYPTION_FAILED", "the node could not decrypt the request"


class HashMismatchError(NodeAPIError):
    status, code, message = 400, "HASH_MISMATCH", "the node found another plaintext hash"


class ModelNotFoundError(NodeAPIError):
    status, code, message = 404, "MODEL_NOT_FOUND", "model not found"


class BodyTooLargeError(NodeAPIError):
    status, code, message = 413, "BODY_TOO_LARGE", "request body too large"


class ReplayedRequestError(NodeAPIError):
    status, code, message = 409, "REPLAYED_REQUEST", "the node saw this request before"


class StaleNodeKeyError(NodeAPIError):
    status, code, message = 422, "STALE_NODE_KEY", "the node's key was rotated"

    @property
    def key_epoch(self) -> int | None:
        epoch = self.body.get("key_epoch")
        return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


class OverloadedError(NodeAPIError):
    status, code, message = 429, "OVERLOADED", "the node is overloaded"

    def __init__(self, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retry_after = retry_after


class NotReadyError(NodeAPIError):
    status, code, message = 503, "NOT_READY", "the node's engine is not ready"

    def __init__(self, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retry_after = retry_after


class InternalServerError(NodeAPIError):
    status, code, message = 500, "INTERNAL_ERROR", "the node failed"


ERRORS_BY_CODE: dict[str, type[NodeAPIError]] = {
    cls.code: cls
    for cls in (
        InvalidBodyError,
        UnauthorizedError,
        InvalidSignatureError,
        DecryptionFailedError,
        HashMismatchError,
        ModelNotFoundError,
        BodyTooLargeError,
        ReplayedRequestError,
        StaleNodeKeyError,
        OverloadedError,
        NotReadyError,
        InternalServerError,
    )
}


def error_from_body(
    status: int, body: Any, *, request_id: str | None = None, retry_after: float | None = None
) -> NodeAPIError:
    """The typed exception for an error answer (`{"error": {"code", "message", ...}}`).

    `status` is the HTTP status, or None for an error event inside a stream (the code's own
    status is used then). Unknown codes give a plain NodeAPIError.
    """
    detail = body.get("error") if isinstance(body, dict) else None
    detail = detail if isinstance(detail, dict) else {}
    code = detail.get("code")
    code = code if isinstance(code, str) and _CODE.match(code) else None
    message = detail.get("message")
    server_message = message[:200] if isinstance(message, str) else None
    request_id = request_id if request_id and _REQUEST_ID.match(request_id) else None
    cls = ERRORS_BY_CODE.get(code or "", NodeAPIError)
    kwargs: dict[str, Any] = {"request_id": request_id, "server_message": server_message, "body": detail}
    if status is not None:
        kwargs["status"] = status
    if cls is NodeAPIError:
        kwargs["code"] = code or "UNKNOWN"
    if cls in (OverloadedError, NotReadyError):
        kwargs["retry_after"] = retry_after
    return cls(**kwargs)


class APIConnectionError(TeeNodeError):
    message = "could not reach the node"


class APITimeoutError(APIConnectionError):
    message = "the node did not answer in time"


class DuplicateEvent(TranscriptMismatch):
    message = "stream event received twice"


class MalformedEvent(VerificationError):
    message = "stream event is not a JSON object"


class UsageMismatch(ReceiptInvalid):
    message = "usage sent in clear differs from the signed receipt"


class UnexpectedResponse(VerificationError):
    message = "the node's answer has an unexpected form"


__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "BodyTooLargeError",
    "DecryptionFailedError",
    "DuplicateEvent",
    "ERRORS_BY_CODE",
    "HashMismatchError",
    "InternalServerError",
    "InvalidBodyError",
    "InvalidSignatureError",
    "MalformedEvent",
    "ModelNotFoundError",
    "NodeAPIError",
    "NotReadyError",
    "OverloadedError",
    "ReplayedRequestError",
    "StaleNodeKeyError",
    "UnauthorizedError",
    "UnexpectedResponse",
    "UsageMismatch",
    "error_from_body",
]
