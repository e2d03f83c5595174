"""Certificates: loading, chain checks at a given time, pinned vendor roots, the simulated root, CRLs."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from .errors import ChainInvalid, CertificateRevoked, CollateralInvalid, SignatureInvalid

# SHA-256 of the DER of each pinned root. A root file that does not hash to its pin is refused,
# so editing roots/ cannot widen trust.
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
AMD_ARK_MILAN_SHA256 = "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"
AMD_ARK_GENOA_SHA256 = "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1"
AMD_ARK_TURIN_SHA256 = "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a"
# AMD's ASKs (the VCEK issuers), pinned so that a VCEK alone verifies. Each is signed by its ARK.
AMD_ASK_MILAN_SHA256 = "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b"
AMD_ASK_GENOA_SHA256 = "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521"
AMD_ASK_TURIN_SHA256 = "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185"
# NVIDIA's roots as nvtrust ships them (verifier_device_root.pem, verifier_RIM_root.pem): GPU
# attestation certificate chains end in the first, reference integrity manifests in the second.
NVIDIA_DEVICE_IDENTITY_CA_SHA256 = "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
NVIDIA_RIM_ROOT_CA_SHA256 = "12977b5115acb0381179279fffeb5a8c4d264971ebb32298023a465fa41df5d1"

_ROOT_FILES = {
    "intel_sgx_root_ca.pem": INTEL_SGX_ROOT_CA_SHA256,
    "amd_ark_milan.pem": AMD_ARK_MILAN_SHA256,
    "amd_ark_genoa.pem": AMD_ARK_GENOA_SHA256,
    "amd_ark_turin.pem": AMD_ARK_TURIN_SHA256,
    "amd_ask_milan.pem": AMD_ASK_MILAN_SHA256,
    "amd_ask_genoa.pem": AMD_ASK_GENOA_SHA256,
    "amd_ask_turin.pem": AMD_ASK_TURIN_SHA256,
    "nvidia_device_identity_ca.pem": NVIDIA_DEVICE_IDENTITY_CA_SHA256,
    "nvidia_rim_root_ca.pem": NVIDIA_RIM_ROOT_CA_SHA256,
}
AMD_PRODUCTS = ("Milan", "Genoa", "Turin")

# The simulated TEE's root: recognised only when the caller explicitly allows simulation,
# and only from the certificate carried in the evidence (it is never pinned).
SIMULATED_ROOT_COMMON_NAME = "tee-node SIMULATED Root CA \u2014 NOT A TEE"

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(at: datetime | None) -> datetime:
    if at is None:
        return utc_now()
    if at.tzinfo is None:
        # A naive time is taken as UTC rather than local time, so results do not depend on the host.
        return at.replace(tzinfo=timezone.utc)
    return at.astimezone(timezone.utc)


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """One or more PEM certificates (any text around them is ignored) or a single DER certificate."""
    try:
        if _PEM_BEGIN in data:
            return x509.load_pem_x509_certificates(data[data.index(_PEM_BEGIN):].rstrip(b"\x00"))
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise ChainInvalid(f"certificate data is malformed: {exc}") from None


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


@lru_cache(maxsize=None)
def pinned_root(filename: str) -> x509.Certificate:
    """A vendor root shipped in attestation/roots/, checked against its pinned fingerprint."""
    pin = _ROOT_FILES[filename]
    data = resources.files(__package__).joinpath("roots", filename).read_bytes()
    cert = x509.load_pem_x509_certificate(data)
    if fingerprint(cert) != pin:
        raise ChainInvalid(f"pinned root file {filename} does not match its pinned fingerprint")
    return cert


def intel_roots() -> tuple[x509.Certificate, ...]:
    return (pinned_root("intel_sgx_root_ca.pem"),)


def amd_roots() -> tuple[x509.Certificate, ...]:
    return tuple(amd_ark(product) for product in AMD_PRODUCTS)


def amd_ark(product: str) -> x509.Certificate:
    """The ARK of one chip family: a chain for a Genoa chip must end in ARK-Genoa, not any AMD root."""
    if product not in AMD_PRODUCTS:
        raise ChainInvalid(f"AMD product {product!r} has no pinned ARK (known: {', '.join(AMD_PRODUCTS)})")
    return pinned_root(f"amd_ark_{product.lower()}.pem")


def amd_ask(product: str) -> x509.Certificate:
    amd_ark(product)  # same product check
    return pinned_root(f"amd_ask_{product.lower()}.pem")


def nvidia_device_roots() -> tuple[x509.Certificate, ...]:
    return (pinned_root("nvidia_device_identity_ca.pem"),)


def nvidia_rim_roots() -> tuple[x509.Certificate, ...]:
    return (pinned_root("nvidia_rim_root_ca.pem"),)


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Signature and name linkage of one link (ECDSA, RSA PKCS#1 v1.5 and RSA-PSS)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        raise SignatureInvalid(
            f"certificate {common_name(cert)!r} is not signed by {common_name(issuer)!r}"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ChainInvalid(f"certificate {common_name(cert)!r} cannot be checked against {common_name(issuer)!r}: {exc}") from None


def check_validity(cert: x509.Certificate, at: datetime) -> None:
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise ChainInvalid(
            f"certificate {common_name(cert)!r} is not valid at {at.isoformat()} "
            f"(valid {cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})"
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def verify_chain(chain: Sequence[x509.Certificate], at: datetime) -> x509.Certificate:
    """Check a leaf-first chain that ends in a self-signed root; return that root.

    Whether the root is trusted is decided separately by check_root.
    """
    if len(chain) < 2:
        raise ChainInvalid(f"certificate chain has {len(chain)} certificate(s), need a leaf and a root")
    for cert, issuer in zip(chain, chain[1:]):
        if not _is_ca(issuer):
            raise ChainInvalid(f"certificate {common_name(issuer)!r} issues certificates but is not a CA")
        verify_issued_by(cert, issuer)
    root = chain[-1]
    verify_issued_by(root, root)
    for cert in chain:
        check_validity(cert, at)
    return root


def _same_root(a: x509.Certificate, b: x509.Certificate) -> bool:
    # Subject and key, not the exact DER: a vendor may re-issue its root with new dates but the same key.
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return a.subject == b.subject and a.public_key().public_bytes(*spki) == b.public_key().public_bytes(*spki)


def is_simulated_root(root: x509.Certificate) -> bool:
    return common_name(root) == SIMULATED_ROOT_COMMON_NAME and root.issuer == root.subject


def check_root(root: x509.Certificate, trusted: Sequence[x509.Certificate], *, simulated_ok: bool = True) -> bool:
    """True when the root is the simulated TEE's, False when pinned; raise when neither.

    Whether simulated evidence is acceptable is the policy's decision (appraise), not this one's.
    """
    if any(_same_root(root, t) for t in trusted):
        return False
    if simulated_ok and is_simulated_root(root):
        return True
    raise ChainInvalid(f"certificate chain ends in {common_name(root)!r}, which is not a pinned root")


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CollateralInvalid(f"CRL is malformed: {exc}") from None


def check_crl(
    crl: x509.CertificateRevocationList,
    issuer: x509.Certificate,
    certs: Sequence[x509.Certificate],
    at: datetime,
) -> None:
    """The CRL must be signed by the issuer, current at `at`, and list none of `certs`."""
    if crl.issuer != issuer.subject:
        raise CollateralInvalid(f"CRL is issued by {crl.issuer.rfc4514_string()!r}, expected {common_name(issuer)!r}")
    if not crl.is_signature_valid(issuer.public_key()):
        raise CollateralInvalid(f"CRL of {common_name(issuer)!r} has an invalid signature")
    next_update = crl.next_update_utc
    if at < crl.last_update_utc or (next_update is not None and at > next_update):
        raise CollateralInvalid(f"CRL of {common_name(issuer)!r} is not current at {at.isoformat()}")
    for cert in certs:
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise CertificateRevoked(f"certificate {common_name(cert)!r} is revoked by {common_name(issuer)!r}")
