"""A stand-in for Intel's PKI, made in the tests: TDX quotes and PCS collateral signed by a test root.

A root CA, the PCK Platform CA, a PCK certificate carrying the SGX extensions (FMSPC, PCE ID, PCE
SVN, CPU SVN and its 16 components), the TCB Signing certificate, both CRLs, a TDX v4 quote with
chosen TD report fields, and TCB info / QE identity bodies signed in PCS's exact response shape.
Our verifier takes the root as `trusted_roots`, dcap-qvl as `verify_with_root_ca`, so both judge
collateral that Intel never published (TDX module identities deciding the status, say).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from attestation import tdx
from attestation.appraisal import (
    INTEL_QE_VENDOR_ID,
    INTEL_TD_QE_ATTRIBUTES,
    INTEL_TD_QE_ISV_PROD_ID,
    INTEL_TD_QE_MR_SIGNER,
)
from attestation.claims import TD_ATTRIBUTES_SEPT_VE_DISABLE
from attestation.intel import OID_SGX_EXTENSIONS, IntelCollateral

NOT_BEFORE = datetime(2025, 1, 1, tzinfo=timezone.utc)
AT = datetime(2026, 3, 1, tzinfo=timezone.utc)  # inside every certificate, CRL and body made here
FMSPC = bytes.fromhex("00906ed50000")
PCE_ID = bytes(2)
MR_SIGNER_SEAM = hashlib.sha384(b"test TDX module signer").digest()
QE_AUTH_DATA = bytes(range(32))


# The SGX extension is DER that cryptography does not build; these few lines encode its shapes.
def _tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + value


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        while part > 0x7F:
            part >>= 7
            chunk.append(0x80 | (part & 0x7F))
        body += bytes(reversed(chunk))
    return _tlv(0x06, body)


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big"))


def _entry(dotted: str, value: bytes) -> bytes:
    return _tlv(0x30, _oid(dotted) + value)


def sgx_extension(*, fmspc: bytes, pce_svn: int, components: list[int]) -> bytes:
    base = OID_SGX_EXTENSIONS
    tcb = b"".join(_entry(f"{base}.2.{i + 1}", _int(svn)) for i, svn in enumerate(components))
    tcb += _entry(f"{base}.2.17", _int(pce_svn)) + _entry(f"{base}.2.18", _tlv(0x04, bytes(components)))
    return _tlv(0x30, b"".join((
        _entry(f"{base}.1", _tlv(0x04, bytes(16))),  # PPID
        _entry(f"{base}.2", _tlv(0x30, tcb)),
        _entry(f"{base}.3", _tlv(0x04, PCE_ID)),
        _entry(f"{base}.4", _tlv(0x04, fmspc)),
        _entry(f"{base}.5", _tlv(0x0A, b"\x00")),  # SGX type: standard
    )))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tee-node tests, not Intel")])


def _certificate(subject: str, key, issuer: x509.Name, issuer_key, serial: int, *, ca: bool, extension: bytes | None = None):
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_BEFORE + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if extension is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(OID_SGX_EXTENSIONS), extension), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _crl(issuer: x509.Certificate, key) -> bytes:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(NOT_BEFORE)
        .next_update(NOT_BEFORE + timedelta(days=3000))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.DER)


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def _raw_signature(key, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Platform:
    """What the test platform's PCK certificate and quoting enclave say."""

    pce_svn: int = 13
    components: list[int] = field(default_factory=lambda: [4, 4, 2, 2, 4, 1, 0, 5] + [0] * 8)
    qe_isv_svn: int = 8


