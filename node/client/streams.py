"""Opening the node's answers: whole responses, event streams, and their receipts."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from ..envelope import OBFUSCATION_FIELD, ResponseOpener
from ..errors import EventAfterEnd, ReceiptInvalid
from ..protocol import Receipt
from ..wire import SSE_DONE, EventTooLarge, SSEDecoder
from .errors import DuplicateEvent, MalformedEvent, UnexpectedResponse, UsageMismatch, error_from_body
from .transports import StreamResponse
from .types import NodeIdentity

T = TypeVar("T", bound=BaseModel)


def check_receipt(receipt: dict[str, Any], identity: NodeIdentity, model: str, clear_usages: list[Any]) -> Receipt:
    """Checks beyond `verify_receipt`: this key epoch, this model, clear usage = signed usage."""
    if receipt.get("key_epoch") != identity.key_epoch:
        raise ReceiptInvalid("receipt is for another key epoch")
    if receipt.get("model") != model:
        raise ReceiptInvalid("receipt is for another model")
    for usage in clear_usages:
        if usage is not None and usage != receipt.get("usage"):
            raise UsageMismatch()
    try:
        return Receipt.model_validate(receipt)
    except ValidationError:
        raise ReceiptInvalid("receipt is malformed") from None


def check_clear_usage(receipt: Receipt, usage: Any) -> None:
    """The signed (clear) usage against the exact usage inside the answer: the node may round
    counts up (`privacy.clear_usage = "bucketed"`) or send none, never count fewer tokens."""
    if receipt.usage is None or usage is None:
        return
    for field in ("prompt_tokens", "completion_tokens"):
        if getattr(receipt.usage, field) < (getattr(usage, field, 0) or 0):
            raise UsageMismatch("the signed usage counts fewer tokens than the answer's own usage")


def parse_plaintext(plaintext: bytes, kind: type[T]) -> T:
    """A decrypted answer or chunk as its response type (our fields removed)."""
    try:
        data = json.loads(plaintext)
    except (ValueError, UnicodeDecodeError):
        raise UnexpectedResponse("decrypted response is not JSON") from None
    if not isinstance(data, dict):
        raise UnexpectedResponse("decrypted response is not a JSON object")
    data.pop("receipt", None)
    data.pop("attestation", None)
    data.pop(OBFUSCATION_FIELD, None)
    try:
        return kind.model_validate(data)
    except ValidationError:
        raise UnexpectedResponse("decrypted response does not have the expected shape") from None


class AsyncStream(Generic[T]):
    """A verified stream of chunks: `async for chunk in stream`.

    Each chunk is yielded as soon as its event decrypts and its signature verifies under the
    attested key. The event carrying the receipt (the last one, with usage and no choices) is
    held until the connection closes, so the iteration ends normally only when the receipt
    verified and nothing followed it; otherwise it raises (MissingReceipt, TranscriptMismatch,
    EventAfterEnd, a NodeAPIError for an error event...). Chunks yielded before an error were
    individually authentic but the answer as a whole was not confirmed: discard it.
    """

    def __init__(
        self,
        response: StreamResponse,
        opener: ResponseOpener,
        identity: NodeIdentity,
        model: str,
        kind: type[T],
    ) -> None:
        self._response = response
        self._opener = opener
        self._kind = kind
        self._model = model
        self.attestation = identity
        self.receipt: Receipt | None = None
        self.usage: Any = None
        self.request_id = response.headers.get("X-Request-Id")
        self._iterating = False
        self._done = False

    def __aiter__(self) -> AsyncIterator[T]:
        if self._iterating:
            raise RuntimeError("a stream can be iterated once")
        self._iterating = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        decoder = SSEDecoder()
        seen_nonces: set[str] = set()
        clear_usages: list[Any] = []
        held: T | None = None
        try:
            async with contextlib.aclosing(self._response.chunks()) as chunks:
                async for data in chunks:
                    try:
                        events = decoder.feed(data)
                    except EventTooLarge:
                        raise UnexpectedResponse("stream event too large") from None
                    for event_data in events:
                        chunk = self._open(event_data, seen_nonces, clear_usages)
                        if chunk is None:
                            continue
                        if self._opener.ended:
                            held = chunk  # the receipt's event: released once nothing follows it
                        elif not self._is_filler(chunk):
                            yield chunk
            if decoder.pending and self._opener.ended:
                raise ReceiptInvalid("data after the final event")
            raw_receipt = self._opener.finish()  # MissingReceipt when the stream was cut
            self.receipt = check_receipt(raw_receipt, self.attestation, self._model, clear_usages)
            if held is not None:
                self.usage = getattr(held, "usage", None)
                check_clear_usage(self.receipt, self.usage)
                self._done = True
                yield held
            self._done = True
        finally:
            await self._response.aclose()

    def _open(self, data: bytes, seen_nonces: set[str], clear_usages: list[Any]) -> T | None:
        if data.strip() == SSE_DONE:
            return None
        try:
            event = json.loads(data)
        except ValueError:  # UnicodeDecodeError included
            raise MalformedEvent() from None
        if not isinstance(event, dict):
            raise MalformedEvent()
        if "error" in event and "ciphertext" not in event:
            raise error_from_body(None, event, request_id=self.request_id)
        if self._opener.ended:
            raise EventAfterEnd()
        nonce = event.get("nonce")
        if isinstance(nonce, str):
            # The node draws a fresh nonce per event: a repeat is a duplicated (replayed) event.
            if nonce in seen_nonces:
                raise DuplicateEvent()
            seen_nonces.add(nonce)
        plaintext = self._opener.open_event(event)
        if "usage" in event:
            clear_usages.append(event["usage"])
        return parse_plaintext(plaintext, self._kind)

    @staticmethod
    def _is_filler(chunk: BaseModel) -> bool:
        """A verified chunk with neither choices nor usage: a timing-cover event
        (`limits.stream_cadence_ms`) that only keeps the node's cadence."""
        return not getattr(chunk, "choices", None) and getattr(chunk, "usage", None) is None

    @property
    def completed(self) -> bool:
        """True once the stream ended with a verified receipt."""
        return self._done

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
