"""Verify an NVIDIA GPU attestation report offline: the SPDM signature by the attestation certificate,
its chain to the pinned NVIDIA Device Identity CA, the nonce, the RIMs (signature, chain, version) and
every active golden measurement, and OCSP responses when given.

Independent checks all run and each failure is listed, so a caller sees every reason at once; what
the verified facts are worth is for the policy to decide (`GpuVerification` carries them).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from datetime import datetime
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .. import trust
from ..claims import MEASUREMENTS_MATCH, MEASUREMENTS_MISMATCH, MEASUREMENTS_NOT_CHECKED, GpuClaims
from ..errors import AttestationError, CertificateRevoked, ChainInvalid, NonceMismatch, SignatureInvalid
from . import ocsp as ocsp_check
from .rim import ReferenceManifest, verify_rim
from .spdm import SIGNATURE_SIZE, GpuAttestationReport

# TCG DICE TcbInfo extension of the attestation (leaf) certificate; its last 48 bytes are the
# firmware id (SHA-384) that the report's opaque FWID field must repeat.
TCG_DICE_TCB_INFO_OID = x509.ObjectIdentifier("2.23.133.5.4.1")
FWID_SIZE = 48
# The RIM's index of the NVDEC0 measurement, not compared while NVDEC0 is disabled (NVIDIA's rule:
# the block then holds no meaningful value).
NVDEC0_MEASUREMENT_INDEX = 35

OCSP_REVOKED = "revoked"
OCSP_INVALID = "invalid"


@dataclass(frozen=True)
class GpuVerification:
    report: GpuAttestationReport
    model: str | None  # chip, from the attestation certificate (e.g. "GH100")
    driver_version: str
    vbios_version: str
    chain: tuple[x509.Certificate, ...]
    driver_rim: ReferenceManifest | None
    vbios_rim: ReferenceManifest | None
    measurements: str  # MEASUREMENTS_*
    measurements_checked: int
    measurements_matched: int
    measurements_mismatched: tuple[int, ...]  # RIM indices (SPDM block index - 1)
    ocsp: str  # ocsp.OCSP_GOOD / OCSP_UNKNOWN, or OCSP_REVOKED / OCSP_INVALID
    errors: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())

    ocsp_missing: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        """Signature, chain, nonce, RIM signatures and OCSP responses all verified."""
        return not self.errors

    def claims(self, device: int, *, cc_mode: str | None = None, ready: bool | None = None) -> GpuClaims:
        """What a valid report says, for appraisal; `cc_mode` and `ready` as the node reported them."""
        if not self.valid:
            raise ValueError("an invalid GPU report has no claims")
        return GpuClaims(
            device=device,
            model=self.model,
            driver_version=self.driver_version,
            vbios_version=self.vbios_version,
            measurements=self.measurements,
            measurements_checked=self.measurements_checked,
            measurements_mismatched=self.measurements_mismatched,
            ocsp=self.ocsp,
            ocsp_missing=self.ocsp_missing,
            cc_mode=cc_mode,
            ready=ready,
            notes=self.notes,
        )


def _reason(exc: AttestationError) -> str:
    return f"{type(exc).__name__}: {exc}"


def _load_chain(cert_chain: bytes | Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    if isinstance(cert_chain, (bytes, bytearray)):
        return tuple(trust.load_certificates(bytes(cert_chain)))
    return tuple(cert_chain)


def _verify_device_chain(chain: tuple[x509.Certificate, ...], at: datetime, roots: Sequence[x509.Certificate] | None) -> None:
    root = trust.verify_chain(chain, at)
    trust.check_root(root, trust.nvidia_device_roots() if roots is None else roots, simulated_ok=False)


def _verify_signature(report: GpuAttestationReport, leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise SignatureInvalid("the GPU attestation certificate does not hold an ECDSA P-384 key")
    half = SIGNATURE_SIZE // 2
    signature = report.response.signature
    r, s = int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise SignatureInvalid("GPU report signature (attestation key over request and response) does not verify") from None


def _check_fwid(report: GpuAttestationReport, leaf: x509.Certificate) -> None:
    fwid = report.response.opaque.fwid
    if fwid is None:
        return  # older firmware does not report it (the test_no_gpu sample)
    try:
        extension = leaf.extensions.get_extension_for_oid(TCG_DICE_TCB_INFO_OID).value
    except x509.ExtensionNotFound:
        raise ChainInvalid("the report carries a firmware id but its attestation certificate has no TCG DICE TcbInfo") from None
    if not hmac.compare_digest(extension.value[-FWID_SIZE:], fwid):
        raise ChainInvalid("the report's firmware id differs from its attestation certificate's")


def model_of(leaf: x509.Certificate) -> str | None:
    """The chip named by the attestation certificate, e.g. 'GH100 A01 GSP FMC LF' -> 'GH100'."""
    name = trust.common_name(leaf).split()
    return name[0] if name else None


def _classify(
    manifests: list[ReferenceManifest], report: GpuAttestationReport, model: str | None, errors: list[str]
) -> tuple[ReferenceManifest | None, ReferenceManifest | None]:
    """Which RIM is the driver's and which the VBIOS's: the one whose version the report states."""
    driver = vbios = None
    for manifest in manifests:
        if model is not None and manifest.product != model:
            errors.append(f"RimMismatch: RIM {manifest.version!r} is for {manifest.product!r}, the GPU is a {model!r}")
        elif manifest.version == report.driver_version:
            if driver is not None:
                errors.append("RimMismatch: two driver RIMs were given")
            driver = manifest
        elif manifest.version.upper() == report.vbios_version:
            if vbios is not None:
                errors.append("RimMismatch: two VBIOS RIMs were given")
            vbios = manifest
        else:
            errors.append(
                f"RimMismatch: RIM version {manifest.version!r} is neither the report's driver version "
                f"{report.driver_version!r} nor its VBIOS version {report.vbios_version!r}"
            )
    return driver, vbios


def _compare(
    report: GpuAttestationReport, driver: ReferenceManifest, vbios: ReferenceManifest, errors: list[str], notes: list[str]
) -> tuple[int, int, tuple[int, ...]]:
    golden = {m.index: m for m in driver.active}
    for m in vbios.active:
        if m.index in golden:
            errors.append(f"RimMismatch: the driver and VBIOS RIMs both set measurement {m.index}")
            return 0, 0, ()
        golden[m.index] = m
    skip_nvdec = report.response.opaque.nvdec0_disabled and NVDEC0_MEASUREMENT_INDEX in golden
    if skip_nvdec:
        notes.append(f"measurement {NVDEC0_MEASUREMENT_INDEX} (NVDEC0) not compared: NVDEC0 is disabled")
        del golden[NVDEC0_MEASUREMENT_INDEX]
    mismatched = []
    for index, reference in sorted(golden.items()):
        runtime = report.response.measurement(index + 1)
        if runtime is None or len(runtime) != reference.size or not any(hmac.compare_digest(runtime, v) for v in reference.alternatives):
            mismatched.append(index)
    return len(golden), len(golden) - len(mismatched), tuple(mismatched)


def verify_gpu_report(
    report: bytes | GpuAttestationReport,
    cert_chain: bytes | Sequence[x509.Certificate],
    *,
    nonce: bytes,
    rims: Sequence[bytes] = (),
    ocsp_responses: Sequence[bytes] = (),
    at: datetime | None = None,
    device_roots: Sequence[x509.Certificate] | None = None,
    rim_roots: Sequence[x509.Certificate] | None = None,
) -> GpuVerification:
    """Verify `report` (NVML's request ‖ response) against `nonce`; raises ParseError only when it is unreadable."""
    if not isinstance(report, GpuAttestationReport):
        report = GpuAttestationReport.from_bytes(report)
    driver_version, vbios_version = report.driver_version, report.vbios_version  # ParseError when absent
    at = trust.as_utc(at)
    errors: list[str] = []
    notes: list[str] = []

    chain: tuple[x509.Certificate, ...] = ()
    try:
        chain = _load_chain(cert_chain)
        _verify_device_chain(chain, at, device_roots)
    except AttestationError as exc:
        errors.append(_reason(exc))
    model = model_of(chain[0]) if chain else None
    if chain:
        for check in (_verify_signature, _check_fwid):
            try:
                check(report, chain[0])
            except AttestationError as exc:
                errors.append(_reason(exc))
    if not hmac.compare_digest(report.nonce, nonce):
        errors.append(_reason(NonceMismatch("the GPU report answers a different nonce than the one expected")))

    manifests: list[ReferenceManifest] = []
    for data in rims:
        try:
            manifests.append(verify_rim(data, at=at, trusted_roots=rim_roots))
        except AttestationError as exc:
            errors.append(_reason(exc))
    driver, vbios = _classify(manifests, report, model, errors)

    measurements, checked, matched, mismatched = MEASUREMENTS_NOT_CHECKED, 0, 0, ()
    if driver is not None and vbios is not None:
        checked, matched, mismatched = _compare(report, driver, vbios, errors, notes)
        if checked:
            measurements = MEASUREMENTS_MISMATCH if mismatched else MEASUREMENTS_MATCH
    elif manifests:
        notes.append("measurements not compared: both the driver RIM and the VBIOS RIM are needed")

    subjects = ocsp_check.gpu_subjects(chain, [m.signing_chain for m in (driver, vbios) if m is not None])
    ocsp_missing: tuple[str, ...] = ()
    try:
        result = ocsp_check.check_ocsp(subjects, ocsp_check.load_responses(ocsp_responses), at)
        ocsp_status, ocsp_missing = result.status, result.missing
        if result.missing:
            notes.append(f"no current OCSP response for {', '.join(result.missing)}")
        if result.stale:
            notes.append(f"OCSP responses out of date (or without next_update) for {', '.join(result.stale)}: fetch fresh ones")
    except CertificateRevoked as exc:
        ocsp_status = OCSP_REVOKED
        errors.append(_reason(exc))
    except AttestationError as exc:
        ocsp_status = OCSP_INVALID
        errors.append(_reason(exc))

    return GpuVerification(
        report=report,
        model=model,
        driver_version=driver_version,
        vbios_version=vbios_version,
        chain=chain,
        driver_rim=driver,
        vbios_rim=vbios,
        measurements=measurements,
        measurements_checked=checked,
        measurements_matched=matched,
        measurements_mismatched=mismatched,
        ocsp=ocsp_status,
        errors=tuple(errors),
        notes=tuple(notes),
        ocsp_missing=ocsp_missing,
    )


