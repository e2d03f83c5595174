"""The direct transport: plain aiohttp to the node's URL, http:// or https:// (CA-validated)."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from attestation.errors import TlsCertificateMismatch

from ..errors import APIConnectionError, APITimeoutError, UnexpectedResponse
from .base import MAX_RESPONSE_BYTES, AttestationChannel, Response, Transport, public_url

if TYPE_CHECKING:
    from ..types import NodeIdentity

USER_AGENT = "tee-node-client/0.1"


def unreachable(url: str, exc: BaseException, timeout: float | None = None) -> APIConnectionError:
    """The error for a failed exchange with the node at `url`, naming the cause. Library
    messages are not passed on: the cause is said in fixed words."""
    shown = public_url(url)
    if isinstance(exc, asyncio.TimeoutError):
        limit = f" within {timeout:g} s" if timeout else ""
        return APITimeoutError(url=shown, cause=f"timed out: no answer{limit}")
    if isinstance(exc, aiohttp.InvalidURL):
        return APIConnectionError(url=shown, cause="not a valid URL")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return APIConnectionError(url=shown, cause=f"DNS: the name {URL(url).host!r} does not resolve")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return APIConnectionError(url=shown, cause="TLS: the node's certificate does not verify")
    if isinstance(exc, (aiohttp.ClientConnectorSSLError, aiohttp.ClientSSLError)):
        return APIConnectionError(url=shown, cause="TLS: the handshake failed (is the node serving plain http://?)")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return APIConnectionError(url=shown, cause="connection refused: is the node running and listening there?")
        return APIConnectionError(url=shown, cause=f"cannot connect ({type(exc.os_error).__name__})")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return APIConnectionError(url=shown, cause="the node closed the connection")
    if isinstance(exc, ssl.SSLError):  # raw sockets (reading the node's certificate), not aiohttp's
        return APIConnectionError(url=shown, cause="TLS: the handshake failed (is the node serving plain http://?)")
    if isinstance(exc, ConnectionRefusedError):
        return APIConnectionError(url=shown, cause="connection refused: is the node running and listening there?")
    return APIConnectionError(url=shown, cause=f"the connection failed ({type(exc).__name__})")


class HttpSession:
    """The one aiohttp session of a client: the caller's, or one made on first use (inside the
    event loop that uses it) and closed with the client."""

    def __init__(self, session: aiohttp.ClientSession | None = None) -> None:
        self._session = session
        self._owned = session is None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
            self._owned = True
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and self._owned:
            await self._session.close()
        self._session = None


class AiohttpStream:
    """A `StreamResponse` over an aiohttp response."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for data in self._response.content.iter_any():
                yield data
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise unreachable(str(self._response.url.origin()), exc) from None

    async def read(self, limit: int) -> bytes:
        try:
            return await self._response.content.read(limit)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return b""  # an error answer cut short still has its status

    async def aclose(self) -> None:
        self._response.release()


class DirectTransport:
    """HTTP exchanges with `base_url` through aiohttp. `tls` is aiohttp's `ssl=` argument: True
    validates the certificate against the system's CAs; a pinned transport passes a fingerprint."""

    def __init__(self, http: HttpSession, base_url: str, timeout: float, tls: Any = True) -> None:
        self._http = http
        self._base_url = base_url
        self._timeout = timeout
        self._tls = tls
        self.url = public_url(base_url)

    def _failure(self, exc: Exception) -> Exception:
        """The error to raise for an aiohttp failure (a pinned transport adds its own)."""
        return unreachable(self._base_url, exc, self._timeout)

    async def request(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> Response:
        try:
            async with self._http.get().request(
                method,
                self._base_url + path,
                data=body,
                headers=dict(headers),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                ssl=self._tls,
                allow_redirects=False,  # a 3xx is answered to the caller, which refuses it
            ) as response:
                if response.content_length is not None and response.content_length > MAX_RESPONSE_BYTES:
                    raise UnexpectedResponse("response too large")
                data = await response.content.read(MAX_RESPONSE_BYTES + 1)
                if len(data) > MAX_RESPONSE_BYTES:
                    raise UnexpectedResponse("response too large")
                return Response(response.status, response.headers, data)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc) from None

    async def stream(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> AiohttpStream:
        # No total limit: a stream lasts as long as the answer; each read must progress in time.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout, sock_read=self._timeout)
        try:
            response = await self._http.get().request(
                method,
                self._base_url + path,
                data=body,
                headers=dict(headers),
                timeout=timeout,
                ssl=self._tls,
                allow_redirects=False,
            )
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc) from None
        return AiohttpStream(response)


class DirectRoute:
    """Straight to the node over plain http://: the attestation and every request on one transport."""

    def __init__(self, http: HttpSession, base_url: str, timeout: float) -> None:
        self.url = base_url
        self._http = http
        self._transport = DirectTransport(http, base_url, timeout)
        self._loopback = is_loopback(urlsplit(base_url).hostname or "")

    async def attestation_channel(self) -> AttestationChannel:
        return AttestationChannel(self._transport, check_binding=None if self._loopback else self._refuse_attested_tls)

    def _refuse_attested_tls(self, verified: Any) -> None:
        """A node whose document binds a TLS certificate serves attested TLS: reached over plain
        HTTP, no certificate was checked and anyone on the path could have answered for it."""
        if verified.tls_cert_sha256 is not None:
            https = public_url("https://" + self.url.split("://", 1)[1])
            raise TlsCertificateMismatch(
                f"the attestation binds TLS certificate sha256 {verified.tls_cert_sha256.hex()}, but it was fetched "
                f"over plain http:// where no certificate is checked; nothing else was sent to it: use {https}"
            )

    def attested(self, identity: NodeIdentity) -> Transport:
        return self._transport

    async def aclose(self) -> None:
        await self._http.aclose()


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: a connection that never leaves the machine."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
