"""Typed application state shared by the handlers (`web.AppKey`)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..config import NodeConfig
from ..crypto import b64d
from ..engine.base import Engine, ModelCard, Task
from ..keys import KeyRing, Signer
from ..metrics import Metrics
from .admission import Admission
from .tls import TlsIdentity


@dataclass
class NodeState:
    config: NodeConfig
    engine: Engine
    keyring: KeyRing
    signer: Signer
    metrics: Metrics
    admission: Admission
    trusted_proxy_keys: frozenset[bytes]
    token_digests: tuple[bytes, ...]
    attestation: Any = None  # AttestationService, set by the app factory
    tls: TlsIdentity | None = None  # attested TLS (tls.enabled): made at start, memory only
    privacy_pass: Any = None  # PrivacyPass (auth.privacy_pass.enabled), set by the app factory
    workers: Any = None  # WorkerAdmission on a multi-VM head (workers.count > 0), set by the app factory
    started_at: float = field(default_factory=time.time)
    loading: asyncio.Task | None = None  # the engine's start, set by its lifecycle

    @classmethod
    def build(cls, config: NodeConfig, engine: Engine) -> NodeState:
        limits = config.limits
        keyring = KeyRing(config.keys.rotation_interval, config.keys.overlap, config.keys.replay_capacity)
        metrics = Metrics()
        metrics.key_epoch.set(keyring.current.epoch)

        def on_rotate(key) -> None:
            metrics.key_epoch.set(key.epoch)
            metrics.key_rotations.inc()

        keyring.on_rotate(on_rotate)
        return cls(
            config=config,
            engine=engine,
            keyring=keyring,
            signer=Signer.generate(),
            metrics=metrics,
            admission=Admission(limits.max_in_flight, limits.max_queue, limits.queue_timeout, limits.retry_after),
            trusted_proxy_keys=frozenset(b64d(k) for k in config.auth.trusted_proxy_keys),
            token_digests=tuple(bytes.fromhex(d) for d in config.auth.api_token_sha256),
        )

    def token_allowed(self, token: str | None) -> bool:
        """Open when no tokens are configured (simulated only); else a constant-time match."""
        return not self.token_digests or self.token_digest(token) is not None

    def token_digest(self, token: str | None) -> bytes | None:
        """The configured digest `token` matches, compared in constant time; None when none does."""
        if not token or not self.token_digests:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        matched = None
        for allowed in self.token_digests:  # no early exit: timing does not tell which entry matched
            if hmac.compare_digest(digest, allowed):
                matched = allowed
        return matched

    def model_card(self, name: str, task: Task) -> ModelCard | None:
        for card in self.engine.models():
            if card.id == name and task in card.tasks:
                return card
        return None


def bearer_token(request: web.BaseRequest) -> str | None:
    """The token of an `Authorization: Bearer` header, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


NODE: web.AppKey[NodeState] = web.AppKey("node", NodeState)
