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
from .claims import SnpClaims, SnpTcb
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
OID_FMC_SPL = "1.3.6.1.4.1.3704.1.3.9"  # Turin and later
OID_HWID = "1.3.6.1.4.1.3704.1.4"
OID_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"

# (CPUID family, high nibble of the model) of each chip family, as SNP reports v3+ carry them.
CPUID_PRODUCT = {(0x19, 0x0): "Milan", (0x19, 0x1): "Genoa", (0x19, 0xA): "Genoa", (0x1A, 0x0): "Turin", (0x1A, 0x1): "Turin"}


@dataclass(frozen=True)
class TcbVersion:
    """TCB_VERSION in the Milan and Genoa layout (Turin's differs: see decode_tcb, once the chip family is known)."""

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
    claims: SnpClaims


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


def _extension(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value.value
    except x509.ExtensionNotFound:
        return None


def product_of(leaf: x509.Certificate, report: SnpReport) -> str:
    """The chip family a VCEK/VLEK was issued for (productName, e.g. "Milan-B0"), checked against
    the report's CPUID family and model where the report carries them (version 3 and later)."""
    raw = _extension(leaf, OID_PRODUCT_NAME)
    if raw is None:
        raise ChainInvalid(f"{trust.common_name(leaf)} carries no productName")
    tag, value, _ = der.read_tlv(raw)
    if tag != der.TAG_IA5_STRING:
        raise ChainInvalid(f"{trust.common_name(leaf)} productName is not an IA5String")
    product = value.decode("ascii", "replace").split("-")[0]
    if product not in trust.AMD_PRODUCTS:
        raise ChainInvalid(f"{trust.common_name(leaf)} is for AMD product {product!r}, which has no pinned ARK")
    if report.cpuid_fam_id:
        by_cpuid = CPUID_PRODUCT.get((report.cpuid_fam_id, report.cpuid_mod_id >> 4))
        if by_cpuid != product:
            raise ChainInvalid(
                f"report CPUID family 0x{report.cpuid_fam_id:x} model 0x{report.cpuid_mod_id:x} is not a {product} chip"
            )
    return product


def decode_tcb(raw: int, product: str) -> SnpTcb:
    if product == "Turin":
        b = raw.to_bytes(8, "little")
        return SnpTcb(raw=raw, fmc=b[0], bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7])
    tcb = TcbVersion.from_int(raw)
    return SnpTcb(raw=raw, bootloader=tcb.bootloader, tee=tcb.tee, snp=tcb.snp, microcode=tcb.microcode)


def _spl(cert: x509.Certificate, oid: str) -> int | None:
    raw = _extension(cert, oid)
    return None if raw is None else der.decode_integer(raw)


def _check_leaf_matches_report(leaf: x509.Certificate, report: SnpReport, product: str) -> None:
    """A VCEK is derived for one chip at one TCB; a key for another TCB must not vouch for this report.

    Every TCB extension must be present: a key that does not say which TCB it was derived for
    cannot vouch for the report's."""
    tcb = decode_tcb(report.reported_tcb.raw, product)
    levels = [(OID_BL_SPL, tcb.bootloader, "bootloader"), (OID_TEE_SPL, tcb.tee, "TEE"),
              (OID_SNP_SPL, tcb.snp, "SNP"), (OID_UCODE_SPL, tcb.microcode, "microcode")]
    if product == "Turin":
        levels.append((OID_FMC_SPL, tcb.fmc, "FMC"))
    for oid, value, name in levels:
        spl = _spl(leaf, oid)
        if spl is None:
            raise ChainInvalid(f"{trust.common_name(leaf)} has no {name} SPL extension")
        if spl != value:
            raise ChainInvalid(f"{trust.common_name(leaf)} was issued for {name} SPL {spl}, report has {value}")
    if report.signing_key == SIGNING_KEY_VCEK and not report.chip_key_masked:
        hwid = _extension(leaf, OID_HWID)
        if hwid is None:
            raise ChainInvalid("VCEK carries no hardware ID")
        # Turin VCEKs name the chip by the first 8 bytes of CHIP_ID; the rest of the field is zero.
        if hwid != report.chip_id[:len(hwid)] or any(report.chip_id[len(hwid):]):
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
    crl: bytes | None = None,
) -> SnpVerification:
    """Report signature by the VCEK/VLEK, that key by its family's ASK/ASVK, that by the family's ARK.

    The ARK must be the pinned root of the chip family the VCEK names (Milan, Genoa, Turin). The
    family's ASK is pinned as well, so a VCEK alone verifies. With AMD's CRL (`crl`, DER or PEM)
    the ASK is checked for revocation (`crl_checked`). AMD publishes no TCB status: whether
    REPORTED_TCB is recent enough is `appraise`'s decision (min_reported_tcb), not this one's.
    """
    if not isinstance(report, SnpReport):
        report = SnpReport.from_bytes(report)
    at = trust.as_utc(at)
    if not certificates:
        raise ChainInvalid("no VCEK supplied")
    leaf = _find_leaf(report, certificates)
    product = product_of(leaf, report)
    pinned = trusted_roots is None
    roots = (trust.amd_ark(product),) if pinned else tuple(trusted_roots)
    # A missing ASK or ARK is taken from the pins; a supplied ARK must still be the family's pinned root.
    pool = [*certificates, *((trust.amd_ask(product),) if pinned else ()), *roots]
    chain = _build_chain(leaf, pool)
    root = trust.verify_chain(chain, at)
    trust.check_root(root, roots, simulated_ok=False)
    if len(chain) != 3:
        raise ChainInvalid(f"{trust.common_name(leaf)} chain has {len(chain)} certificates, expected key, ASK/ASVK, ARK")
    expected_ask = f"SEV-{product}" if report.signing_key == SIGNING_KEY_VCEK else f"SEV-VLEK-{product}"
    if trust.common_name(chain[1]) != expected_ask:
        raise ChainInvalid(f"{trust.common_name(leaf)} is issued by {trust.common_name(chain[1])!r}, expected {expected_ask!r}")

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
    _check_leaf_matches_report(leaf, report, product)

    notes: tuple[str, ...] = ()
    if crl is not None:
        # AMD's CRL is issued by the ARK and lists revoked ASKs/ASVKs.
        trust.check_crl(trust.load_crl(crl), chain[2], [chain[1]], at)
        notes = ("AMD CRL checked",)
    claims = SnpClaims(
        product=product,
        measurement=report.measurement,
        host_data=report.host_data,
        policy=report.policy,
        vmpl=report.vmpl,
        reported_tcb=decode_tcb(report.reported_tcb.raw, product),
        chip_id=report.chip_id,
        guest_svn=report.guest_svn,
        family_id=report.family_id,
        image_id=report.image_id,
        id_key_digest=report.id_key_digest,
        author_key_digest=report.author_key_digest,
        platform_info=report.platform_info,
        signing_key="vcek" if report.signing_key == SIGNING_KEY_VCEK else "vlek",
        report_data=report.report_data,
        collateral_notes=notes,
        crl_checked=crl is not None,
    )
    return SnpVerification(report=report, chain=tuple(chain), claims=claims)
