"""How bytes reach the node: the interface every transport implements.

A `Transport` carries one HTTP exchange to the node (whole, or with the body streamed back
chunk by chunk). A `Route` is how the client reaches one node: the transport the attestation
is fetched on, then the transport bound to what that attestation proved (attested TLS: a
connection presenting the attested certificate). A new way to reach a node (a relay, say) is
one more module with a `Route` and its `Transport`; the session and the calls do not change.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from ..errors import APIConnectionError, public_url

if TYPE_CHECKING:
    from ..types import NodeIdentity

# The largest whole answer read into memory (an attestation document with GPU evidence is the
# largest expected, at a few MiB).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Response:
    """A whole answer: status, headers (case-insensitive lookup), body."""

    status: int
    headers: Mapping[str, str]
    body: bytes = field(repr=False)


class StreamResponse(Protocol):
    """An answer whose body arrives chunk by chunk (event streams)."""

    status: int
    headers: Mapping[str, str]

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives; a failure raises `APIConnectionError` (or `APITimeoutError`)."""
        ...

    async def read(self, limit: int) -> bytes:
        """The rest of the body, at most `limit` bytes (an error answer's body)."""
        ...

    async def aclose(self) -> None:
        """Stop reading and free the connection; idempotent."""
        ...


class Transport(Protocol):
    """One exchange with the node. `path` starts with `/` and may carry a query string.
    Failures to reach the node raise `APIConnectionError` / `APITimeoutError`; a transport
    that pins something the node presents raises that check's `AttestationError`."""

    url: str  # the node as an error may name it: never a user name or password

    async def request(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> Response: ...

    async def stream(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> StreamResponse: ...


@dataclass(frozen=True)
class AttestationChannel:
    """Where the next attestation document is fetched, and what it must bind besides the keys."""

    transport: Transport
    # The DER certificate this channel's connection presented (attested TLS): the document must
    # bind its SHA-256. None when the route has no TLS certificate of its own to bind.
    tls_certificate: bytes | None = field(default=None, repr=False)
    # A further binding the verified document must show (e.g. a relay route's key
    # configuration); called with `attestation.document.VerifiedAttestation`, raises an
    # `AttestationError` naming what is not bound.
    check_binding: Callable[[Any], None] | None = None


class Route(Protocol):
    """How the client reaches one node."""

    url: str

    async def attestation_channel(self) -> AttestationChannel:
        """The channel for fetching one attestation document (called for every fetch)."""
        ...

    def attested(self, identity: NodeIdentity) -> Transport:
        """The transport every request after that verified attestation uses."""
        ...

    async def aclose(self) -> None: ...


def scheme_of(url: str) -> str:
    """http or https; any other URL is refused before anything is sent, with what to write instead."""
    parsed = urlsplit(url)
    if parsed.scheme in ("http", "https") and parsed.hostname:
        return parsed.scheme
    shown = public_url(url)
    if not parsed.hostname:  # "localhost:8080" reads as scheme "localhost"
        raise APIConnectionError(url=shown, cause=f"not an http:// or https:// URL; did you mean http://{shown}?")
    raise APIConnectionError(url=shown, cause=f"the {parsed.scheme}:// scheme is not supported; use http:// or https://")
