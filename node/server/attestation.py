"""GET /v1/attestation: TEE evidence bound to the node's current keys and the caller's nonce."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import orjson
from aiohttp import web

from attestation import trust
from attestation.document import build_document, empty_collateral
from attestation.producers.nvidia_collateral import NvidiaCollateral
from attestation.producers.nvml import NvidiaGpuProvider
from attestation.producers.simulated import SimulatedProvider
from attestation.producers.tsm import TsmProvider

from ..config import NodeConfig
from ..errors import InvalidBody, Overloaded
from ..measurement import code_measurement
from .state import NODE

_NONCE = re.compile(r"^[0-9a-fA-F]{64}$")


class AttestationService:
    """The node's evidence providers and a token-bucket rate limit (quotes are costly on hardware)."""

    def __init__(self, config: NodeConfig, config_digest: bytes) -> None:
        settings = config.attestation
        self._config = config
        self.gpu: NvidiaGpuProvider | None = None
        self.nvidia: NvidiaCollateral | None = None
        if config.tee_mode == "simulated":
            seed = bytes.fromhex(settings.simulated_seed) if settings.simulated_seed else None
            self.cpu = SimulatedProvider(
                code_measurement(config_digest), seed=seed, state_dir=None if seed else settings.state_dir
            )
        else:
            # Real modes refuse to start without their device: these raise AttestationUnavailable.
            self.cpu = TsmProvider(config.tee_mode, base_path=settings.configfs_tsm_path)
            gpu = NvidiaGpuProvider(require_gpu=settings.require_gpu)
            if gpu.device_count:
                self.attach_gpu(gpu)
        self._rate = config.limits.attestation_per_minute / 60.0
        self._capacity = float(config.limits.attestation_per_minute)
        self._tokens = self._capacity
        self._refilled = time.monotonic()

    def attach_gpu(self, gpu: NvidiaGpuProvider, *, now: Callable[[], datetime] = trust.utc_now) -> None:
        """Serve this GPU provider's evidence, and its collateral (a simulated node gets a fake NVML here)."""
        settings = self._config.attestation
        self.gpu = gpu
        self.nvidia = NvidiaCollateral(
            gpu,
            rim_service_url=settings.nvidia_rim_service_url,
            ocsp_url=settings.nvidia_ocsp_url,
            rim_dir=settings.gpu_rim_dir,
            cache_dir=self._config.cache_dir / "nvidia",
            refresh_interval=settings.gpu_collateral_refresh,
            now=now,
        )

    def collateral(self) -> dict:
        collateral = empty_collateral()
        if self.nvidia is not None:
            collateral["nvidia"] = self.nvidia.document()
        return collateral

    def admit(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            raise Overloaded(max(1, int((1 - self._tokens) / self._rate) + 1))
        self._tokens -= 1


async def attestation_document(request: web.Request) -> web.Response:
    state = request.app[NODE]
    nonce = request.query.get("nonce", "")
    if not _NONCE.match(nonce):
        raise InvalidBody("nonce must be 64 hex characters")
    service: AttestationService = state.attestation
    service.admit()
    key = state.keyring.current
    # Providers do blocking file and device I/O (configfs-tsm, NVML): keep it off the loop.
    document = await asyncio.to_thread(
        build_document,
        service.cpu,
        service.gpu,
        nonce=bytes.fromhex(nonce),
        dh_public_key=key.public_key,
        signing_public_key=state.signer.public_key,
        key_epoch=key.epoch,
        measured_config=state.measured_config,
        collateral=service.collateral(),
    )
    return web.Response(body=orjson.dumps(document), content_type="application/json")


async def collateral_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Fetch the GPU collateral at start and keep it fresh."""
    service: AttestationService = app[NODE].attestation
    task = asyncio.create_task(service.nvidia.run()) if service.nvidia is not None else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