class IntelTestPki:
    """One test root and everything under it; `quote` and `collateral` make evidence and PCS bodies."""

    def __init__(self, platform: Platform | None = None):
        self.platform = platform or Platform()
        self.root_key, self.pck_ca_key, self.pck_key, self.tcb_key = _key(), _key(), _key(), _key()
        self.attestation_key = _key()
        root_name = _name("Test SGX Root CA")
        self.root = _certificate("Test SGX Root CA", self.root_key, root_name, self.root_key, 1, ca=True)
        self.pck_ca = _certificate("Intel SGX PCK Platform CA", self.pck_ca_key, root_name, self.root_key, 2, ca=True)
        self.tcb_signer = _certificate("Intel SGX TCB Signing", self.tcb_key, root_name, self.root_key, 3, ca=False)
        extension = sgx_extension(fmspc=FMSPC, pce_svn=self.platform.pce_svn, components=self.platform.components)
        self.pck = _certificate("Intel SGX PCK Certificate", self.pck_key, self.pck_ca.subject, self.pck_ca_key, 4,
                                ca=False, extension=extension)
        self.root_crl = _crl(self.root, self.root_key)
        self.pck_crl = _crl(self.pck_ca, self.pck_ca_key)

    @property
    def root_der(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.DER)

    def quote(self, *, tee_tcb_svn: bytes, mr_signer_seam: bytes = MR_SIGNER_SEAM, seam_attributes: bytes = bytes(8),
              td_attributes: bytes = TD_ATTRIBUTES_SEPT_VE_DISABLE.to_bytes(8, "little"), report_data: bytes = bytes(64)) -> bytes:
        header = bytearray(tdx.HEADER_SIZE)
        struct.pack_into("<HHIHH", header, 0, tdx.QUOTE_VERSION_4, tdx.ATTESTATION_KEY_ECDSA_P256, tdx.TEE_TYPE_TDX,
                         self.platform.qe_isv_svn, self.platform.pce_svn)
        header[tdx.HDR_QE_VENDOR_ID:tdx.HDR_QE_VENDOR_ID + tdx.QE_VENDOR_ID_SIZE] = INTEL_QE_VENDOR_ID
        body = bytearray(tdx.TD_REPORT10_SIZE)
        for offset, value in ((tdx.TD_TEE_TCB_SVN, tee_tcb_svn), (tdx.TD_MR_SIGNER_SEAM, mr_signer_seam),
                              (tdx.TD_SEAM_ATTRIBUTES, seam_attributes), (tdx.TD_TD_ATTRIBUTES, td_attributes),
                              (tdx.TD_MR_TD, hashlib.sha384(b"test TD").digest()), (tdx.TD_REPORT_DATA, report_data)):
            body[offset:offset + len(value)] = value
        signed = bytes(header + body)
        ak = self.attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)[1:]
        qe = bytearray(tdx.QE_REPORT_SIZE)
        qe[tdx.QE_CPU_SVN:tdx.QE_CPU_SVN + tdx.CPU_SVN_SIZE] = bytes(self.platform.components)
        qe[tdx.QE_ATTRIBUTES:tdx.QE_ATTRIBUTES + tdx.QE_ATTRIBUTES_SIZE] = INTEL_TD_QE_ATTRIBUTES
        qe[tdx.QE_MR_SIGNER:tdx.QE_MR_SIGNER + tdx.SGX_HASH_SIZE] = INTEL_TD_QE_MR_SIGNER
        struct.pack_into("<HH", qe, tdx.QE_ISV_PROD_ID, INTEL_TD_QE_ISV_PROD_ID, self.platform.qe_isv_svn)
        qe[tdx.QE_REPORT_DATA:tdx.QE_REPORT_DATA + 32] = hashlib.sha256(ak + QE_AUTH_DATA).digest()
        chain = _pem(self.pck, self.pck_ca, self.root).encode()
        certification = (bytes(qe) + _raw_signature(self.pck_key, bytes(qe)) + struct.pack("<H", len(QE_AUTH_DATA))
                         + QE_AUTH_DATA + struct.pack("<HI", tdx.CERT_TYPE_PCK_CHAIN, len(chain)) + chain)
        signature = (_raw_signature(self.attestation_key, signed) + ak
                     + struct.pack("<HI", tdx.CERT_TYPE_QE_REPORT, len(certification)) + certification)
        return signed + struct.pack("<I", len(signature)) + signature

    def _signed(self, name: str, body: dict[str, Any]) -> tuple[str, bytes, bytes]:
        """(exact body text, r||s signature, the PCS response) for one signed body."""
        text = json.dumps(body, separators=(",", ":"))
        signature = _raw_signature(self.tcb_key, text.encode())
        return text, signature, f'{{"{name}":{text},"signature":"{signature.hex()}"}}'.encode()

    def collateral(self, tcb_info: dict[str, Any], qe_identity: dict[str, Any]) -> tuple[IntelCollateral, Any]:
        """The same collateral for both verifiers: ours (IntelCollateral) and dcap-qvl's."""
        tcb_text, tcb_sig, tcb_response = self._signed("tcbInfo", tcb_info)
        qe_text, qe_sig, qe_response = self._signed("enclaveIdentity", qe_identity)
        signing_chain = _pem(self.tcb_signer, self.root)
        ours = IntelCollateral(pck_crl=self.pck_crl, root_crl=self.root_crl, tcb_info=tcb_response,
                               qe_identity=qe_response, tcb_signing_chain=signing_chain.encode())
        theirs = dcap_qvl.QuoteCollateralV3(_pem(self.pck_ca, self.root), self.root_crl, self.pck_crl,
                                            signing_chain, tcb_text, tcb_sig, signing_chain, qe_text, qe_sig)
        return ours, theirs


    def write_directory(self, path: Path, tcb_info: dict[str, Any], qe_identity: dict[str, Any]) -> Path:
        """The collateral as files of a collateral directory (docs/policy.md names them)."""
        ours, _ = self.collateral(tcb_info, qe_identity)
        path.mkdir(parents=True, exist_ok=True)
        for name, data in (("tcbInfo.json", ours.tcb_info), ("qeIdentity.json", ours.qe_identity),
                           ("tcb_signing_chain.pem", ours.tcb_signing_chain), ("pckcrl", ours.pck_crl),
                           ("rootcrl.der", ours.root_crl)):
            (path / name).write_bytes(data)  # type: ignore[arg-type]
        return path


