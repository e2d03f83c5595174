"""GET /v1/attestation: TEE evidence bound to the node's current keys, measured config and the caller's nonce.

The measured config includes each served model's weight-manifest digest, known only once the
engine has prepared its models: until the engine is ready the endpoint answers 503 NOT_READY.
The config digest (and, in simulation, the MRTD derived from it) is fixed at that moment.
Vendor collateral is bundled from `CollateralCache` (Intel/AMD) and `NvidiaCollateral`, fetched
or read at start and refreshed before it expires (`collateral_lifecycle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from attestation import trust
from attestation.binding import PUBLIC_KEY_NAMES, config_digest
from attestation.document import build_document
from attestation.errors import AttestationError
from attestation.evidence import TeeProvider
from attestation.producers.collateral import CollateralCache, Platform
from attestation.producers.nvidia_collateral import NvidiaCollateral
from attestation.producers.nvml import NvidiaGpuProvider
from attestation.producers.simulated import SimulatedProvider, load_or_create_seed
from attestation.producers.tsm import TsmProvider

from ..config import NodeConfig
from ..errors import InvalidBody, NotReady, Overloaded
from ..keys import NodeKey, Signer
from ..measurement import code_measurement
from .admission import RateLimiter
from .state import NODE, NodeState, bearer_token

log = logging.getLogger("tee_node.attestation")

_NONCE = re.compile(r"^[0-9a-fA-F]{64}$")


def _nothing() -> None:
    return None


class AttestationService:
    """The node's evidence providers, its measured config, collateral, and its rate limit
    (quotes are costly on hardware)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        settings = config.attestation
        self.cpu: TeeProvider | None = None
        self.gpu: NvidiaGpuProvider | None = None
        self.nvidia: NvidiaCollateral | None = None
        if config.tee_mode == "simulated":
            # The root of trust exists from the start; the MRTD it signs waits for the config digest.
            self._seed = bytes.fromhex(settings.simulated_seed) if settings.simulated_seed else load_or_create_seed(settings.state_dir)
        else:
            # Real modes refuse to start without their device: these raise AttestationUnavailable.
            self.cpu = TsmProvider(config.tee_mode, base_path=settings.configfs_tsm_path)
            gpu = NvidiaGpuProvider(require_gpu=settings.require_gpu)
            if gpu.device_count:
                self.attach_gpu(gpu)
        # v3's bound additions, filled in by the features that serve them: each public key a
        # callable answering its base64 value (None while off), the other VMs' documents, and the
        # release bundle served verbatim (public and self-authenticating, so not measured).
        self.public_keys: dict[str, Callable[[], str | None]] = {name: _nothing for name in PUBLIC_KEY_NAMES}
        self.workers: Callable[[], list[dict[str, Any]] | None] = _nothing
        self.release_bundle: dict[str, Any] | None = (
            load_release_bundle(settings.release_bundle) if settings.release_bundle is not None else None
        )
        self.measured_config: dict[str, Any] | None = None
        self.config_digest: bytes | None = None
        self.cpu_collateral = CollateralCache()
        limits = config.limits
        self.rate_limit = RateLimiter(limits.attestation_per_minute, limits.attestation_per_client_per_minute)

    def attach_gpu(self, gpu: NvidiaGpuProvider, *, now: Callable[[], datetime] = trust.utc_now) -> None:
        """Serve this GPU provider's evidence, and its collateral (a simulated node gets a fake NVML here)."""
        settings = self.config.attestation
        self.gpu = gpu
        self.nvidia = NvidiaCollateral(
            gpu,
            rim_service_url=settings.nvidia_rim_service_url,
            ocsp_url=settings.nvidia_ocsp_url,
            rim_dir=settings.gpu_rim_dir,
            cache_dir=self.config.cache_dir / "nvidia",
            refresh_interval=settings.gpu_collateral_refresh,
            now=now,
        )

    def collateral(self) -> dict:
        """The document's `collateral`: Intel/AMD (current only) and NVIDIA."""
        collateral = self.cpu_collateral.document()
        if self.nvidia is not None:
            collateral["nvidia"] = self.nvidia.document()
        return collateral

    def measure(self, weights_sha256: dict[str, str]) -> None:
        """Fix the measured config once the engine has prepared its models (and the simulated MRTD with it)."""
        self.measured_config = self.config.measured_config(weights_sha256)
        self.config_digest = config_digest(self.measured_config)
        if self.config.tee_mode == "simulated":
            self.cpu = SimulatedProvider(
                code_measurement(self.config_digest), seed=self._seed, debug=self.config.attestation.simulated_debug
            )
        log.info("measured config fixed: config_digest=%s", self.config_digest.hex())


    async def document(self, nonce: bytes, key: NodeKey, signer: Signer, **additions: Any) -> dict[str, Any]:
        """This VM's attestation document for `nonce`, binding `key` (of its keyring) and `signer`;
        `additions` are build_document's optional fields (attested TLS, the v3 additions)."""
        assert self.cpu is not None and self.measured_config is not None
        # Providers do blocking file and device I/O (configfs-tsm, NVML): keep it off the loop.
        # The collateral is read here, on the loop that refreshes it, so never half-replaced.
        return await asyncio.to_thread(
            build_document,
            self.cpu,
            self.gpu,
            nonce=nonce,
            dh_public_key=key.public_key,
            signing_public_key=signer.public_key,
            key_epoch=key.epoch,
            measured_config=self.measured_config,
            kem_public_key=key.kem_public_key,
            collateral=self.collateral(),
            **additions,
        )

    async def keep_collateral(self) -> None:
        """Load the configured collateral directory, then (real TEEs) fetch and refresh forever."""
        settings = self.config.attestation
        if settings.collateral_dir is not None:
            await asyncio.to_thread(self.cpu_collateral.load_directory, settings.collateral_dir)
            log.info("collateral loaded from %s", settings.collateral_dir)
        if self.config.tee_mode == "simulated" or not settings.fetch_collateral or self.cpu is None:
            return
        evidence = await asyncio.to_thread(self.cpu.get_evidence, bytes(64))
        platform = Platform.from_evidence(evidence.tee, evidence.quote, evidence.certificates)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            while True:
                await asyncio.sleep(await self.refresh_collateral(session, platform))

    async def refresh_collateral(self, session: aiohttp.ClientSession, platform: Platform) -> float:
        """One fetch; returns how long to wait before the next. A failure keeps what is held."""
        settings = self.config.attestation
        try:
            await self.cpu_collateral.refresh(
                session, platform, pcs_url=settings.pcs_url, root_crl_url=settings.intel_root_crl_url, kds_url=settings.kds_url
            )
        except AttestationError as exc:
            log.warning("collateral fetch failed (%s); serving what is held, retrying in %.0f s", exc, settings.collateral_retry)
            return settings.collateral_retry
        expires = self.cpu_collateral.next_update()
        wait = settings.collateral_refresh
        if expires is not None:
            # Refresh well before expiry: half of the remaining lifetime, never in the past.
            wait = min(wait, max(settings.collateral_retry, (expires.timestamp() - time.time()) / 2))
        log.info("collateral refreshed; valid until %s", expires.isoformat() if expires else "unknown")
        return wait


