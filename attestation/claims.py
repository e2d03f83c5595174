"""Normalised claims: what verified evidence says, with no judgement of whether to trust it.

Verifiers (tdx, sevsnp, document) check that evidence is authentic and return these; `appraise`
(attestation.appraisal) is the one place that decides whether the claims are acceptable.
Byte fields are raw bytes; `as_json` gives every claim as hex strings for people and tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

TCB_UNKNOWN = "Unknown"  # no (current) collateral was available to compute a TCB status

TD_ATTRIBUTES_DEBUG = 0x01  # TD_ATTRIBUTES bit 0 (TUD.DEBUG), first byte of the little-endian field
TD_ATTRIBUTES_SEPT_VE_DISABLE = 1 << 28  # TD_ATTRIBUTES bit 28: no #VE on secure-EPT violations
SNP_POLICY_DEBUG = 1 << 19  # guest policy bit 19: the host may debug the guest


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "as_json"):
        return value.as_json()
    return value


class _Claims:
    def as_json(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class TdxClaims(_Claims):
    """A TDX quote's TD report, quoting enclave and platform facts (simulated quotes give the same)."""

    mr_td: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    td_attributes: bytes
    xfam: bytes
    tee_tcb_svn: bytes
    report_data: bytes
    qe_vendor_id: bytes
    qe_mr_signer: bytes
    qe_isv_prod_id: int
    qe_isv_svn: int
    qe_attributes: bytes
    qe_misc_select: int
    fmspc: bytes | None  # from the PCK certificate; None for the simulated TEE
    tcb_status: str = TCB_UNKNOWN
    advisory_ids: tuple[str, ...] = ()
    collateral_notes: tuple[str, ...] = ()
    # What was missing when tcb_status is Unknown, e.g. "the QE identity".
    collateral_missing: tuple[str, ...] = ()
    # tcbEvaluationDataNumber of the signed TCB info and QE identity that gave tcb_status.
    tcb_info_evaluation_data_number: int | None = None
    qe_identity_evaluation_data_number: int | None = None

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & TD_ATTRIBUTES_DEBUG)

    @property
    def sept_ve_disable(self) -> bool:
        return bool(int.from_bytes(self.td_attributes, "little") & TD_ATTRIBUTES_SEPT_VE_DISABLE)

    @property
    def measurement(self) -> bytes:
        return self.mr_td

    def as_json(self) -> dict[str, Any]:
        out = super().as_json()
        out["debug"] = self.debug
        out["sept_ve_disable"] = self.sept_ve_disable
        return out


@dataclass(frozen=True)
class SnpTcb(_Claims):
    """TCB_VERSION security patch levels (Turin adds the FMC level and moves the others)."""

    raw: int
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None  # Turin and later

    def as_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SnpClaims(_Claims):
    """A SEV-SNP report's guest and platform facts."""

    product: str  # chip family the chain was verified for: Milan, Genoa, Turin
    measurement: bytes
    host_data: bytes
    policy: int
    vmpl: int
    reported_tcb: SnpTcb
    chip_id: bytes
    guest_svn: int
    family_id: bytes
    image_id: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    platform_info: int
    signing_key: str  # "vcek" or "vlek"
    report_data: bytes
    # AMD publishes no TCB status: `appraise` decides it from REPORTED_TCB and min_reported_tcb.
    tcb_status: str = TCB_UNKNOWN
    collateral_notes: tuple[str, ...] = ()
    crl_checked: bool = False  # a current AMD CRL listed none of the chain

    @property
    def debug(self) -> bool:
        return bool(self.policy & SNP_POLICY_DEBUG)

    def as_json(self) -> dict[str, Any]:
        out = super().as_json()
        out["debug"] = self.debug
        return out


MEASUREMENTS_MATCH = "match"
MEASUREMENTS_MISMATCH = "mismatch"
MEASUREMENTS_NOT_CHECKED = "not_checked"  # no driver + VBIOS RIM pair came with the evidence
OCSP_GOOD = "good"  # every certificate that needs a status has a verified, current, good response
OCSP_UNKNOWN = "unknown"  # at least one has no current response
GPU_CC_MODE_ON = "on"


@dataclass(frozen=True)
class GpuClaims(_Claims):
    """One NVIDIA GPU's verified report (signature, chain, nonce, RIMs and OCSP responses authentic)."""

    device: int
    model: str | None  # chip, from the attestation certificate, e.g. "GH100"
    driver_version: str
    vbios_version: str  # as NVIDIA writes it, e.g. "96.00.5E.00.01"
    measurements: str  # MEASUREMENTS_*
    measurements_checked: int
    measurements_mismatched: tuple[int, ...]  # RIM indices (SPDM block index - 1)
    ocsp: str  # OCSP_GOOD or OCSP_UNKNOWN
    ocsp_missing: tuple[str, ...] = ()  # certificates without a current OCSP response
    # What the node read from NVML; None for a bare report (`tee-node gpu verify`), where no node speaks.
    cc_mode: str | None = None
    ready: bool | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReleaseClaims:
    """A release whose Sigstore bundle verified (chain, SCT, log proofs, DSSE signature) and
    whose statement is a tee-node release; whether its signer is the expected one is for
    `appraise` to judge (`certificate` is kept for that)."""

    version: str
    source: dict[str, Any]  # {"repository": URL, "commit": 40 hex}
    identities: tuple[str, ...]  # the signing certificate's SANs (the CI's OIDC identity)
    issuer: str | None  # the OIDC issuer Fulcio recorded in the certificate
    log_index: int
    integrated_time: int | None  # Unix seconds, from the log entry (None: Rekor v2, timestamped by a TSA)
    predicate: dict[str, Any]
    certificate: Any = field(repr=False, compare=False, default=None)  # cryptography x509.Certificate

    @property
    def identity(self) -> str | None:
        return self.identities[0] if self.identities else None

    @property
    def reference_values(self) -> dict[str, Any]:
        return self.predicate["reference_values"]

    def as_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "source": self.source,
            "identity": self.identity,
            "issuer": self.issuer,
            "log_index": self.log_index,
            "integrated_time": self.integrated_time,
            "predicate": self.predicate,
        }


@dataclass(frozen=True)
class Claims:
    """Everything appraisal looks at for one node.

    `gpus` carries one claims object per GPU; the document verifier refuses GPU evidence that does
    not verify, so `gpus` has one entry per GPU evidence entry.
    """

    tee: str  # "tdx", "sev-snp" or "simulated"
    simulated: bool
    cpu: TdxClaims | SnpClaims
    config_digest: bytes | None = None  # None for bare evidence (`tee-node quote verify`)
    gpu_evidence: int = 0
    gpus: tuple[GpuClaims, ...] = field(default=())
    kem_public_key: bytes | None = None  # the document's ML-KEM-768 key; None without one (or for bare evidence)
    release: ReleaseClaims | None = None  # a verified release bundle the node served (policies with [release])

    def as_json(self) -> dict[str, Any]:
        return {
            "tee": self.tee,
            "simulated": self.simulated,
            "cpu": self.cpu.as_json(),
            "config_digest": self.config_digest.hex() if self.config_digest is not None else None,
            "gpu_evidence": self.gpu_evidence,
            "gpus": [_jsonable(g) for g in self.gpus],
            "post_quantum": self.kem_public_key is not None,  # the key itself is in the document
            "release": self.release.as_json() if self.release is not None else None,
        }
