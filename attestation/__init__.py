"""TEE attestation for tee-node: TDX and SEV-SNP evidence, its verification, and the simulated TEE.

Layout: parsers and verifiers per TEE (tdx, sevsnp), vendor collateral (intel), certificate trust
(trust, roots/), the report_data commitment (binding), evidence providers (providers, simulated),
the attestation document (document) and the `quote verify` command (cli).
"""

from .binding import canonical_json, gpu_nonce, report_data
from .document import Policy, VerifiedAttestation, build_document, verify_document
from .errors import (
    AttestationError,
    AttestationUnavailable,
    CertificateRevoked,
    ChainInvalid,
    CollateralInvalid,
    DocumentInvalid,
    GpuEvidenceInvalid,
    MeasurementNotAllowed,
    NonceMismatch,
    ParseError,
    ReportDataMismatch,
    SignatureInvalid,
    SimulatedNotAllowed,
    TeeNotAllowed,
)
from .intel import IntelCollateral
from .providers import CpuEvidence, GpuProvider, NvidiaGpuProvider, SimulatedProvider, TeeProvider, TsmProvider
from .sevsnp import SnpReport, verify_report
from .tdx import TdxQuote, verify_quote

__all__ = [
    "AttestationError",
    "AttestationUnavailable",
    "CertificateRevoked",
    "ChainInvalid",
    "CollateralInvalid",
    "CpuEvidence",
    "DocumentInvalid",
    "GpuEvidenceInvalid",
    "GpuProvider",
    "IntelCollateral",
    "MeasurementNotAllowed",
    "NonceMismatch",
    "NvidiaGpuProvider",
    "ParseError",
    "Policy",
    "ReportDataMismatch",
    "SignatureInvalid",
    "SimulatedNotAllowed",
    "SimulatedProvider",
    "SnpReport",
    "TdxQuote",
    "TeeNotAllowed",
    "TeeProvider",
    "TsmProvider",
    "VerifiedAttestation",
    "build_document",
    "canonical_json",
    "gpu_nonce",
    "report_data",
    "verify_document",
    "verify_quote",
    "verify_report",
]
