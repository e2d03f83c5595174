"""The calls: the OpenAI-shaped namespaces, and one sealed request's way there and back.

A confidential request is sealed to the attested keys (`envelope.seal_request`: X25519, with
the attested ML-KEM key the hybrid exchange, padded), authorised by the credential, sent on
the transport the attestation pinned, retried as the node asks, and its answer opened and
verified (signature, hash, receipt) before anything is returned.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel

from attestation.errors import TlsCertificateMismatch

from ..envelope import OBFUSCATION_FIELD, seal_request
from .credentials import Credential, Outgoing
from .errors import OhttpKeyUnknownError, StaleNodeKeyError, UnexpectedResponse, error_from_response
from .session import AttestedSession, Retry
from .streams import AsyncStream, check_clear_usage, check_receipt, parse_plaintext
from .transports import Response
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CreateEmbeddingResponse,
    ImagesResponse,
    ModelList,
    NodeIdentity,
)

T = TypeVar("T", bound=BaseModel)

ERROR_BODY_LIMIT = 1024 * 1024  # an error answer's body read from a stream, at most


def compact_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Calls:
    """Sends requests to the attested node and verifies the answers."""

    def __init__(
        self,
        session: AttestedSession,
        credential: Credential | None,
        retry: Retry,
        *,
        length_hiding: bool,
    ) -> None:
        self.session = session
        self.length_hiding = length_hiding
        self._credential = credential
        self._retry = retry

    async def _headers(self, method: str, path: str, identity: NodeIdentity) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._credential is not None:
            headers.update(await self._credential.headers(Outgoing(method, path, identity)))
        return headers

    async def get_json(self, path: str) -> Any:
        """GET `path` from the attested node (attested first: the credential goes to no other),
        over attested TLS only on a connection to the attested certificate."""
        repinned = False
        while True:
            pinned = await self.session.current()
            headers = await self._headers("GET", path, pinned.identity)
            try:
                response = await pinned.transport.request("GET", path, headers, None)
                break
            except TlsCertificateMismatch:
                if repinned:
                    raise
                repinned = True
                await self.session.reattest(pinned)
        if response.status != 200:
            raise error_from_response(response, pinned.transport.url)
        try:
            return json.loads(response.body)
        except ValueError:
            raise UnexpectedResponse("response is not JSON") from None

    async def confidential(
        self, path: str, payload: dict[str, Any], stream: bool, kind: type[T], num_compute_units: int | None = None
    ) -> Any:
        """Seal, send, retry as the node asks, then open and verify the answer."""
        model = payload["model"]
        if not isinstance(model, str):
            raise TypeError("model must be a string")
        payload = {k: v for k, v in payload.items() if k != OBFUSCATION_FIELD}  # the padding is ours to add
        if not self.length_hiding:
            options = payload.get("stream_options")
            payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_obfuscation": False}
        plaintext = compact_json(payload)
        reattested = repinned = False
        attempt = 0
        while True:
            pinned = await self.session.current()
            identity = pinned.identity
            outer, opener = seal_request(
                plaintext,
                identity.dh_public_key,
                model,
                kem_public_key=self.session.hybrid_key(identity),
                padding=self.length_hiding,
                stream=stream or None,
                num_compute_units=num_compute_units,
                signing_key=identity.signing_public_key,
            )
            headers = {**await self._headers("POST", path, identity), "Content-Type": "application/json"}
            try:
                if stream:
                    response: Any = await pinned.transport.stream("POST", path, {**headers, "Accept": "text/event-stream"}, compact_json(outer))
                else:
                    response = await pinned.transport.request("POST", path, headers, compact_json(outer))
            except TlsCertificateMismatch:
                if repinned:
                    raise
                repinned = True  # a restarted node has a new certificate: attest it once more
                await self.session.reattest(pinned)
                continue
            if response.status == 200:
                break
            if stream:
                try:
                    error_body = await response.read(ERROR_BODY_LIMIT)
                finally:
                    await response.aclose()
                response = Response(response.status, response.headers, error_body)
            error = error_from_response(response, pinned.transport.url)
            # A rotated envelope key, or gateway key behind a relay: attest again, send again once.
            if isinstance(error, (StaleNodeKeyError, OhttpKeyUnknownError)) and not reattested:
                reattested = True
                await self.session.reattest(pinned)
                continue
            if await self._retry(error, attempt + 1):
                attempt += 1
                continue
            raise error
        if stream:
            if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
                await response.aclose()
                raise UnexpectedResponse("expected an event stream")
            return AsyncStream(response, opener, identity, model, kind)
        try:
            sealed = json.loads(response.body)
        except (ValueError, UnicodeDecodeError):
            raise UnexpectedResponse("response is not JSON") from None
        if not isinstance(sealed, dict):
            raise UnexpectedResponse("response is not a JSON object")
        opened = opener.open_response(sealed, require_receipt=True)
        receipt = check_receipt(opener.finish(), identity, model, [sealed.get("usage")])
        result = parse_plaintext(opened, kind)
        check_clear_usage(receipt, getattr(result, "usage", None))
        result.receipt = receipt  # type: ignore[attr-defined]
        result.attestation = identity  # type: ignore[attr-defined]
        return result


class _ChatCompletions:
    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def create(
        self, *, model: str, messages: list[dict[str, Any]], stream: bool = False, **params: Any
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        payload = {"model": model, "messages": messages, **params, "stream": bool(stream)}
        kind = ChatCompletionChunk if stream else ChatCompletion
        return await self._calls.confidential("/v1/confidential/chat/completions", payload, stream, kind)


class Chat:
    def __init__(self, calls: Calls) -> None:
        self.completions = _ChatCompletions(calls)


class Completions:
    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def create(
        self, *, model: str, prompt: Any, stream: bool = False, **params: Any
    ) -> Completion | AsyncStream[Completion]:
        payload = {"model": model, "prompt": prompt, **params, "stream": bool(stream)}
        return await self._calls.confidential("/v1/confidential/completions", payload, stream, Completion)


class Embeddings:
    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def create(self, *, model: str, input: Any, **params: Any) -> CreateEmbeddingResponse:
        payload = {"model": model, "input": input, **params}
        return await self._calls.confidential("/v1/confidential/embeddings", payload, False, CreateEmbeddingResponse)


class Images:
    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def generate(
        self,
        *,
        model: str,
        prompt: str,
        n: int | None = None,
        size: str | None = None,
        response_format: str | None = None,
        **params: Any,
    ) -> ImagesResponse:
        """Images as PNGs (`ImagesResponse.data[i].png()`); the node's defaults where None.
        With `size` the outer `num_compute_units` (width x height x n) goes along, as Atoma's
        proxy meters images by it; the node checks it against the sealed request."""
        chosen = {"n": n, "size": size, "response_format": response_format}
        payload = {"model": model, "prompt": prompt, **params, **{k: v for k, v in chosen.items() if v is not None}}
        units = None
        if size is not None:
            width, _, height = size.partition("x")
            if width.isdigit() and height.isdigit():
                units = int(width) * int(height) * (n or 1)
        return await self._calls.confidential(
            "/v1/confidential/images/generations", payload, False, ImagesResponse, num_compute_units=units
        )


class Models:
    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def list(self) -> ModelList:
        """GET /v1/models (public metadata, not encrypted)."""
        return ModelList.model_validate(await self._calls.get_json("/v1/models"))
