"""What evidence producers hand to the document builder: shared by producers and verifiers.

Verifiers import this module, never `attestation.producers` (the simulated TEE's key derivation
lives there; a verifying client has no business loading it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

REPORT_DATA_SIZE = 64
FORMAT_TDX = "tdx-quote"
FORMAT_SNP = "sev-snp-report"
FORMAT_NVIDIA = "nvidia-cc"


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
        """One entry per GPU: {"format", "device", "evidence" (b64), "certificate" (b64), "cc_mode", "ready"}."""


def check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")
