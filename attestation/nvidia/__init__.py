"""NVIDIA confidential-computing GPUs: the SPDM attestation report (spdm), reference integrity
manifests (rim), OCSP (ocsp), the offline verifier (verify)."""

from .rim import ReferenceManifest, verify_rim
from .spdm import GpuAttestationReport
from .verify import GpuVerification, verify_gpu_report

__all__ = ["GpuAttestationReport", "GpuVerification", "ReferenceManifest", "verify_gpu_report", "verify_rim"]
