"""Evidence providers: one per TEE behind one protocol, plus NVIDIA GPUs.

Methods block (file I/O, NVML); the server calls them in a worker thread.
"""

from __future__ import annotations

import base64
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.serialization import Encoding

from .errors import AttestationError, AttestationUnavailable, ChainInvalid
from .sevsnp import load_amd_certificates
from .simulated import SimulatedTdx

TSM_REPORT_PATH = Path("/sys/kernel/config/tsm/report")
REPORT_DATA_SIZE = 64
FORMAT_TDX = "tdx-quote"
FORMAT_SNP = "sev-snp-report"
FORMAT_NVIDIA = "nvidia-cc"

# configfs-tsm `provider` attribute per TEE type.
_TSM_PROVIDER = {"tdx": "tdx_guest", "sev-snp": "sev_guest"}
_TSM_FORMAT = {"tdx": FORMAT_TDX, "sev-snp": FORMAT_SNP}

# SEV-SNP auxblob: the host's certificate table, entries of GUID(16) + offset u32 + length u32,
# ended by an all-zero entry; offsets count from the start of the table.
SNP_CERT_ENTRY_SIZE = 24
SNP_CERT_ENTRY_GUID_SIZE = 16


@dataclass(frozen=True)
class CpuEvidence:
    tee: str  # "tdx", "sev-snp" or "simulated"
    format: str  # "tdx-quote" or "sev-snp-report"
    quote: bytes
    certificates: str | None  # PEM, when the quote does not carry its own chain
    simulated: bool


class TeeProvider(Protocol):
    tee: str

    def get_evidence(self, report_data: bytes) -> CpuEvidence:
        """Evidence whose REPORTDATA is exactly `report_data` (64 bytes)."""


class GpuProvider(Protocol):
    def get_evidence(self, gpu_nonce: bytes) -> list[dict[str, Any]]:
        """One entry per GPU: {"format", "device", "evidence" (b64), "certificate" (b64)}."""


def _check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")


class SimulatedProvider:
    """Simulated TDX; MRTD = SHA-384(measurement) where the node passes its code+config measurement."""

    tee = "simulated"

    def __init__(self, measurement: bytes, *, seed: bytes | None = None, state_dir: str | Path | None = None):
        if (seed is None) == (state_dir is None):
            raise ValueError("give exactly one of seed or state_dir")
        self._tee = SimulatedTdx.from_seed(seed) if seed is not None else SimulatedTdx.from_state_dir(state_dir)
        self._measurement = bytes(measurement)

    def get_evidence(self, report_data: bytes) -> CpuEvidence:
        _check_report_data(report_data)
        quote = self._tee.quote(report_data, self._measurement)
        return CpuEvidence(tee=self.tee, format=FORMAT_TDX, quote=quote, certificates=None, simulated=True)


