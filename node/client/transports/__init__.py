"""How bytes reach the node: `base` (the interface), `direct` (aiohttp), `pinned_tls` (attested TLS),
`ohttp_relay` (through an Oblivious HTTP relay)."""

from .base import MAX_RESPONSE_BYTES, AttestationChannel, Response, Route, StreamResponse, Transport, public_url, scheme_of
from .direct import DirectRoute, DirectTransport, HttpSession, unreachable
from .ohttp_relay import OhttpRelayRoute, OhttpRelayTransport
from .pinned_tls import PinnedTlsRoute, PinnedTlsTransport

__all__ = [
    "MAX_RESPONSE_BYTES",
    "AttestationChannel",
    "DirectRoute",
    "DirectTransport",
    "HttpSession",
    "OhttpRelayRoute",
    "OhttpRelayTransport",
    "PinnedTlsRoute",
    "PinnedTlsTransport",
    "Response",
    "Route",
    "StreamResponse",
    "Transport",
    "public_url",
    "scheme_of",
    "unreachable",
]
