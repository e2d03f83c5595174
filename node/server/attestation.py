"""GET /v1/attestation: TEE evidence bound to the node's current keys and the caller's nonce."""

from __future__ import annotations

import asyncio
import re
import time

import orjson
from aiohttp import web

from attestation.document import build_document
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
        if config.tee_mode == "simulated":
            seed = bytes.fromhex(settings.simulated_seed) if settings.simulated_seed else None
            self.cpu = SimulatedProvider(
                code_measurement(config_digest), seed=seed, state_dir=None if seed else settings.state_dir
            )
            self.gpu = None
        else:
            # Real modes refuse to start without their device: these raise AttestationUnavailable.
            self.cpu = TsmProvider(config.tee_mode, base_path=settings.configfs_tsm_path)
            gpu = NvidiaGpuProvider(require_gpu=settings.require_gpu)
            self.gpu = gpu if gpu.device_count else None
        self._rate = config.limits.attestation_per_minute / 60.0
        self._capacity = float(config.limits.attestation_per_minute)
        self._tokens = self._capacity
        self._refilled = time.monotonic()

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
    )
    return web.Response(body=orjson.dumps(document), content_type="application/json")