class TsmFilesystem:
    """The file operations TsmProvider needs; tests substitute a fake kernel."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    def write(self, path: Path, data: bytes) -> None:
        # One write call: configfs binary attributes take the blob as written.
        with open(path, "wb", buffering=0) as fh:
            fh.write(data)


def snp_certificates_pem(auxblob: bytes) -> str | None:
    """PEM of every certificate in a SEV-SNP certificate table (VCEK/VLEK, ASK, ARK), or None if empty."""
    pems: list[bytes] = []
    for offset in range(0, len(auxblob) - SNP_CERT_ENTRY_SIZE + 1, SNP_CERT_ENTRY_SIZE):
        guid = auxblob[offset:offset + SNP_CERT_ENTRY_GUID_SIZE]
        start, length = struct.unpack_from("<II", auxblob, offset + SNP_CERT_ENTRY_GUID_SIZE)
        if not any(guid):
            break
        if start + length > len(auxblob):
            raise AttestationError("SEV-SNP certificate table entry points outside the auxblob")
        try:
            (cert,) = load_amd_certificates(auxblob[start:start + length])
        except ChainInvalid:
            continue  # the table may carry other blobs (e.g. CRLs); only certificates matter here
        pems.append(cert.public_bytes(Encoding.PEM))
    return b"".join(pems).decode() if pems else None


class TsmProvider:
    """TDX or SEV-SNP evidence through Linux configfs-tsm (kernel 6.7+)."""

    def __init__(
        self,
        tee: str,
        *,
        base_path: str | Path = TSM_REPORT_PATH,
        fs: TsmFilesystem | None = None,
        max_attempts: int = 3,
    ):
        if tee not in _TSM_PROVIDER:
            raise ValueError(f"unknown TEE type {tee!r} (expected 'tdx' or 'sev-snp')")
        self.tee = tee
        self._base = Path(base_path)
        self._fs = fs or TsmFilesystem()
        self._max_attempts = max_attempts
        if not self._base.is_dir():
            raise AttestationUnavailable(f"configfs-tsm report interface not found at {self._base} (is this a {tee} guest?)")
        # Fail at start-up, not at the first client request, when the interface belongs to another TEE.
        with self._report_dir() as path:
            self._check_provider(path)

    def _check_provider(self, path: Path) -> None:
        expected = _TSM_PROVIDER[self.tee]
        try:
            provider = self._fs.read(path / "provider").decode(errors="replace").strip()
        except OSError:
            raise AttestationUnavailable("configfs-tsm report has no provider attribute") from None
        if provider != expected:
            raise AttestationUnavailable(f"configfs-tsm provider is {provider!r}, expected {expected!r}")

    def _generation(self, path: Path) -> int:
        try:
            return int(self._fs.read(path / "generation").strip())
        except (OSError, ValueError):
            raise AttestationUnavailable("configfs-tsm generation attribute is unreadable") from None

    def _report_dir(self) -> "_ReportDir":
        return _ReportDir(self._fs, self._base / f"tee-node-{os.getpid()}-{secrets.token_hex(8)}")

    def get_evidence(self, report_data: bytes) -> CpuEvidence:
        _check_report_data(report_data)
        for _ in range(self._max_attempts):
            with self._report_dir() as path:
                self._check_provider(path)
                before = self._generation(path)
                try:
                    self._fs.write(path / "inblob", report_data)
                    quote = self._fs.read(path / "outblob")
                    auxblob = self._read_optional(path / "auxblob")
                except OSError as exc:
                    raise AttestationUnavailable(f"configfs-tsm refused the report request ({exc.strerror or exc})") from None
                # Exactly our one write must have happened; anything else means another writer
                # touched this report and the outblob may answer someone else's inblob.
                if self._generation(path) != before + 1:
                    continue
            if not quote:
                raise AttestationUnavailable("configfs-tsm returned an empty report")
            certificates = snp_certificates_pem(auxblob) if self.tee == "sev-snp" else None
            return CpuEvidence(tee=self.tee, format=_TSM_FORMAT[self.tee], quote=quote, certificates=certificates, simulated=False)
        raise AttestationUnavailable(f"configfs-tsm report changed under a concurrent writer {self._max_attempts} times")

    def _read_optional(self, path: Path) -> bytes:
        try:
            return self._fs.read(path)
        except FileNotFoundError:
            return b""


class _ReportDir:
    """A fresh report directory per request, removed afterwards whatever happens."""

    def __init__(self, fs: TsmFilesystem, path: Path):
        self._fs, self.path = fs, path

    def __enter__(self) -> Path:
        try:
            self._fs.mkdir(self.path)
        except OSError as exc:
            raise AttestationUnavailable(f"cannot create a configfs-tsm report ({exc.strerror or exc})") from None
        return self.path

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._fs.rmdir(self.path)
        except OSError:
            pass  # a leftover report directory is harmless and must not hide the real outcome


class NvidiaGpuProvider:
    """NVIDIA confidential-computing GPU evidence through NVML (nvidia-ml-py, imported lazily)."""

    def __init__(self, *, require_gpu: bool = True, nvml: Any = None):
        self._nvml = nvml
        self._count = 0
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._count = int(self._nvml.nvmlDeviceGetCount())
        except Exception as exc:  # ImportError, a missing libnvidia-ml, or any NVMLError
            if require_gpu:
                raise AttestationUnavailable(f"NVML is not available ({type(exc).__name__}); GPU attestation is required") from None
            self._nvml = None
            return
        if self._count == 0 and require_gpu:
            raise AttestationUnavailable("NVML reports no GPU; GPU attestation is required")

    @property
    def device_count(self) -> int:
        return self._count

    def get_evidence(self, gpu_nonce: bytes) -> list[dict[str, Any]]:
        if len(gpu_nonce) != 32:
            raise ValueError("gpu_nonce must be 32 bytes")
        evidence = []
        for index in range(self._count):
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
                report = self._nvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, gpu_nonce)
                certs = self._nvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
            except Exception as exc:  # NVMLError subclasses are generated per error code
                raise AttestationUnavailable(f"GPU {index} refused attestation ({type(exc).__name__})") from None
            evidence.append(
                {
                    "format": FORMAT_NVIDIA,
                    "device": index,
                    "evidence": base64.b64encode(bytes(report.attestationReport[: report.attestationReportSize])).decode(),
                    "certificate": base64.b64encode(
                        bytes(certs.attestationCertChain[: certs.attestationCertChainSize])
                    ).decode(),
                }
            )
        return evidence
