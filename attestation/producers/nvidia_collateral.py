"""Node side: the NVIDIA collateral a client needs to verify this node's GPUs offline (docs/protocol.md,
`collateral.nvidia`): per GPU its attestation certificate chain, the driver and VBIOS RIMs,
and OCSP responses for the device and RIM chains.

RIMs come from `rim_dir` (offline sites, tests) when it holds them, else from the on-disk cache,
else from NVIDIA's RIM service, which is then cached; OCSP responses from `rim_dir` (`*.ocsp`,
DER) when one there is current, else from NVIDIA's OCSP service, kept in memory. Everything is
checked before it is shipped (a RIM that does not verify, or an OCSP response that is not good and
current, is dropped and logged), and refreshed at start and before it expires.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import aiohttp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from .. import trust
from ..claims import OCSP_GOOD
from ..errors import AttestationError
from ..nvidia import ocsp as ocsp_check
from ..nvidia.rim import ReferenceManifest, verify_rim
from ..nvidia.spdm import GpuAttestationReport, OpaqueField
from ..nvidia.verify import model_of

log = logging.getLogger("tee_node.attestation.nvidia")

DEFAULT_RIM_SERVICE_URL = "https://rim.attestation.nvidia.com/v1/rim/"
DEFAULT_OCSP_URL = "https://ocsp.ndis.nvidia.com/"
RIM_SUFFIX = ".swidtag"
OCSP_SUFFIX = ".ocsp"
OCSP_REQUEST_TYPE = "application/ocsp-request"
MAX_RESPONSE_BYTES = 1 << 20
MIN_REFRESH_DELAY = 60.0  # seconds: the soonest a refresh repeats, whatever expires


def driver_rim_id(model: str, report: GpuAttestationReport) -> str:
    """NVIDIA's RIM service id of the driver RIM, e.g. NV_GPU_DRIVER_GH100_550.90.07."""
    return f"NV_GPU_DRIVER_{model}_{report.driver_version}"


def vbios_rim_id(report: GpuAttestationReport) -> str:
    """NVIDIA's RIM service id of the VBIOS RIM, e.g. NV_GPU_VBIOS_1010_0200_882_96005E0001."""
    opaque = report.response.opaque
    parts = [opaque.text(OpaqueField.PROJECT), opaque.text(OpaqueField.PROJECT_SKU), opaque.text(OpaqueField.CHIP_SKU)]
    if not all(parts):
        raise AttestationError("the GPU report lacks the project, project SKU or chip SKU that name its VBIOS RIM")
    return "NV_GPU_VBIOS_" + "_".join(parts) + "_" + report.vbios_version.replace(".", "")


@dataclass(frozen=True)
class GpuCollateral:
    device: int
    cert_chain: str  # PEM, leaf first
    driver_rim: bytes | None
    vbios_rim: bytes | None
    ocsp: tuple[bytes, ...]
    expires: datetime | None  # the soonest an OCSP response or a RIM signing certificate stops being current

    def to_document(self) -> dict[str, Any]:
        def b64(data: bytes | None) -> str | None:
            return None if data is None else base64.b64encode(data).decode("ascii")

        return {
            "device": self.device,
            "cert_chain": self.cert_chain,
            "driver_rim": b64(self.driver_rim),
            "vbios_rim": b64(self.vbios_rim),
            "ocsp": [b64(r) for r in self.ocsp],
        }


