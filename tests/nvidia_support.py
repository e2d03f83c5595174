"""Helpers of the NVIDIA GPU tests: NVIDIA's real samples, and a throwaway PKI (CA chains, OCSP
responses, RIMs re-signed with signxml) for what NVIDIA's samples cannot show."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree
from signxml import DigestAlgorithm, SignatureMethod, XMLSigner
from signxml.algorithms import CanonicalizationMethod

from attestation.nvidia.rim import XMLDSIG_NS
from attestation.nvidia.spdm import NONCE_SIZE, REQ_NONCE, SIGNATURE_SIZE, parse_report_text

NVIDIA = Path(__file__).resolve().parent / "data" / "nvidia"
RIMS = NVIDIA / "rims"
# Every certificate used is valid then: NVIDIA's RIM signing leaves expire in June 2025, the
# simulated TEE's chain starts in 2025.
AT = datetime(2025, 3, 1, tzinfo=timezone.utc)

TEST_REPORT = NVIDIA / "test_no_gpu_report.hex"
TEST_CHAIN = NVIDIA / "test_no_gpu_cert_chain.pem"
HOPPER_REPORT = NVIDIA / "hopper_report.hex"
HOPPER_CHAIN = NVIDIA / "hopper_cert_chain.pem"
DRIVER_RIM = RIMS / "Driver_RIM_test_no_gpu.swidtag"
VBIOS_RIM = RIMS / "1010_0200_882_96005E0001_test_no_gpu.swidtag"
PROD_VBIOS_RIM = RIMS / "1010_0200_882_96005E0001_PROD.swidtag"


def report_bytes(path: Path = TEST_REPORT) -> bytes:
    return parse_report_text(path.read_bytes())


def sample_nonce(path: Path = TEST_REPORT) -> bytes:
    """The nonce NVIDIA used when it made the sample (not a tee-node GPU nonce)."""
    return report_bytes(path)[REQ_NONCE:REQ_NONCE + NONCE_SIZE]


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


@dataclass
class Authority:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def pem(self) -> bytes:
        return self.cert.public_bytes(Encoding.PEM)


def issue(
    name: str,
    issuer: Authority | None = None,
    *,
    ca: bool = True,
    ocsp_signing: bool = False,
    not_before: datetime = AT - timedelta(days=365),
    not_after: datetime = AT + timedelta(days=365),
) -> Authority:
    """A P-384 certificate signed by `issuer` (self-signed without one)."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ocsp_signing:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA384())
    return Authority(cert, key)


def ocsp_response(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    signer: Authority,
    *,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    this_update: datetime = AT - timedelta(hours=1),
    next_update: datetime | None = AT + timedelta(days=1),
    include_signer: bool = False,
) -> bytes:
    revoked = status == ocsp.OCSPCertStatus.REVOKED
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=cert,
        issuer=issuer,
        algorithm=hashes.SHA384(),
        cert_status=status,
        this_update=this_update,
        next_update=next_update,
        revocation_time=this_update if revoked else None,
        revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
    )
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer.cert)
    if include_signer:
        builder = builder.certificates([signer.cert])
    return builder.sign(signer.key, hashes.SHA384()).public_bytes(Encoding.DER)


def resign_rim(path: Path, chain: list[Authority]) -> bytes:
    """NVIDIA's RIM with its signature replaced by one of `chain[0]` (leaf first, chain in KeyInfo)."""
    root = etree.fromstring(path.read_bytes())
    for signature in root.findall(f"{{{XMLDSIG_NS}}}Signature"):
        root.remove(signature)
    signer = XMLSigner(
        signature_algorithm=SignatureMethod.ECDSA_SHA384,
        digest_algorithm=DigestAlgorithm.SHA384,
        c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1,
    )
    signed = signer.sign(root, key=chain[0].key, cert=[a.pem().decode() for a in chain])
    return etree.tostring(signed)


