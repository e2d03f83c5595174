"""Attested TLS: every connection after the attestation must present the attested certificate.

The certificate is read from a TLS handshake without CA validation (what makes it trusted is
the attestation that must bind it); the document is fetched on a connection presenting that
same certificate, and every later connection must present the certificate the verified
document bound (pinned by its SHA-256), else `TlsCertificateMismatch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

from attestation.errors import TlsCertificateMismatch

from ..errors import APIConnectionError
from .base import AttestationChannel, Transport
from .direct import DirectTransport, HttpSession, unreachable

if TYPE_CHECKING:
    from ..types import NodeIdentity


class PinnedTlsTransport(DirectTransport):
    """HTTPS exchanges only on connections presenting the certificate with this SHA-256."""

    def __init__(self, http: HttpSession, base_url: str, timeout: float, certificate_sha256: bytes) -> None:
        super().__init__(http, base_url, timeout, tls=aiohttp.Fingerprint(certificate_sha256))

    def _failure(self, exc: Exception) -> Exception:
        if isinstance(exc, aiohttp.ServerFingerprintMismatch):
            return TlsCertificateMismatch(
                f"the node presented TLS certificate sha256 {exc.got.hex()}, not the attested {exc.expected.hex()}: "
                "a man-in-the-middle, or a node that restarted and must be attested again"
            )
        return super()._failure(exc)


class PinnedTlsRoute:
    """An https:// node serving attested TLS."""

    def __init__(self, http: HttpSession, base_url: str, timeout: float) -> None:
        self.url = base_url
        self._http = http
        self._timeout = timeout

    async def attestation_channel(self) -> AttestationChannel:
        certificate = await self._server_certificate()
        pinned = PinnedTlsTransport(self._http, self.url, self._timeout, hashlib.sha256(certificate).digest())
        return AttestationChannel(pinned, tls_certificate=certificate)

    def attested(self, identity: NodeIdentity) -> Transport:
        if identity.tls_cert_sha256 is None:  # verify_document requires the binding it was given
            raise TlsCertificateMismatch("the attestation binds no TLS certificate")
        return PinnedTlsTransport(self._http, self.url, self._timeout, identity.tls_cert_sha256)

    async def _server_certificate(self) -> bytes:
        """The DER certificate the node presents, read without CA validation."""
        url = urlsplit(self.url)
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(url.hostname, url.port or 443, ssl=unverified), self._timeout
            )
        except (asyncio.TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            raise unreachable(self.url, exc, self._timeout) from None
        try:
            certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        if not certificate:
            raise APIConnectionError("the node presented no TLS certificate")
        return certificate

    async def aclose(self) -> None:
        await self._http.aclose()