class NvidiaCollateral:
    """Collects, checks, caches and refreshes the collateral of every GPU of `provider`."""

    def __init__(
        self,
        provider: Any,  # NvidiaGpuProvider: get_evidence(nonce)
        *,
        rim_service_url: str = DEFAULT_RIM_SERVICE_URL,
        ocsp_url: str = DEFAULT_OCSP_URL,
        rim_dir: Path | None = None,
        cache_dir: Path,
        refresh_interval: float = 3600.0,
        timeout: float = 30.0,
        now: Callable[[], datetime] = trust.utc_now,
    ) -> None:
        self._provider = provider
        self._rim_service_url = rim_service_url
        self._ocsp_url = ocsp_url
        self._rim_dir = Path(rim_dir) if rim_dir else None
        self._cache_dir = Path(cache_dir)
        self._refresh_interval = refresh_interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._now = now
        self._current: list[GpuCollateral] | None = None

    def document(self) -> list[dict[str, Any]] | None:
        """`collateral.nvidia` of the attestation document (None before the first refresh)."""
        return None if self._current is None else [c.to_document() for c in self._current]

    async def refresh(self) -> list[GpuCollateral]:
        # A fresh report of each GPU names the versions (hence the RIMs) and carries its chain.
        evidence = await asyncio.to_thread(self._provider.get_evidence, secrets.token_bytes(32))
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            collected = [await self._collect(session, entry) for entry in evidence]
        self._current = collected
        return collected

    def next_refresh_delay(self) -> float:
        """Seconds until the next refresh: halfway to the soonest expiry, at most the refresh interval."""
        expiries = [c.expires for c in self._current or () if c.expires is not None]
        if not expiries:
            return self._refresh_interval
        remaining = (min(expiries) - self._now()).total_seconds()
        return min(self._refresh_interval, max(MIN_REFRESH_DELAY, remaining / 2))

    async def run(self) -> None:
        """Refresh forever (the app's lifecycle cancels it); a failed round is logged and retried."""
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # keep what was there; the reason by type only
                log.warning("NVIDIA collateral refresh failed: %s", type(exc).__name__)
            await asyncio.sleep(self.next_refresh_delay())

    async def _collect(self, session: aiohttp.ClientSession, entry: dict[str, Any]) -> GpuCollateral:
        device = entry["device"]
        report = GpuAttestationReport.from_bytes(base64.b64decode(entry["evidence"]))
        chain = trust.load_certificates(base64.b64decode(entry["certificate"]))
        model = model_of(chain[0]) or ""
        driver = await self._rim(session, driver_rim_id(model, report), report.driver_version, model)
        vbios = await self._rim(session, vbios_rim_id(report), report.vbios_version, model)
        manifests = [m for _, m in filter(None, (driver, vbios))]
        subjects = ocsp_check.gpu_subjects(chain, [m.signing_chain for m in manifests])
        offline = self._offline_ocsp()
        responses = [r for subject in subjects if (r := await self._ocsp(session, subject, offline)) is not None]
        expiries = [single.next_update_utc for _, single in responses]
        expiries += [m.signing_chain[0].not_valid_after_utc for m in manifests]
        return GpuCollateral(
            device=device,
            cert_chain=b"".join(c.public_bytes(Encoding.PEM) for c in chain).decode("ascii"),
            driver_rim=driver[0] if driver else None,
            vbios_rim=vbios[0] if vbios else None,
            ocsp=tuple(der for der, _ in responses),
            expires=min(expiries) if expiries else None,
        )

    def _checked_rim(self, data: bytes, rim_id: str, version: str, model: str) -> ReferenceManifest | None:
        try:
            manifest = verify_rim(data, at=self._now())
        except AttestationError as exc:
            log.warning("RIM %s dropped: %s", rim_id, exc)
            return None
        if manifest.version.upper() != version.upper() or manifest.product != model:
            log.warning("RIM %s dropped: it is for %s %s, not %s %s", rim_id, manifest.product, manifest.version, model, version)
            return None
        return manifest

    async def _rim(
        self, session: aiohttp.ClientSession, rim_id: str, version: str, model: str
    ) -> tuple[bytes, ReferenceManifest] | None:
        name = rim_id + RIM_SUFFIX
        for directory in (self._rim_dir, self._cache_dir):
            path = directory / name if directory else None
            if path is not None and path.is_file():
                data = path.read_bytes()
                manifest = self._checked_rim(data, rim_id, version, model)
                if manifest is not None:
                    return data, manifest
        data = await self._fetch_rim(session, rim_id)
        if data is None:
            return None
        manifest = self._checked_rim(data, rim_id, version, model)
        if manifest is None:
            return None
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        partial = self._cache_dir / (name + ".partial")
        partial.write_bytes(data)
        partial.replace(self._cache_dir / name)  # atomic: a crash never leaves half a RIM under its name
        return data, manifest

    async def _fetch_rim(self, session: aiohttp.ClientSession, rim_id: str) -> bytes | None:
        try:
            async with session.get(self._rim_service_url + rim_id) as response:
                if response.status != 200:
                    log.warning("RIM service answered %d for %s", response.status, rim_id)
                    return None
                body = await response.content.read(MAX_RESPONSE_BYTES + 1)
            if len(body) > MAX_RESPONSE_BYTES:
                raise ValueError("response too large")
            return base64.b64decode(json.loads(body)["rim"], validate=True)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, binascii.Error) as exc:
            log.warning("RIM %s could not be fetched: %s", rim_id, type(exc).__name__)
            return None

    def _offline_ocsp(self) -> list[bytes]:
        """OCSP responses (DER, `*.ocsp`) that an offline site put in `rim_dir`."""
        if self._rim_dir is None or not self._rim_dir.is_dir():
            return []
        return [path.read_bytes() for path in sorted(self._rim_dir.glob("*" + OCSP_SUFFIX))]

    async def _ocsp(
        self, session: aiohttp.ClientSession, subject: ocsp_check.OcspSubject, offline: list[bytes]
    ) -> tuple[bytes, ocsp.OCSPSingleResponse] | None:
        for der in offline:
            if (checked := self._checked_ocsp(der, subject, fetched=False)) is not None:
                return checked
        der = await self._fetch_ocsp(session, subject)
        return None if der is None else self._checked_ocsp(der, subject, fetched=True)

    async def _fetch_ocsp(self, session: aiohttp.ClientSession, subject: ocsp_check.OcspSubject) -> bytes | None:
        name = trust.common_name(subject.cert)
        request = ocsp.OCSPRequestBuilder().add_certificate(subject.cert, subject.issuer, hashes.SHA384()).build()
        try:
            async with session.post(
                self._ocsp_url, data=request.public_bytes(Encoding.DER), headers={"Content-Type": OCSP_REQUEST_TYPE}
            ) as response:
                if response.status != 200:
                    log.warning("OCSP service answered %d for %s", response.status, name)
                    return None
                return await response.content.read(MAX_RESPONSE_BYTES)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("OCSP status of %s could not be fetched: %s", name, type(exc).__name__)
            return None

    def _checked_ocsp(
        self, der: bytes, subject: ocsp_check.OcspSubject, *, fetched: bool
    ) -> tuple[bytes, ocsp.OCSPSingleResponse] | None:
        """The response when it is the issuer's, current and good for `subject`; else None (logged)."""
        name = trust.common_name(subject.cert)
        try:
            (loaded,) = ocsp_check.load_responses([der])
            single = next((s for s in loaded.responses if s.serial_number == subject.cert.serial_number), None)
            if single is None:
                if fetched:  # an offline file for another certificate is expected; a fetched one is not
                    log.warning("OCSP response for %s dropped: it answers for another certificate", name)
                return None
            result = ocsp_check.check_ocsp([subject], [loaded], self._now())
        except AttestationError as exc:
            log.warning("OCSP response for %s dropped: %s", name, exc)
            return None
        if result.status != OCSP_GOOD:
            log.warning("OCSP response for %s dropped: it is out of date or for another issuer", name)
            return None
        return der, single
