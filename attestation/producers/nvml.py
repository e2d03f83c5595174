"""NVIDIA confidential-computing GPU evidence through NVML (nvidia-ml-py, imported lazily)."""

from __future__ import annotations

import base64
from typing import Any

from ..claims import GPU_CC_MODE_ON
from ..errors import AttestationUnavailable
from ..evidence import FORMAT_NVIDIA

# NVML's confidential-computing system state (nvml.h: NVML_CC_SYSTEM_*, NVML_CC_ACCEPTING_CLIENT_REQUESTS_*).
NVML_CC_FEATURE_ENABLED = 1
NVML_CC_DEVTOOLS_MODE_ON = 1
NVML_CC_READY = 1


class NvidiaGpuProvider:
    """NVIDIA confidential-computing GPU evidence through NVML (nvidia-ml-py, imported lazily).

    The GPUs must be in CC mode, and not in DEVTOOLS mode (which lets a debugger read GPU memory):
    anything else refuses at start and at every report. Each evidence entry also says whether the
    GPUs accept client work (NVML's ready state), for the verifier's policy.
    """

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
        if self._count:
            self._check_cc_mode()

    @property
    def device_count(self) -> int:
        return self._count

    def _check_cc_mode(self) -> None:
        try:
            state = self._nvml.nvmlSystemGetConfComputeState()
        except Exception as exc:
            raise AttestationUnavailable(f"NVML cannot read the confidential-computing state ({type(exc).__name__})") from None
        if state.ccFeature != NVML_CC_FEATURE_ENABLED:
            raise AttestationUnavailable("the GPUs are not in confidential-computing mode; enable CC mode (nvidia_gpu_tools --set-cc-mode=on)")
        if state.devToolsMode == NVML_CC_DEVTOOLS_MODE_ON:
            raise AttestationUnavailable("the GPUs are in CC DEVTOOLS mode, which exposes GPU memory to debuggers; set CC mode to 'on'")

    def ready(self) -> bool:
        """Whether the GPUs accept client work (set once they have been attested)."""
        try:
            return self._nvml.nvmlSystemGetConfComputeGpusReadyState() == NVML_CC_READY
        except Exception as exc:
            raise AttestationUnavailable(f"NVML cannot read the GPU ready state ({type(exc).__name__})") from None

    def get_evidence(self, gpu_nonce: bytes) -> list[dict[str, Any]]:
        if len(gpu_nonce) != 32:
            raise ValueError("gpu_nonce must be 32 bytes")
        if not self._count:
            return []
        self._check_cc_mode()
        ready = self.ready()
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
                    "cc_mode": GPU_CC_MODE_ON,
                    "ready": ready,
                }
            )
        return evidence
