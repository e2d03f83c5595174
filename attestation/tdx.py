"""Intel TDX quotes (v4 and v5, ECDSA-256 attestation key, certification data type 6): parse and verify."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from . import trust
from .claims import TdxClaims
from .errors import ParseError, ReportDataMismatch, SignatureInvalid
from .intel import NO_COLLATERAL, CollateralResult, IntelCollateral, PckExtensions
from .layout import need

# --- Quote header (48 bytes, common to v4 and v5) ---
HEADER_SIZE = 48
HDR_VERSION = 0  # u16
HDR_ATTESTATION_KEY_TYPE = 2  # u16
HDR_TEE_TYPE = 4  # u32
HDR_QE_SVN = 8  # u16
HDR_PCE_SVN = 10  # u16
HDR_QE_VENDOR_ID = 12
QE_VENDOR_ID_SIZE = 16
HDR_USER_DATA = 28
USER_DATA_SIZE = 20

QUOTE_VERSION_4 = 4
QUOTE_VERSION_5 = 5
TEE_TYPE_TDX = 0x81
ATTESTATION_KEY_ECDSA_P256 = 2

# --- Body placement ---
V4_BODY_OFFSET = HEADER_SIZE
V5_BODY_TYPE_OFFSET = HEADER_SIZE  # u16
V5_BODY_SIZE_OFFSET = HEADER_SIZE + 2  # u32
V5_BODY_OFFSET = HEADER_SIZE + 6
BODY_TYPE_TD_REPORT10 = 2
BODY_TYPE_TD_REPORT15 = 3

# --- TD report body (TDX 1.0: 584 bytes; TDX 1.5 appends TEE_TCB_SVN2 and MRSERVICETD: 648) ---
TD_REPORT10_SIZE = 584
TD_REPORT15_SIZE = 648
MEASUREMENT_SIZE = 48
TD_TEE_TCB_SVN = 0
TEE_TCB_SVN_SIZE = 16
TD_MR_SEAM = 16
TD_MR_SIGNER_SEAM = 64
TD_SEAM_ATTRIBUTES = 112
TD_TD_ATTRIBUTES = 120
TD_XFAM = 128
ATTRIBUTES_SIZE = 8
TD_MR_TD = 136
TD_MR_CONFIG_ID = 184
TD_MR_OWNER = 232
TD_MR_OWNER_CONFIG = 280
TD_RTMR0 = 328
RTMR_COUNT = 4
TD_REPORT_DATA = 520
REPORT_DATA_SIZE = 64
TD_TEE_TCB_SVN2 = 584
TD_MR_SERVICE_TD = 600

# --- Quote signature data ---
SIG_DATA_LENGTH_SIZE = 4
ECDSA_SIGNATURE_SIZE = 64  # r || s, big-endian
ATTESTATION_KEY_SIZE = 64  # x || y of the P-256 point
CERT_DATA_HEADER_SIZE = 6  # type u16, size u32
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6

# --- QE report (an SGX enclave report body, 384 bytes) ---
QE_REPORT_SIZE = 384
QE_CPU_SVN = 0
CPU_SVN_SIZE = 16
QE_MISC_SELECT = 16  # u32
QE_ATTRIBUTES = 48
QE_ATTRIBUTES_SIZE = 16
QE_MR_ENCLAVE = 64
QE_MR_SIGNER = 128
SGX_HASH_SIZE = 32
QE_ISV_PROD_ID = 256  # u16
QE_ISV_SVN = 258  # u16
QE_REPORT_DATA = 320
QE_AUTH_SIZE_SIZE = 2


def _need(data: bytes, offset: int, size: int, what: str) -> bytes:
    return need(data, offset, size, what, "TDX quote")


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> "QuoteHeader":
        raw = _need(data, 0, HEADER_SIZE, "header")
        version, key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", raw, HDR_VERSION)
        if version not in (QUOTE_VERSION_4, QUOTE_VERSION_5):
            raise ParseError(f"unsupported TDX quote version {version} (expected 4 or 5)")
        if tee_type != TEE_TYPE_TDX:
            raise ParseError(f"quote TEE type 0x{tee_type:x} is not TDX (0x81)")
        if key_type != ATTESTATION_KEY_ECDSA_P256:
            raise ParseError(f"unsupported attestation key type {key_type} (expected 2, ECDSA-256 P-256)")
        return cls(
            version=version,
            attestation_key_type=key_type,
            tee_type=tee_type,
            qe_svn=qe_svn,
            pce_svn=pce_svn,
            qe_vendor_id=raw[HDR_QE_VENDOR_ID:HDR_QE_VENDOR_ID + QE_VENDOR_ID_SIZE],
            user_data=raw[HDR_USER_DATA:HDR_USER_DATA + USER_DATA_SIZE],
        )


@dataclass(frozen=True)
class TdReport:
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, ...]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None  # TDX 1.5 only
    mr_service_td: bytes | None = None  # TDX 1.5 only

    @classmethod
    def from_bytes(cls, data: bytes) -> "TdReport":
        if len(data) not in (TD_REPORT10_SIZE, TD_REPORT15_SIZE):
            raise ParseError(f"TD report is {len(data)} bytes, expected {TD_REPORT10_SIZE} or {TD_REPORT15_SIZE}")

        def mr(offset: int) -> bytes:
            return data[offset:offset + MEASUREMENT_SIZE]

        is15 = len(data) == TD_REPORT15_SIZE
        return cls(
            tee_tcb_svn=data[TD_TEE_TCB_SVN:TD_TEE_TCB_SVN + TEE_TCB_SVN_SIZE],
            mr_seam=mr(TD_MR_SEAM),
            mr_signer_seam=mr(TD_MR_SIGNER_SEAM),
            seam_attributes=data[TD_SEAM_ATTRIBUTES:TD_SEAM_ATTRIBUTES + ATTRIBUTES_SIZE],
            td_attributes=data[TD_TD_ATTRIBUTES:TD_TD_ATTRIBUTES + ATTRIBUTES_SIZE],
            xfam=data[TD_XFAM:TD_XFAM + ATTRIBUTES_SIZE],
            mr_td=mr(TD_MR_TD),
            mr_config_id=mr(TD_MR_CONFIG_ID),
            mr_owner=mr(TD_MR_OWNER),
            mr_owner_config=mr(TD_MR_OWNER_CONFIG),
            rtmrs=tuple(mr(TD_RTMR0 + i * MEASUREMENT_SIZE) for i in range(RTMR_COUNT)),
            report_data=data[TD_REPORT_DATA:TD_REPORT_DATA + REPORT_DATA_SIZE],
            tee_tcb_svn2=data[TD_TEE_TCB_SVN2:TD_TEE_TCB_SVN2 + TEE_TCB_SVN_SIZE] if is15 else None,
            mr_service_td=mr(TD_MR_SERVICE_TD) if is15 else None,
        )


@dataclass(frozen=True)
class QeReport:
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes
    raw: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> "QeReport":
        if len(data) != QE_REPORT_SIZE:
            raise ParseError(f"QE report is {len(data)} bytes, expected {QE_REPORT_SIZE}")
        (misc_select,) = struct.unpack_from("<I", data, QE_MISC_SELECT)
        prod_id, isv_svn = struct.unpack_from("<HH", data, QE_ISV_PROD_ID)
        return cls(
            cpu_svn=data[QE_CPU_SVN:QE_CPU_SVN + CPU_SVN_SIZE],
            misc_select=misc_select,
            attributes=data[QE_ATTRIBUTES:QE_ATTRIBUTES + QE_ATTRIBUTES_SIZE],
            mr_enclave=data[QE_MR_ENCLAVE:QE_MR_ENCLAVE + SGX_HASH_SIZE],
            mr_signer=data[QE_MR_SIGNER:QE_MR_SIGNER + SGX_HASH_SIZE],
            isv_prod_id=prod_id,
            isv_svn=isv_svn,
            report_data=data[QE_REPORT_DATA:QE_REPORT_DATA + REPORT_DATA_SIZE],
            raw=bytes(data),
        )


@dataclass(frozen=True)
class QeCertificationData:
    """Certification data type 6: the QE report, its PCK signature, QE auth data and the PCK chain."""

    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> "QeCertificationData":
        off = 0
        qe_report = QeReport.from_bytes(_need(data, off, QE_REPORT_SIZE, "QE report"))
        off += QE_REPORT_SIZE
        signature = _need(data, off, ECDSA_SIGNATURE_SIZE, "QE report signature")
        off += ECDSA_SIGNATURE_SIZE
        (auth_size,) = struct.unpack("<H", _need(data, off, QE_AUTH_SIZE_SIZE, "QE auth data size"))
        off += QE_AUTH_SIZE_SIZE
        auth = _need(data, off, auth_size, "QE auth data")
        off += auth_size
        cert_type, cert_size = struct.unpack("<HI", _need(data, off, CERT_DATA_HEADER_SIZE, "PCK certification header"))
        off += CERT_DATA_HEADER_SIZE
        if cert_type != CERT_TYPE_PCK_CHAIN:
            raise ParseError(f"nested certification data type {cert_type} is not a PCK chain (5)")
        chain = _need(data, off, cert_size, "PCK certificate chain")
        return cls(qe_report=qe_report, qe_report_signature=signature, qe_auth_data=auth, pck_chain_pem=chain)


@dataclass(frozen=True)
class QuoteSignatureData:
    signature: bytes
    attestation_key: bytes
    certification: QeCertificationData

    @classmethod
    def from_bytes(cls, data: bytes) -> "QuoteSignatureData":
        signature = _need(data, 0, ECDSA_SIGNATURE_SIZE, "quote signature")
        key = _need(data, ECDSA_SIGNATURE_SIZE, ATTESTATION_KEY_SIZE, "attestation key")
        off = ECDSA_SIGNATURE_SIZE + ATTESTATION_KEY_SIZE
        cert_type, cert_size = struct.unpack("<HI", _need(data, off, CERT_DATA_HEADER_SIZE, "certification data header"))
        if cert_type != CERT_TYPE_QE_REPORT:
            raise ParseError(f"certification data type {cert_type} is not supported (expected 6, QE report)")
        body = _need(data, off + CERT_DATA_HEADER_SIZE, cert_size, "certification data")
        return cls(signature=signature, attestation_key=key, certification=QeCertificationData.from_bytes(body))


@dataclass(frozen=True)
class TdxQuote:
    header: QuoteHeader
    body_type: int  # v4 quotes carry no type; reported as the TD report 1.0 type
    body: TdReport
    signature_data: QuoteSignatureData
    signed_bytes: bytes  # header and body exactly as the attestation key signed them
    raw: bytes  # the quote without trailing padding

    @classmethod
    def from_bytes(cls, data: bytes) -> "TdxQuote":
        data = bytes(data)
        header = QuoteHeader.from_bytes(data)
        if header.version == QUOTE_VERSION_4:
            body_type, body_offset, body_size = BODY_TYPE_TD_REPORT10, V4_BODY_OFFSET, TD_REPORT10_SIZE
        else:
            body_type, body_size = struct.unpack("<HI", _need(data, V5_BODY_TYPE_OFFSET, 6, "v5 body descriptor"))
            expected = {BODY_TYPE_TD_REPORT10: TD_REPORT10_SIZE, BODY_TYPE_TD_REPORT15: TD_REPORT15_SIZE}
            if body_type not in expected:
                raise ParseError(f"unsupported v5 quote body type {body_type} (expected 2 or 3)")
            if body_size != expected[body_type]:
                raise ParseError(f"v5 body type {body_type} declares {body_size} bytes, expected {expected[body_type]}")
            body_offset = V5_BODY_OFFSET
        body = TdReport.from_bytes(_need(data, body_offset, body_size, "TD report body"))
        sig_len_offset = body_offset + body_size
        (sig_len,) = struct.unpack("<I", _need(data, sig_len_offset, SIG_DATA_LENGTH_SIZE, "signature data length"))
        sig_offset = sig_len_offset + SIG_DATA_LENGTH_SIZE
        signature_data = QuoteSignatureData.from_bytes(_need(data, sig_offset, sig_len, "signature data"))
        # Bytes after the declared signature data (zero padding of a fixed-size buffer) are not part of the quote.
        return cls(
            header=header,
            body_type=body_type,
            body=body,
            signature_data=signature_data,
            signed_bytes=data[:sig_len_offset],
            raw=data[:sig_offset + sig_len],
        )


def looks_like_tdx_quote(data: bytes) -> bool:
    if len(data) < HEADER_SIZE:
        return False
    version, _, tee_type = struct.unpack_from("<HHI", data, 0)
    return version in (QUOTE_VERSION_4, QUOTE_VERSION_5) and tee_type == TEE_TYPE_TDX


@dataclass(frozen=True)
class TdxVerification:
    quote: TdxQuote
    simulated: bool  # the chain ends in the simulated TEE's root; appraise decides whether that is acceptable
    pck_chain: tuple[x509.Certificate, ...]
    claims: TdxClaims


def claims_of(quote: TdxQuote, *, fmspc: bytes | None, collateral: CollateralResult = NO_COLLATERAL) -> TdxClaims:
    body, qe = quote.body, quote.signature_data.certification.qe_report
    return TdxClaims(
        mr_td=body.mr_td,
        rtmrs=body.rtmrs,  # type: ignore[arg-type]
        mr_config_id=body.mr_config_id,
        mr_owner=body.mr_owner,
        mr_owner_config=body.mr_owner_config,
        mr_seam=body.mr_seam,
        mr_signer_seam=body.mr_signer_seam,
        td_attributes=body.td_attributes,
        xfam=body.xfam,
        tee_tcb_svn=body.tee_tcb_svn,
        report_data=body.report_data,
        qe_vendor_id=quote.header.qe_vendor_id,
        qe_mr_signer=qe.mr_signer,
        qe_isv_prod_id=qe.isv_prod_id,
        qe_isv_svn=qe.isv_svn,
        qe_attributes=qe.attributes,
        qe_misc_select=qe.misc_select,
        fmspc=fmspc,
        tcb_status=collateral.status,
        advisory_ids=collateral.advisory_ids,
        collateral_notes=collateral.notes,
        collateral_missing=collateral.missing,
        tcb_info_evaluation_data_number=collateral.tcb_info_evaluation_data_number,
        qe_identity_evaluation_data_number=collateral.qe_identity_evaluation_data_number,
    )


def _p256_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise SignatureInvalid("attestation key is not a valid P-256 point") from None


def _verify_p256(key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes, what: str) -> None:
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid(f"{what} does not verify") from None


def verify_quote(
    quote: TdxQuote | bytes,
    *,
    at: datetime | None = None,
    trusted_roots: Sequence[x509.Certificate] | None = None,
    collateral: IntelCollateral | None = None,
) -> TdxVerification:
    """Verify every signature of a TDX quote up to a pinned Intel SGX Root CA (or the simulated root).

    `at` fixes the time at which certificates (and collateral) must be valid. The result's claims
    say what the quote states; `attestation.appraisal.appraise` decides whether to trust it.
    """
    if not isinstance(quote, TdxQuote):
        quote = TdxQuote.from_bytes(quote)
    at = trust.as_utc(at)
    sig = quote.signature_data
    cert_data = sig.certification

    _verify_p256(_p256_key(sig.attestation_key), sig.signature, quote.signed_bytes, "quote signature (attestation key over header and TD report)")

    chain = tuple(trust.load_certificates(cert_data.pck_chain_pem))
    root = trust.verify_chain(chain, at)
    simulated = trust.check_root(root, trust.intel_roots() if trusted_roots is None else trusted_roots)

    pck_key = chain[0].public_key()
    if not isinstance(pck_key, ec.EllipticCurvePublicKey):
        raise SignatureInvalid("PCK certificate does not hold an EC key")
    _verify_p256(pck_key, cert_data.qe_report_signature, cert_data.qe_report.raw, "QE report signature (PCK key)")

    # The QE vouches for the attestation key by hashing it (with its auth data) into its own REPORTDATA.
    expected = hashlib.sha256(sig.attestation_key + cert_data.qe_auth_data).digest()
    binding = cert_data.qe_report.report_data
    if binding[:32] != expected or any(binding[32:]):
        raise ReportDataMismatch("QE report does not bind the attestation key (SHA-256(key || QE auth data))")

    # The simulated PCK is no Intel platform certificate: it has no FMSPC.
    fmspc = None if simulated else PckExtensions.from_certificate(chain[0]).fmspc
    result = collateral.evaluate(quote, chain, at) if collateral is not None else NO_COLLATERAL
    claims = claims_of(quote, fmspc=fmspc, collateral=result)
    return TdxVerification(quote=quote, simulated=simulated, pck_chain=chain, claims=claims)

