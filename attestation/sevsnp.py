"""AMD SEV-SNP attestation reports (version 2 and later, 1184 bytes): parse and verify to a pinned ARK."""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from . import der, trust
from .errors import ChainInvalid, ParseError, SignatureInvalid

REPORT_SIZE = 0x4A0  # 1184
MIN_VERSION = 2

VERSION = 0x00  # u32
GUEST_SVN = 0x04  # u32
POLICY = 0x08  # u64
FAMILY_ID = 0x10
IMAGE_ID = 0x20
ID_SIZE = 16
VMPL = 0x30  # u32
SIGNATURE_ALGO = 0x34  # u32
CURRENT_TCB = 0x38  # u64
PLATFORM_INFO = 0x40  # u64
SIGNER_INFO = 0x48  # u32: bit 0 author key enabled, bit 1 chip key masked, bits 2-4 signing key
REPORT_DATA = 0x50
REPORT_DATA_SIZE = 64
MEASUREMENT = 0x90
MEASUREMENT_SIZE = 48
HOST_DATA = 0xC0
HOST_DATA_SIZE = 32
ID_KEY_DIGEST = 0xE0
AUTHOR_KEY_DIGEST = 0x110
KEY_DIGEST_SIZE = 48
REPORT_ID = 0x140
REPORT_ID_MA = 0x160
REPORT_ID_SIZE = 32
REPORTED_TCB = 0x180  # u64
CPUID_FAM_ID = 0x188  # u8, version 3 and later (zero before)
CPUID_MOD_ID = 0x189
CPUID_STEP = 0x18A
CHIP_ID = 0x1A0
CHIP_ID_SIZE = 64
COMMITTED_TCB = 0x1E0  # u64
CURRENT_BUILD = 0x1E8  # u8 build, minor, major
COMMITTED_BUILD = 0x1EC  # u8 build, minor, major
LAUNCH_TCB = 0x1F0  # u64
SIGNED_SIZE = 0x2A0  # the signature covers bytes 0 .. 0x29F
SIGNATURE_R = 0x2A0
SIGNATURE_S = 0x2E8
SIGNATURE_COMPONENT_SIZE = 72  # little-endian, zero-extended

SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
SIGNING_KEY_SHIFT = 2
SIGNING_KEY_MASK = 0x7
SIGNING_KEY_VCEK = 0
SIGNING_KEY_VLEK = 1
MAX_VMPL = 3
_LEAF_COMMON_NAME = {SIGNING_KEY_VCEK: "SEV-VCEK", SIGNING_KEY_VLEK: "SEV-VLEK"}

# VCEK/VLEK extensions: the TCB the key was derived for, and the chip it belongs to.
OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
OID_HWID = "1.3.6.1.4.1.3704.1.4"


@dataclass(frozen=True)
class TcbVersion:
    """TCB_VERSION of Milan and Genoa: bootloader, TEE, SNP firmware and microcode security patch levels."""

    raw: int
    bootloader: int
    tee: int
    snp: int
    microcode: int

    @classmethod
    def from_int(cls, raw: int) -> "TcbVersion":
        b = raw.to_bytes(8, "little")
        return cls(raw=raw, bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])


@dataclass(frozen=True)
class SnpReport:
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    signer_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int
    cpuid_mod_id: int
    cpuid_step: int
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: tuple[int, int, int]  # major, minor, build
    committed_version: tuple[int, int, int]
    launch_tcb: TcbVersion
    signature_r: int
    signature_s: int
    raw: bytes

    @property
    def signing_key(self) -> int:
        return (self.signer_info >> SIGNING_KEY_SHIFT) & SIGNING_KEY_MASK

    @property
    def chip_key_masked(self) -> bool:
        return bool(self.signer_info & 0x2)

    @classmethod
    def from_bytes(cls, data: bytes) -> "SnpReport":
        data = bytes(data)
        if len(data) != REPORT_SIZE:
            raise ParseError(f"SEV-SNP report is {len(data)} bytes, expected {REPORT_SIZE}")

        def u32(off: int) -> int:
            return struct.unpack_from("<I", data, off)[0]

        def u64(off: int) -> int:
            return struct.unpack_from("<Q", data, off)[0]

        def field(off: int, size: int) -> bytes:
            return data[off:off + size]

        def le(off: int) -> int:
            return int.from_bytes(field(off, SIGNATURE_COMPONENT_SIZE), "little")

        version = u32(VERSION)
        if version < MIN_VERSION:
            raise ParseError(f"SEV-SNP report version {version} is not supported (need {MIN_VERSION} or later)")
        algo = u32(SIGNATURE_ALGO)
        if algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
            raise ParseError(f"SEV-SNP signature algorithm {algo} is not ECDSA P-384 with SHA-384 (1)")
        vmpl = u32(VMPL)
        if vmpl > MAX_VMPL:
            raise ParseError(f"SEV-SNP VMPL {vmpl} is out of range (0-3)")
        return cls(
            version=version,
            guest_svn=u32(GUEST_SVN),
            policy=u64(POLICY),
            family_id=field(FAMILY_ID, ID_SIZE),
            image_id=field(IMAGE_ID, ID_SIZE),
            vmpl=vmpl,
            signature_algo=algo,
            current_tcb=TcbVersion.from_int(u64(CURRENT_TCB)),
            platform_info=u64(PLATFORM_INFO),
            signer_info=u32(SIGNER_INFO),
            report_data=field(REPORT_DATA, REPORT_DATA_SIZE),
            measurement=field(MEASUREMENT, MEASUREMENT_SIZE),
            host_data=field(HOST_DATA, HOST_DATA_SIZE),
            id_key_digest=field(ID_KEY_DIGEST, KEY_DIGEST_SIZE),
            author_key_digest=field(AUTHOR_KEY_DIGEST, KEY_DIGEST_SIZE),
            report_id=field(REPORT_ID, REPORT_ID_SIZE),
            report_id_ma=field(REPORT_ID_MA, REPORT_ID_SIZE),
            reported_tcb=TcbVersion.from_int(u64(REPORTED_TCB)),
            cpuid_fam_id=data[CPUID_FAM_ID],
            cpuid_mod_id=data[CPUID_MOD_ID],
            cpuid_step=data[CPUID_STEP],
            chip_id=field(CHIP_ID, CHIP_ID_SIZE),
            committed_tcb=TcbVersion.from_int(u64(COMMITTED_TCB)),
            current_version=(data[CURRENT_BUILD + 2], data[CURRENT_BUILD + 1], data[CURRENT_BUILD]),
            committed_version=(data[COMMITTED_BUILD + 2], data[COMMITTED_BUILD + 1], data[COMMITTED_BUILD]),
            launch_tcb=TcbVersion.from_int(u64(LAUNCH_TCB)),
            signature_r=le(SIGNATURE_R),
            signature_s=le(SIGNATURE_S),
            raw=data,
        )


