"""Through an Oblivious HTTP relay: the node never sees the client's address.

Every exchange, the attestation's included, is a Binary HTTP request encapsulated to the node's
gateway key (RFC 9458) and POSTed to the relay, which forwards it to the node's gateway; event
streams go as chunked OHTTP, each piece opened as it arrives. The key configuration comes from
the relay (`GET /v1/ohttp/keys`, which it fetches from the gateway) and counts only once the
attestation fetched through it binds the very same bytes (`public_keys.ohttp`, in
`report_data`): a relay that handed out its own key would be caught there, before anything but
the attestation request was sent. After that, the attested configuration is the one used.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from attestation.errors import OhttpKeyMismatch

from ...crypto import Base64Error, b64d
from ...errors import ResponseDecryptionFailed
from ...ohttp import bhttp
from ...ohttp.encapsulation import (
    MEDIA_CHUNKED_REQUEST,
    MEDIA_CHUNKED_RESPONSE,
    MEDIA_KEYS,
    MEDIA_REQUEST,
    MEDIA_RESPONSE,
    ChunkedResponseOpener,
    KeyConfig,
    OhttpError,
    RequestEncapsulator,
    decode_key_configs,
)
from ..errors import APIConnectionError, UnexpectedResponse
from .base import MAX_RESPONSE_BYTES, AttestationChannel, Response, Transport, public_url
from .direct import AiohttpStream, HttpSession, unreachable

if TYPE_CHECKING:
    from ..types import NodeIdentity

MAX_KEYS_BYTES = 64 * 1024


class OhttpRelayTransport:
    """Exchanges with the node at `node_url`, encapsulated to `config` and sent via `relay_url`."""

    def __init__(self, http: HttpSession, relay_url: str, node_url: str, config: KeyConfig, timeout: float) -> None:
        self._http = http
        self._relay = relay_url
        self._authority = urlsplit(node_url).netloc.rpartition("@")[2]
        self._config = config
        self._timeout = timeout
        self.url = public_url(node_url)

    def _encode(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
        fields = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        return bhttp.encode_request(bhttp.Request(method, "https", self._authority, path, fields, body or b""))

    async def request(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> Response:
        exchange = RequestEncapsulator(self._config, chunked=False)
        outer = exchange.encapsulate(self._encode(method, path, headers, body))
        try:
            async with self._http.get().post(
                self._relay,
                data=outer,
                headers={"Content-Type": MEDIA_REQUEST},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                allow_redirects=False,
            ) as response:
                data = await response.content.read(MAX_RESPONSE_BYTES + 1)
                if len(data) > MAX_RESPONSE_BYTES:
                    raise UnexpectedResponse("response too large")
                if response.status != 200 or response.content_type != MEDIA_RESPONSE:
                    return _outer_answer(response.status, response.headers, data, self._relay)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise unreachable(self._relay, exc, self._timeout) from None
        try:
            inner = bhttp.decode_response(exchange.open_response(data), max_content=MAX_RESPONSE_BYTES)
        except (OhttpError, bhttp.BhttpError):
            raise ResponseDecryptionFailed("the relayed answer does not decapsulate") from None
        return Response(inner.status, _headers(inner.headers), inner.content)

    async def stream(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> Any:
        exchange = RequestEncapsulator(self._config, chunked=True)
        outer = exchange.header() + exchange.final_chunk(self._encode(method, path, headers, body))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout, sock_read=self._timeout)
        try:
            response = await self._http.get().post(
                self._relay, data=outer, headers={"Content-Type": MEDIA_CHUNKED_REQUEST}, timeout=timeout, allow_redirects=False
            )
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise unreachable(self._relay, exc, self._timeout) from None
        if response.status != 200 or response.content_type != MEDIA_CHUNKED_RESPONSE:
            return AiohttpStream(response)  # the relay's or the gateway's refusal, read as an error answer
        relayed = RelayedStream(response, exchange, self._relay)
        await relayed.start()
        return relayed


def _headers(fields: bhttp.Fields) -> CIMultiDict[str]:
    return CIMultiDict((name.decode("latin-1"), value.decode("latin-1")) for name, value in fields)


def _outer_answer(status: int, headers: Mapping[str, str], body: bytes, relay: str) -> Response:
    """A refusal by the gateway (its problem+json carries the node's error code) or the relay."""
    if status == 502:
        raise APIConnectionError(url=public_url(relay), cause="the relay could not reach the node's gateway")
    if status == 200:
        raise UnexpectedResponse("the relay answered something that is not Oblivious HTTP")
    return Response(status, headers, body)


class RelayedStream:
    """A `StreamResponse` whose status, headers and content come from the chunked OHTTP answer:
    each chunk is opened as it arrives; the end counts only when the final chunk opened."""

    def __init__(self, response: aiohttp.ClientResponse, exchange: RequestEncapsulator, relay: str) -> None:
        self._response = response
        self._opener = ChunkedResponseOpener(exchange)
        self._message = bhttp.ResponseStream(MAX_RESPONSE_BYTES)
        self._pending = b""
        self._pieces = response.content.iter_any()
        self._ended = False
        self._relay = relay
        self.status = 0
        self.headers: Mapping[str, str] = CIMultiDict()

    async def _next(self) -> bytes:
        """The content the next piece of the relay's answer completes ('' once it has ended)."""
        try:
            try:
                piece = await self._pieces.__anext__()
            except StopAsyncIteration:
                self._ended = True
                content = self._message.feed(self._opener.end())
                self._message.finish()
                return content
            return self._message.feed(self._opener.feed(piece))
        except (OhttpError, bhttp.BhttpError):
            raise ResponseDecryptionFailed("the relayed answer does not decapsulate") from None
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise unreachable(self._relay, exc) from None

    async def start(self) -> None:
        """Read until the inner answer's status and headers are in."""
        try:
            while self._message.head is None and not self._ended:
                self._pending += await self._next()
            if self._message.head is None:
                raise ResponseDecryptionFailed("the relayed answer has no head")
        except BaseException:
            self._response.release()
            raise
        self.status = self._message.head.status
        self.headers = _headers(self._message.head.headers)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        if self._pending:
            pending, self._pending = self._pending, b""
            yield pending
        while not self._ended:
            content = await self._next()
            if content:
                yield content

    async def read(self, limit: int) -> bytes:
        out = bytearray()
        async for content in self.chunks():
            out += content
            if len(out) >= limit:
                break
        return bytes(out[:limit])

    async def aclose(self) -> None:
        self._response.release()


def _attested_configs(value: Any) -> list[KeyConfig]:
    """The key configurations of a document's `public_keys.ohttp` (none when absent or malformed)."""
    try:
        return decode_key_configs(b64d(value)) if isinstance(value, str) else []
    except (Base64Error, OhttpError):
        return []


class OhttpRelayRoute:
    """The node at `node_url` reached only through the relay at `relay_url`."""

    def __init__(self, http: HttpSession, node_url: str, relay_url: str, timeout: float) -> None:
        self.url = node_url
        self._http = http
        self._relay = relay_url.rstrip("/")
        self._timeout = timeout

    def _transport(self, config: KeyConfig) -> Transport:
        return OhttpRelayTransport(self._http, self._relay + "/", self.url, config, self._timeout)

    async def attestation_channel(self) -> AttestationChannel:
        keys = await self._fetch_keys()
        try:
            config = decode_key_configs(keys)[0]
        except OhttpError:
            raise UnexpectedResponse("the relay's key configuration is malformed") from None

        def check_binding(verified: Any) -> None:
            if config not in _attested_configs((verified.public_keys or {}).get("ohttp")):
                raise OhttpKeyMismatch(
                    "the attestation does not bind the Oblivious HTTP key the relay gave (public_keys.ohttp): "
                    "a relay answering with its own key, or a node without a gateway; nothing but the "
                    "attestation request was sent"
                )

        return AttestationChannel(self._transport(config), check_binding=check_binding)

    async def _fetch_keys(self) -> bytes:
        try:
            async with self._http.get().get(
                self._relay + "/v1/ohttp/keys", timeout=aiohttp.ClientTimeout(total=self._timeout), allow_redirects=False
            ) as response:
                body = await response.content.read(MAX_KEYS_BYTES + 1)
                if response.status != 200 or response.content_type != MEDIA_KEYS or len(body) > MAX_KEYS_BYTES:
                    raise APIConnectionError(url=public_url(self._relay), cause="the relay did not answer the gateway's keys")
                return body
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise unreachable(self._relay, exc, self._timeout) from None

    def attested(self, identity: NodeIdentity) -> Transport:
        """The transport to the current key configuration the verified document binds."""
        public_keys = (identity.document or {}).get("public_keys")
        configs = _attested_configs(public_keys.get("ohttp") if isinstance(public_keys, dict) else None)
        if not configs:
            raise OhttpKeyMismatch("the attestation binds no usable Oblivious HTTP key configuration")
        return self._transport(configs[0])

    async def aclose(self) -> None:
        await self._http.aclose()