def tcb_level(sgx: list[int], pce_svn: int, tdx_svns: list[int], status: str, advisories: tuple[str, ...] = ()) -> dict[str, Any]:
    level: dict[str, Any] = {
        "tcb": {"sgxtcbcomponents": [{"svn": s} for s in sgx], "pcesvn": pce_svn, "tdxtcbcomponents": [{"svn": s} for s in tdx_svns]},
        "tcbDate": "2025-06-01T00:00:00Z",
        "tcbStatus": status,
    }
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def module_identity(ident: str, levels: list[tuple[int, str, tuple[str, ...]]], mrsigner: bytes = MR_SIGNER_SEAM) -> dict[str, Any]:
    return {
        "id": ident,
        "mrsigner": mrsigner.hex().upper(),
        "attributes": "0000000000000000",
        "attributesMask": "FFFFFFFFFFFFFFFF",
        "tcbLevels": [
            {"tcb": {"isvsvn": svn}, "tcbDate": "2025-06-01T00:00:00Z", "tcbStatus": status,
             **({"advisoryIDs": list(adv)} if adv else {})}
            for svn, status, adv in levels
        ],
    }


def tcb_info(levels: list[dict[str, Any]], identities: list[dict[str, Any]] | None = None, *, evaluation: int = 17) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "TDX", "version": 3, "issueDate": "2026-01-01T00:00:00Z", "nextUpdate": "2026-06-01T00:00:00Z",
        "fmspc": FMSPC.hex().upper(), "pceId": PCE_ID.hex().upper(), "tcbType": 0, "tcbEvaluationDataNumber": evaluation,
        "tdxModule": {"mrsigner": MR_SIGNER_SEAM.hex().upper(), "attributes": "0000000000000000",
                      "attributesMask": "FFFFFFFFFFFFFFFF"},
    }
    if identities is not None:
        body["tdxModuleIdentities"] = identities
    body["tcbLevels"] = levels
    return body


def qe_identity(*, evaluation: int = 17, min_isv_svn: int = 8) -> dict[str, Any]:
    return {
        "id": "TD_QE", "version": 2, "issueDate": "2026-01-01T00:00:00Z", "nextUpdate": "2026-06-01T00:00:00Z",
        "tcbEvaluationDataNumber": evaluation, "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
        "attributes": "11000000000000000000000000000000", "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": INTEL_TD_QE_MR_SIGNER.hex().upper(), "isvprodid": INTEL_TD_QE_ISV_PROD_ID,
        "tcbLevels": [{"tcb": {"isvsvn": min_isv_svn}, "tcbDate": "2025-06-01T00:00:00Z", "tcbStatus": "UpToDate"}],
    }
