"""The attested session: fetch and verify the node's attestation, pin its keys, re-attest.

Before the first request (after STALE_NODE_KEY, after a pinned TLS certificate changed, and
once a pin is older than `reattest_after`) the session fetches `/v1/attestation` with a fresh
32-byte nonce, verifies it against the policy (`attestation.document.verify_document`:
authentic evidence, then `appraise`) and pins the node's X25519, ML-KEM and Ed25519 keys and
the route's transport bound to that attestation. A refused attestation leaves nothing pinned.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .errors import TeeNodeError, error_from_response
from .transports import Route, Transport
from .types import NodeIdentity

if TYPE_CHECKING:
    from attestation.document import VerifiedAttestation

log = logging.getLogger("tee_node.client")

ATTESTATION_NONCE_SIZE = 32

# Whether to send again after this error as the `attempt`-th retry, having waited as the node
# asked; False: raise the error.
Retry = Callable[[TeeNodeError, int], Awaitable[bool]]


def make_policy(
    policy: Any = None,
    *,
    allow_simulated: bool = False,
    expected_measurements: Any = None,
    allowed_tee: Any = None,
    require_gpu: bool = False,
    pins: Mapping[str, Any] | None = None,
    allow_classical: bool = False,
    collateral: str | os.PathLike[str] | None = None,
) -> Any:
    """An `attestation.appraisal.Policy`: `policy` (a Policy, or the path of a TOML policy file,
    docs/policy.md; None: the default policy) with the shortcuts given applied on top.

    `expected_measurements` pins MRTD / MEASUREMENT (hex; on TDX that alone is not pinned: RTMR0-3
    must be too); `pins` pins registers by the policy file's names (`{"rtmr1": HEX}`, a value may
    be a list), each replacing that register's pins; `allowed_tee` narrows the TEE types;
    `allow_simulated` and `require_gpu` turn those on; `allow_classical` accepts a node that
    offers no ML-KEM key (`require_post_quantum` off); `collateral` (a directory) is verified
    with instead of the document's Intel/AMD collateral (CollateralInvalid when it holds none).
    """
    from attestation.appraisal import Policy, load_policy

    built = Policy() if policy is None else policy if isinstance(policy, Policy) else load_policy(policy)
    changes: dict[str, Any] = {}
    if allow_simulated:
        changes["allow_simulated"] = True
    if require_gpu:
        changes["require_gpu"] = True
    if allow_classical:
        changes["require_post_quantum"] = False
    if allowed_tee is not None:
        changes["allowed_tees"] = frozenset([allowed_tee] if isinstance(allowed_tee, str) else allowed_tee)
    built = replace(built, **changes)
    if expected_measurements is not None:
        built = built.with_measurements([expected_measurements] if isinstance(expected_measurements, str) else expected_measurements)
    if pins:
        built = built.with_pins(pins)
    if collateral is not None:
        built = built.with_collateral(collateral)
    return built


class Pinned:
    """What one verified attestation pinned: the node's identity (keys) and the transport bound to it."""

    __slots__ = ("identity", "pinned_at", "transport")

    def __init__(self, identity: NodeIdentity, transport: Transport) -> None:
        self.identity = identity
        self.transport = transport
        self.pinned_at = time.monotonic()


