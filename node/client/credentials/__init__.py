"""What authorises a request: a `Credential` gives the headers for one request.

`Bearer` is the node's API key. A credential that spends something per request (one token
each) is one more class here or in a module of its own; the calls ask it once per request
sent, retries included, and never before the node's attestation was verified and accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..types import NodeIdentity


@dataclass(frozen=True)
class Outgoing:
    """The request a credential authorises."""

    method: str
    path: str
    identity: NodeIdentity  # the attested node it goes to (verified and accepted)


class Credential(Protocol):
    async def headers(self, request: Outgoing) -> Mapping[str, str]:
        """The headers that authorise this one request (empty: none)."""
        ...


@dataclass(frozen=True)
class Bearer:
    """`Authorization: Bearer <token>` on every request."""

    token: str

    def __repr__(self) -> str:  # the token never reaches a log or a trace
        return "Bearer(token=<hidden>)"

    async def headers(self, request: Outgoing) -> Mapping[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


__all__ = ["Bearer", "Credential", "Outgoing"]