def looks_like_snp_report(data: bytes) -> bool:
    return len(data) == REPORT_SIZE and struct.unpack_from("<I", data, VERSION)[0] >= MIN_VERSION


@dataclass(frozen=True)
class SnpVerification:
    report: SnpReport
    chain: tuple[x509.Certificate, ...]  # VCEK/VLEK, ASK/ASVK, ARK


def load_amd_certificates(data: bytes) -> list[x509.Certificate]:
    # AMD issues VCEKs whose serial numbers are not positive; cryptography warns about that on every load.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*serial number.*")
        return trust.load_certificates(data)


def _find_leaf(report: SnpReport, certs: Sequence[x509.Certificate]) -> x509.Certificate:
    wanted = _LEAF_COMMON_NAME.get(report.signing_key)
    if wanted is None:
        raise ChainInvalid(f"report signing key {report.signing_key} is neither VCEK nor VLEK")
    for cert in certs:
        if trust.common_name(cert) == wanted:
            return cert
    raise ChainInvalid(f"no {wanted} certificate supplied for this report")


def _spl(cert: x509.Certificate, oid: str) -> int | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        return None
    return der.decode_integer(ext.value.value)


def _check_leaf_matches_report(leaf: x509.Certificate, report: SnpReport) -> None:
    """A VCEK is derived for one chip at one TCB; a key for another TCB must not vouch for this report."""
    tcb = report.reported_tcb
    for oid, value, name in (
        (OID_BL_SPL, tcb.bootloader, "bootloader"),
        (OID_TEE_SPL, tcb.tee, "TEE"),
        (OID_SNP_SPL, tcb.snp, "SNP"),
        (OID_UCODE_SPL, tcb.microcode, "microcode"),
    ):
        spl = _spl(leaf, oid)
        if spl is not None and spl != value:
            raise ChainInvalid(f"{trust.common_name(leaf)} was issued for {name} SPL {spl}, report has {value}")
    if report.signing_key == SIGNING_KEY_VCEK and not report.chip_key_masked:
        try:
            hwid = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_HWID)).value.value
        except x509.ExtensionNotFound:
            raise ChainInvalid("VCEK carries no hardware ID") from None
        if hwid != report.chip_id:
            raise ChainInvalid("VCEK belongs to another chip than the report's CHIP_ID")


def _build_chain(leaf: x509.Certificate, pool: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    chain = [leaf]
    while chain[-1].issuer != chain[-1].subject:
        issuer = next((c for c in pool if c.subject == chain[-1].issuer), None)
        if issuer is None or len(chain) > 3:
            raise ChainInvalid(f"no issuer found for {trust.common_name(chain[-1])!r}")
        chain.append(issuer)
    return chain


def verify_report(
    report: SnpReport | bytes,
    certificates: Sequence[x509.Certificate],
    *,
    at: datetime | None = None,
    trusted_roots: Sequence[x509.Certificate] | None = None,
) -> SnpVerification:
    """Report signature by the VCEK/VLEK, that key by ASK/ASVK, that by a pinned ARK (RSA-PSS SHA-384)."""
    if not isinstance(report, SnpReport):
        report = SnpReport.from_bytes(report)
    at = trust.as_utc(at)
    roots = trust.amd_roots() if trusted_roots is None else tuple(trusted_roots)
    if not certificates:
        raise ChainInvalid("no VCEK supplied")
    leaf = _find_leaf(report, certificates)
    # A missing ARK is taken from the pins; a supplied one must still be a pinned root.
    chain = _build_chain(leaf, [*certificates, *roots])
    root = trust.verify_chain(chain, at)
    trust.check_root(root, roots, allow_simulated=False)

    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise SignatureInvalid(f"{trust.common_name(leaf)} does not hold a P-384 key")
    try:
        key.verify(
            encode_dss_signature(report.signature_r, report.signature_s),
            report.raw[:SIGNED_SIZE],
            ec.ECDSA(hashes.SHA384()),
        )
    except InvalidSignature:
        raise SignatureInvalid(f"SEV-SNP report signature does not verify under the {trust.common_name(leaf)}") from None
    _check_leaf_matches_report(leaf, report)
    return SnpVerification(report=report, chain=tuple(chain))
