"""The client's exceptions: one class per row of the error table (`node.wire.ERROR_TABLE`,
status, code and message from the row), and what the client itself refuses.

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
    │   ├── WorkerRefusedError        403 WORKER_REFUSED (.failed_claims: a worker VM's join)
    │   ├── OverloadedError           429 OVERLOADED (.retry_after)
    │   ├── NotReadyError             503 NOT_READY
    │   ├── InternalServerError       500 INTERNAL_ERROR
    │   ├── NotFoundError             404 NOT_FOUND (no such path: not a tee-node?)
    │   ├── MethodNotAllowedError     405 METHOD_NOT_ALLOWED
    │   ├── PlaintextDisabledError    404 PLAINTEXT_DISABLED (a plain route on a node without them)
    │   ├── OhttpDecapsulationFailedError 400 OHTTP_DECAPSULATION_FAILED (the relayed request did not decapsulate)
    │   ├── OhttpKeyUnknownError      400 OHTTP_KEY_UNKNOWN (the gateway key rotated: attest again)
    │   └── UnsupportedMediaTypeError 415 UNSUPPORTED_MEDIA_TYPE
    ├── APIConnectionError / APITimeoutError
    └── VerificationError (node.errors: ResponseDecryptionFailed, ResponseHashMismatch,
        BadSignature, MissingField, ReceiptInvalid > TranscriptMismatch, MissingReceipt,
        EventAfterEnd, PaddingMissing; here: DuplicateEvent, MalformedEvent, UsageMismatch,
        UnexpectedResponse)

Attestation failures are `attestation.errors.AttestationError` (re-exported by `node.client`).
"""

from __future__ import annotations

import email.utils
import json
import re
from datetime import datetime, timezone
from typing import Any

from yarl import URL

from ..errors import ReceiptInvalid, TeeNodeError, TranscriptMismatch, VerificationError
from ..wire import ERRORS, declared_by_code

_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


_DECLARED: dict[str, type[NodeAPIError]] = {}


