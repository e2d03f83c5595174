"""Worker VMs of a multi-VM node: how a worker's own evidence binds its link key.

A worker answers the head's join challenge with its own attestation document whose nonce is
`link_nonce(challenge, link_public_key)`: its report_data then commits to the WireGuard key
that encrypts the traffic between the VMs, and anyone holding the entry (the head at join, a
client later, offline) recomputes the nonce and verifies the document like any other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .errors import DocumentInvalid
from .fields import b64_bytes, b64_text, hex_bytes

LINK_NONCE_DOMAIN = b"tee-node/worker-link/v1"
CHALLENGE_SIZE = 32
LINK_KEY_SIZE = 32


def link_nonce(challenge: bytes, link_public_key: bytes) -> bytes:
    """SHA-256("tee-node/worker-link/v1" ‖ 0x00 ‖ challenge(32) ‖ link_public_key(32)): the worker document's nonce."""
    if len(challenge) != CHALLENGE_SIZE or len(link_public_key) != LINK_KEY_SIZE:
        raise ValueError(f"challenge and link_public_key must be {CHALLENGE_SIZE} and {LINK_KEY_SIZE} bytes")
    return hashlib.sha256(LINK_NONCE_DOMAIN + b"\x00" + challenge + link_public_key).digest()


@dataclass(frozen=True)
class WorkerEntry:
    """One item of a document's `workers` (or of a join request): who, which link key, which evidence."""

    role: str
    link_public_key: bytes
    challenge: bytes
    evidence: dict[str, Any]

    @property
    def expected_nonce(self) -> bytes:
        return link_nonce(self.challenge, self.link_public_key)

    @classmethod
    def from_json(cls, item: Any) -> "WorkerEntry":
        if not isinstance(item, dict):
            raise DocumentInvalid("a workers entry must be an object")
        role, evidence = item.get("role"), item.get("evidence")
        if not isinstance(role, str) or not role:
            raise DocumentInvalid("a workers entry needs a role")
        if not isinstance(evidence, dict):
            raise DocumentInvalid(f"workers entry {role!r}: evidence must be an attestation document")
        return cls(
            role=role,
            link_public_key=b64_bytes(item.get("link_public_key"), f"workers entry {role!r} link_public_key", LINK_KEY_SIZE),
            challenge=hex_bytes(item.get("challenge"), f"workers entry {role!r} challenge", CHALLENGE_SIZE),
            evidence=evidence,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "link_public_key": b64_text(self.link_public_key),
            "challenge": self.challenge.hex(),
            "evidence": self.evidence,
        }