def chain_pem(path: Path = TEST_CHAIN) -> bytes:
    return path.read_bytes()


def replace_certificate(pem: bytes, index: int, der: bytes) -> bytes:
    """The PEM chain with certificate `index` replaced by `der`."""
    certs = x509.load_pem_x509_certificates(pem)
    blocks = [c.public_bytes(Encoding.DER) for c in certs]
    blocks[index] = der
    return b"".join(
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(d) + b"-----END CERTIFICATE-----\n" for d in blocks
    )


DRIVER_RIM_ID = "NV_GPU_DRIVER_GH100_545.00"
VBIOS_RIM_ID = "NV_GPU_VBIOS_1010_0200_882_96005E0001"


def rim_dir(path: Path) -> Path:
    """A `gpu_rim_dir` holding the test report's RIM pair under their RIM service ids."""
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{DRIVER_RIM_ID}.swidtag").write_bytes(DRIVER_RIM.read_bytes())
    (path / f"{VBIOS_RIM_ID}.swidtag").write_bytes(VBIOS_RIM.read_bytes())
    return path


def throwaway_device_chain() -> list[Authority]:
    """Leaf first: an attestation key named like a GH100's, its CA, a root that is not NVIDIA's."""
    root = issue("Throwaway Device Root")
    ca = issue("Throwaway GH100 Identity", root)
    return [issue("GH100 A01 GSP FMC LF", ca, ca=False), ca, root]


def resign_report(report: bytes, nonce: bytes, leaf: Authority) -> bytes:
    """The report with its requester nonce replaced and signed again by `leaf` (measurements unchanged)."""
    signed = report[:REQ_NONCE] + nonce + report[REQ_NONCE + NONCE_SIZE:-SIGNATURE_SIZE]
    r, s = decode_dss_signature(leaf.key.sign(signed, ec.ECDSA(hashes.SHA384())))
    half = SIGNATURE_SIZE // 2
    return signed + r.to_bytes(half, "big") + s.to_bytes(half, "big")


@dataclass
class _Blob:
    attestationReport: bytes = b""
    attestationReportSize: int = 0
    attestationCertChain: bytes = b""
    attestationCertChainSize: int = 0


@dataclass
class _CcState:
    environment: int
    ccFeature: int
    devToolsMode: int


class SampleNvml:
    """A fake NVML with one GPU in CC mode that answers with NVIDIA's real test report and chain.

    The sample was signed for NVIDIA's own nonce, so it answers every requested nonce with that one,
    as a replaying host would. With `device_chain` (throwaway_device_chain()), it re-signs the sample
    for the requested nonce with that chain's leaf, which no NVIDIA root vouches for.
    """

    def __init__(self, *, cc_feature: int = 1, devtools: int = 0, ready: int = 1, device_chain: list[Authority] | None = None):
        self.state = _CcState(environment=2, ccFeature=cc_feature, devToolsMode=devtools)
        self.ready = ready
        self.device_chain = device_chain
        self.nonces: list[bytes] = []

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlSystemGetConfComputeState(self) -> _CcState:
        return self.state

    def nvmlSystemGetConfComputeGpusReadyState(self) -> int:
        return self.ready

    def nvmlDeviceGetConfComputeGpuAttestationReport(self, handle: int, nonce: bytes) -> _Blob:
        self.nonces.append(bytes(nonce))
        report = report_bytes()
        if self.device_chain is not None:
            report = resign_report(report, bytes(nonce), self.device_chain[0])
        return _Blob(attestationReport=report + bytes(64), attestationReportSize=len(report))

    def nvmlDeviceGetConfComputeGpuCertificate(self, handle: int) -> _Blob:
        if self.device_chain is None:
            chain = TEST_CHAIN.read_bytes()
        else:
            chain = b"".join(a.pem() for a in self.device_chain)
        return _Blob(attestationCertChain=chain + bytes(16), attestationCertChainSize=len(chain))
