"""TEE attestation for tee-node: evidence, its verification, claims, and one appraisal policy.

Layout: parsers and verifiers per TEE (tdx, sevsnp), NVIDIA GPUs (nvidia/: SPDM report, RIMs,
OCSP, verifier, `gpu verify`), vendor collateral (intel), certificate trust (trust, roots/), the
report_data commitment (binding), normalised claims (claims), the one policy decision
(appraisal), the attestation document (document), releases (release: the signed statement of a
release's reference values, Sigstore bundles) and the `quote verify` and `policy from-quote`
commands (cli). Evidence producers (configfs-tsm, NVML, the NVIDIA collateral service, the
simulated TEE) live in `attestation.producers`, which no verifier imports.
"""

from .appraisal import (
    GpuPolicy,
    Policy,
    PolicyError,
    ReferenceValues,
    ReleasePolicy,
    Verdict,
    appraise,
    appraise_gpu,
    load_policy,
)
from .binding import canonical_json, gpu_nonce, report_data
from .claims import Claims, GpuClaims, ReleaseClaims, SnpClaims, TdxClaims
from .document import VerifiedAttestation, build_document, verify_document, verify_evidence
from .errors import (
    AttestationError,
    AttestationUnavailable,
    CertificateRevoked,
    ChainInvalid,
    CollateralInvalid,
    DocumentInvalid,
    GpuEvidenceInvalid,
    NonceMismatch,
    ParseError,
    PolicyRefused,
    ReleaseInvalid,
    ReportDataMismatch,
    SignatureInvalid,
)
from .evidence import CpuEvidence, GpuProvider, TeeProvider
from .intel import IntelCollateral
from .nvidia import GpuAttestationReport, GpuVerification, verify_gpu_report
from .sevsnp import SnpReport, verify_report
from .tdx import TdxQuote, verify_quote

__all__ = [
    "AttestationError",
    "AttestationUnavailable",
    "CertificateRevoked",
    "ChainInvalid",
    "Claims",
    "CollateralInvalid",
    "CpuEvidence",
    "DocumentInvalid",
    "GpuAttestationReport",
    "GpuClaims",
    "GpuEvidenceInvalid",
    "GpuPolicy",
    "GpuProvider",
    "GpuVerification",
    "IntelCollateral",
    "NonceMismatch",
    "ParseError",
    "Policy",
    "PolicyError",
    "PolicyRefused",
    "ReferenceValues",
    "ReleaseClaims",
    "ReleaseInvalid",
    "ReleasePolicy",
    "ReportDataMismatch",
    "SignatureInvalid",
    "SnpClaims",
    "SnpReport",
    "TdxClaims",
    "TdxQuote",
    "TeeProvider",
    "Verdict",
    "VerifiedAttestation",
    "appraise",
    "appraise_gpu",
    "build_document",
    "canonical_json",
    "gpu_nonce",
    "load_policy",
    "report_data",
    "verify_document",
    "verify_evidence",
    "verify_gpu_report",
    "verify_quote",
    "verify_report",
]