def load_release_bundle(path: Path) -> dict[str, Any]:
    """The configured release bundle, read once at start; a file that is not a Sigstore bundle stops the start."""
    from attestation.release import parse_bundle

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"attestation.release_bundle {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        bundle = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"attestation.release_bundle {path} is not valid JSON: {exc}") from None
    if not isinstance(bundle, dict):
        raise ValueError(f"attestation.release_bundle {path} is not a Sigstore bundle: not a JSON object")
    try:
        parse_bundle(bundle)
    except AttestationError as exc:
        raise ValueError(f"attestation.release_bundle {path} is {exc}") from None
    log.info("release bundle loaded from %s", path)
    return bundle


def _client_of(state: NodeState, request: web.Request) -> str:
    """Whom a rate limit counts: a valid API token (many clients can share a proxy's address),
    else the peer address. An invalid token counts as its address, so made-up tokens buy nothing."""
    digest = state.token_digest(bearer_token(request))
    if digest is not None:
        return "token:" + digest.hex()
    return "address:" + (request.remote or "")


async def attestation_document(request: web.Request) -> web.Response:
    state = request.app[NODE]
    nonce = request.query.get("nonce", "")
    if not _NONCE.match(nonce):
        raise InvalidBody("nonce must be 64 hex characters")
    service: AttestationService = state.attestation
    if not state.engine.ready:
        raise NotReady()  # the measured config names the weights, known only once they are loaded
    try:
        service.rate_limit.admit(_client_of(state, request), time.monotonic())
    except Overloaded:
        state.metrics.refusals.labels("attestation_rate").inc()
        raise
    if service.measured_config is None:
        service.measure(state.engine.weights_sha256())
    document = await service.document(
        bytes.fromhex(nonce),
        state.keyring.current,
        state.signer,
        tls_cert_sha256=state.tls.sha256 if state.tls else None,
        public_keys={name: value() for name, value in service.public_keys.items()},
        workers=service.workers(),
        release_bundle=service.release_bundle,
    )
    return web.Response(body=orjson.dumps(document), content_type="application/json")


async def collateral_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Fetch the CPU vendor's and the GPU collateral at start and keep them fresh."""
    service: AttestationService = app[NODE].attestation

    async def keep_cpu_collateral() -> None:
        try:
            await service.keep_collateral()
        except Exception as exc:  # the node serves without it: clients see TCB status Unknown
            log.error("collateral maintenance stopped: %s: %s", type(exc).__name__, exc)

    tasks = [asyncio.create_task(keep_cpu_collateral())]
    if service.nvidia is not None:
        tasks.append(asyncio.create_task(service.nvidia.run()))
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