class AttestedSession:
    def __init__(
        self,
        route: Route,
        policy: Any,
        *,
        retry: Retry,
        reattest_after: float | None,
        post_quantum: bool,
    ) -> None:
        self.route = route
        self.policy = policy
        self.reattest_after = reattest_after
        self.post_quantum = post_quantum
        self._retry = retry
        self._pinned: Pinned | None = None
        self._lock: asyncio.Lock | None = None  # made in the event loop that uses it
        self.attestations = 0  # how many documents were fetched and verified

    @property
    def identity(self) -> NodeIdentity | None:
        return self._pinned.identity if self._pinned else None

    @property
    def key_exchange(self) -> str | None:
        if self._pinned is None:
            return None
        if self.hybrid_key(self._pinned.identity) is not None:
            return "hybrid ML-KEM-768 + X25519"
        return "X25519 (the attested node offers no ML-KEM key)" if self.post_quantum else "X25519 (post_quantum off)"

    def hybrid_key(self, identity: NodeIdentity) -> bytes | None:
        """The attested ML-KEM key when requests are to use it (never a key from a lock or 422 body)."""
        return identity.kem_public_key if self.post_quantum else None

    def _attest_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def attest(self) -> Pinned:
        """Fetch and verify a fresh attestation now, and pin it."""
        async with self._attest_lock():
            self._pinned = None
            self._pinned = await self._fetch()
            return self._pinned

    def _expired(self, pinned: Pinned | None) -> bool:
        if pinned is None:
            return True
        return self.reattest_after is not None and time.monotonic() - pinned.pinned_at >= self.reattest_after

    async def current(self) -> Pinned:
        """The pin to use now: attested first when there is none or it is too old."""
        if self._expired(self._pinned):
            async with self._attest_lock():
                if self._expired(self._pinned):
                    self._pinned = None  # never keep using keys whose evidence was refused
                    self._pinned = await self._fetch()
        assert self._pinned is not None
        return self._pinned

    async def reattest(self, stale: Pinned) -> Pinned:
        """Re-attest unless another task already replaced the stale pin."""
        async with self._attest_lock():
            if self._pinned is stale:
                self._pinned = None
                self._pinned = await self._fetch()
        assert self._pinned is not None
        return self._pinned

    async def _fetch(self) -> Pinned:
        from attestation.document import verify_document
        from attestation.errors import ParseError

        attempt = 0
        while True:
            nonce = os.urandom(ATTESTATION_NONCE_SIZE)  # fresh for every fetch, retries included
            channel = await self.route.attestation_channel()
            path = f"/v1/attestation?nonce={nonce.hex()}"
            # No credential: nothing that authorises a request goes to a node not yet verified.
            response = await channel.transport.request("GET", path, {"Accept": "application/json"}, None)
            if response.status == 200:
                break
            error = error_from_response(response, channel.transport.url)
            if await self._retry(error, attempt + 1):
                attempt += 1
                continue
            raise error
        try:
            document = json.loads(response.body)
        except (ValueError, UnicodeDecodeError):
            raise ParseError("attestation document is not JSON") from None
        if not isinstance(document, dict):
            raise ParseError("attestation document is not a JSON object")
        certificate = channel.tls_certificate
        certificate_sha256 = hashlib.sha256(certificate).digest() if certificate is not None else None
        verified = verify_document(document, expected_nonce=nonce, policy=self.policy, tls_cert_sha256=certificate_sha256)
        if len(verified.dh_public_key) != 32 or len(verified.signing_public_key) != 32:
            raise ParseError("attested keys have the wrong length")
        if channel.check_binding is not None:
            channel.check_binding(verified)
        for warning in verified.warnings:  # e.g. accept_any_measurement: said on every attestation
            log.warning("attestation accepted with a warning: %s", warning)
        self.attestations += 1
        release = verified.release
        identity = NodeIdentity(
            tee=verified.tee,
            simulated=bool(verified.simulated),
            measurement=verified.measurement,
            key_epoch=verified.key_epoch,
            config_digest=verified.config_digest.hex(),
            dh_public_key=bytes(verified.dh_public_key),
            signing_public_key=bytes(verified.signing_public_key),
            verified_at=datetime.now(timezone.utc),
            kem_public_key=verified.kem_public_key,
            tcb_status=verified.tcb_status,
            gpu_devices=verified.gpu_devices,
            notes=(*verified.notes, *verified.warnings),
            claims=verified.claims.as_json(),
            tls_cert_sha256=certificate_sha256,
            tls_certificate=certificate,
            document=document,
            release=None
            if release is None
            else {"version": release.version, "source": release.source, "identity": release.identity, "log_index": release.log_index},
            vms=attested_vms(verified),
        )
        return Pinned(identity, self.route.attested(identity))


def attested_vms(verified: VerifiedAttestation) -> tuple[dict[str, Any], ...]:
    """The head and each worker VM as verified: role, TEE, measurement, config digest, TCB status
    and (workers) the link key their evidence binds."""

    def vm(role: str, attestation: VerifiedAttestation, link_public_key: str | None) -> dict[str, Any]:
        return {
            "role": role,
            "tee": attestation.tee,
            "simulated": bool(attestation.simulated),
            "measurement": attestation.measurement,
            "config_digest": attestation.config_digest.hex(),
            "tcb_status": attestation.tcb_status,
            "link_public_key": link_public_key,
        }

    entries = verified.workers or []
    return (
        vm("head", verified, None),
        *(vm(e["role"], w, e["link_public_key"]) for e, w in zip(entries, verified.worker_attestations)),
    )