class NodeAPIError(TeeNodeError):
    """The node answered with an error (status and code from the error table, node.wire.ERROR_TABLE)."""

    status = 0
    code = "UNKNOWN"
    message = "node error"

    def __init_subclass__(cls, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            kind = ERRORS[code]
            cls.status, cls.code, cls.message = kind.status, kind.code, kind.client_message
            _DECLARED[code] = cls

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


class InvalidBodyError(NodeAPIError, code="INVALID_BODY"):
    pass


class UnauthorizedError(NodeAPIError, code="UNAUTHORIZED"):
    pass


class InvalidSignatureError(NodeAPIError, code="INVALID_SIGNATURE"):
    pass


class DecryptionFailedError(NodeAPIError, code="DECRYPTION_FAILED"):
    pass


class HashMismatchError(NodeAPIError, code="HASH_MISMATCH"):
    pass


class ModelNotFoundError(NodeAPIError, code="MODEL_NOT_FOUND"):
    pass


class BodyTooLargeError(NodeAPIError, code="BODY_TOO_LARGE"):
    pass


class ReplayedRequestError(NodeAPIError, code="REPLAYED_REQUEST"):
    pass


class StaleNodeKeyError(NodeAPIError, code="STALE_NODE_KEY"):
    @property
    def key_epoch(self) -> int | None:
        epoch = self.body.get("key_epoch")
        return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


class WorkerRefusedError(NodeAPIError, code="WORKER_REFUSED"):
    @property
    def failed_claims(self) -> list[str]:
        claims = self.body.get("failed_claims")
        return [c for c in claims if isinstance(c, str)] if isinstance(claims, list) else []


class _Retryable(NodeAPIError):
    """An error the client retries after Retry-After (when the node sent one)."""

    def __init__(self, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retry_after = retry_after


class OverloadedError(_Retryable, code="OVERLOADED"):
    pass


class UnsupportedImageSizeError(NodeAPIError, code="UNSUPPORTED_IMAGE_SIZE"):
    @property
    def sizes(self) -> list[str] | None:
        """The sizes the model serves, as the node listed them."""
        sizes = self.body.get("sizes")
        return [s for s in sizes if isinstance(s, str)] if isinstance(sizes, list) else None


class TooManyImagesError(NodeAPIError, code="TOO_MANY_IMAGES"):
    @property
    def max_images(self) -> int | None:
        value = self.body.get("max_images")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


class PromptTooLongError(NodeAPIError, code="PROMPT_TOO_LONG"):
    @property
    def max_prompt_tokens(self) -> int | None:
        value = self.body.get("max_prompt_tokens")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


class NotReadyError(_Retryable, code="NOT_READY"):
    pass


class TokenSpentError(NodeAPIError, code="TOKEN_SPENT"):
    pass


class InvalidTokenError(NodeAPIError, code="INVALID_TOKEN"):
    pass


class TokenKeyRetiredError(NodeAPIError, code="TOKEN_KEY_RETIRED"):
    pass


class InvalidTokenRequestError(NodeAPIError, code="INVALID_TOKEN_REQUEST"):
    pass


class TokenBatchTooLargeError(NodeAPIError, code="TOKEN_BATCH_TOO_LARGE"):
    pass


class TokenQuotaExceededError(NodeAPIError, code="TOKEN_QUOTA_EXCEEDED"):
    """Not retried by the client: the quota refills over the hour (Retry-After says when)."""


class InternalServerError(NodeAPIError, code="INTERNAL_ERROR"):
    pass


class NotFoundError(NodeAPIError, code="NOT_FOUND"):
    pass


class MethodNotAllowedError(NodeAPIError, code="METHOD_NOT_ALLOWED"):
    pass


class PlaintextDisabledError(NodeAPIError, code="PLAINTEXT_DISABLED"):
    pass


class OhttpDecapsulationFailedError(NodeAPIError, code="OHTTP_DECAPSULATION_FAILED"):
    pass


class OhttpKeyUnknownError(NodeAPIError, code="OHTTP_KEY_UNKNOWN"):
    pass


class UnsupportedMediaTypeError(NodeAPIError, code="UNSUPPORTED_MEDIA_TYPE"):
    pass


# One class per row of the error table (importing fails while a row has none).
ERRORS_BY_CODE: dict[str, type[NodeAPIError]] = declared_by_code(_DECLARED, "client")


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
    if issubclass(cls, _Retryable):
        kwargs["retry_after"] = retry_after
    return cls(**kwargs)


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def public_url(url: str) -> str:
    """The URL as an error may show it: never a user name or password."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "(an unreadable URL)"
    return str(parsed.with_user(None)) if parsed.is_absolute() else url.rsplit("@", 1)[-1]


def error_from_response(response: Any, url: str) -> NodeAPIError | RedirectRefused:
    """The exception for an answer other than 200 (`.status`, `.headers`, `.body` bytes) from
    the node at `url`: a redirect is refused, anything else is the node's typed error."""
    if 300 <= response.status < 400:
        return RedirectRefused(url=public_url(url), status=response.status, location=response.headers.get("Location"))
    try:
        parsed = json.loads(response.body)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    return error_from_body(
        response.status,
        parsed,
        request_id=response.headers.get("X-Request-Id"),
        retry_after=retry_after_seconds(response.headers.get("Retry-After")),
    )


class APIConnectionError(TeeNodeError):
    """The node could not be reached, or the connection broke: `.url` (no credentials) and
    `.cause` (refused, DNS, TLS, timeout...) say where and why."""

    message = "could not reach the node"

    def __init__(self, message: str | None = None, *, url: str | None = None, cause: str | None = None) -> None:
        self.url, self.cause = url, cause
        if message is None and url is not None:
            message = f"{self.message} at {url}" + (f": {cause}" if cause else "")
        super().__init__(message)


class APITimeoutError(APIConnectionError):
    message = "the node did not answer in time"


class RedirectRefused(APIConnectionError):
    """The node answered with a redirect (3xx). The client follows none: the node it attests
    and talks to is the one at the URL it was given, and nothing was sent to `.location`."""

    message = "the node answered with a redirect"

    def __init__(self, *, url: str, status: int, location: str | None) -> None:
        self.status = status
        self.location = public_url(location)[:200] if location else None
        to = f" to {self.location}" if self.location else ""
        super().__init__(
            url=url,
            cause=f"HTTP {status}{to}; the client follows no redirects and sent nothing there: "
            "give the URL of the node itself",
        )


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
    "InvalidTokenError",
    "InvalidTokenRequestError",
    "MalformedEvent",
    "MethodNotAllowedError",
    "PlaintextDisabledError",
    "PromptTooLongError",
    "RedirectRefused",
    "ModelNotFoundError",
    "NodeAPIError",
    "NotFoundError",
    "NotReadyError",
    "OhttpDecapsulationFailedError",
    "OhttpKeyUnknownError",
    "OverloadedError",
    "ReplayedRequestError",
    "StaleNodeKeyError",
    "TokenBatchTooLargeError",
    "TokenKeyRetiredError",
    "TokenQuotaExceededError",
    "TokenSpentError",
    "TooManyImagesError",
    "UnauthorizedError",
    "UnexpectedResponse",
    "UnsupportedImageSizeError",
    "UnsupportedMediaTypeError",
    "UsageMismatch",
    "WorkerRefusedError",
    "error_from_body",
]
