"""NVIDIA confidential-computing GPU evidence through NVML (nvidia-ml-py, imported lazily)."""

from __future__ import annotations

import base64
from typing import Any

from ..errors import AttestationUnavailable
from ..evidence import FORMAT_NVIDIA


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
