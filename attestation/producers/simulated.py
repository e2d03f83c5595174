"""Simulated TDX for laptops and CI: real TDX v4 quote layout, software root of trust.

The quote goes through the same parser and verifier as hardware quotes. Its chain ends in a root
whose subject says it is not a TEE; verifiers accept it only with allow_simulated.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .. import tdx
from ..claims import TD_ATTRIBUTES_DEBUG
from ..errors import AttestationUnavailable
from ..evidence import FORMAT_TDX, CpuEvidence, check_report_data
from ..private_files import create_private, open_private
from ..trust import SIMULATED_ROOT_COMMON_NAME

SEED_FILE = "simulated-tee.seed"
SEED_SIZE = 32
SIMULATED_PCK_COMMON_NAME = "tee-node SIMULATED PCK \u2014 NOT A TEE"
# A QE vendor ID that no real quoting enclave uses, so a simulated quote is recognisable at a glance.
SIMULATED_QE_VENDOR_ID = b"tee-node-SIM-QE\x00"
SIMULATED_QE_MR_SIGNER = hashlib.sha256(b"tee-node simulated quoting enclave").digest()
SIMULATED_QE_PROD_ID = 2
QE_AUTH_DATA = bytes(range(32))
# Fixed validity so that certificates derived from one seed are the same across restarts.
NOT_BEFORE = datetime(2025, 1, 1, tzinfo=timezone.utc)
NOT_AFTER = datetime(2099, 12, 31, tzinfo=timezone.utc)


def _derive_key(seed: bytes, label: bytes) -> ec.EllipticCurvePrivateKey:
    # P-256 order minus one bounds the scalar; +1 keeps it non-zero.
    order_minus_one = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632550
    scalar = int.from_bytes(hashlib.sha512(b"tee-node/simulated/" + label + b"\x00" + seed).digest(), "big")
    return ec.derive_private_key(scalar % order_minus_one + 1, ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tee-node"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, serial: int, ca: bool) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def _sign_raw(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return point[1:]  # drop the 0x04 prefix: quotes carry x || y


def load_or_create_seed(state_dir: str | Path) -> bytes:
    """The simulated root of trust: one random seed, created once, readable by its owner only.

    Created atomically and never replaced (`create_private`), so a crash never leaves a short
    seed behind and two nodes starting at once read the same seed. Opened with O_NOFOLLOW and
    refused when others may read it: the seed signs simulated quotes.
    """
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state / SEED_FILE
    try:
        return _read_seed(path)
    except FileNotFoundError:
        pass
    seed = os.urandom(SEED_SIZE)
    if not create_private(path, seed):
        return _read_seed(path)  # another node created it meanwhile
    return seed


def _read_seed(path: Path) -> bytes:
    fd = open_private(
        path,
        what="simulated TEE seed file",
        error=AttestationUnavailable,
        alternative=" or set attestation.state_dir to another directory of yours",
    )
    try:
        seed = os.read(fd, SEED_SIZE + 1)
    finally:
        os.close(fd)
    if len(seed) != SEED_SIZE:
        raise AttestationUnavailable(
            f"simulated TEE seed file {path} is damaged ({len(seed)} bytes, expected {SEED_SIZE}): delete it and "
            "the node makes a new simulated root of trust at its next start"
        )
    return seed


@dataclass(frozen=True)
class SimulatedTdx:
    """Keys and certificates of the simulated TEE, all derived from one seed."""

    root_key: ec.EllipticCurvePrivateKey
    pck_key: ec.EllipticCurvePrivateKey
    attestation_key: ec.EllipticCurvePrivateKey
    root_certificate: x509.Certificate
    pck_certificate: x509.Certificate

    def __repr__(self) -> str:  # never print key material
        return "SimulatedTdx(<keys hidden>)"

    @classmethod
    def from_seed(cls, seed: bytes) -> "SimulatedTdx":
        if len(seed) < 16:
            raise ValueError("simulated TEE seed must be at least 16 bytes")
        root_key = _derive_key(seed, b"root")
        pck_key = _derive_key(seed, b"pck")
        serial = int.from_bytes(hashlib.sha256(b"serial" + seed).digest()[:8], "big") | 1
        root = _certificate(SIMULATED_ROOT_COMMON_NAME, root_key, SIMULATED_ROOT_COMMON_NAME, root_key, serial, True)
        pck = _certificate(SIMULATED_PCK_COMMON_NAME, pck_key, SIMULATED_ROOT_COMMON_NAME, root_key, serial + 1, False)
        return cls(root_key, pck_key, _derive_key(seed, b"attestation"), root, pck)

    @classmethod
    def from_state_dir(cls, state_dir: str | Path) -> "SimulatedTdx":
        return cls.from_seed(load_or_create_seed(state_dir))

    def quote(self, report_data: bytes, measurement: bytes, *, debug: bool = False) -> bytes:
        """A TDX v4 quote with MRTD = SHA-384(measurement) and the given 64-byte REPORTDATA;
        `debug` sets TD_ATTRIBUTES.DEBUG, as a debuggable TD would report."""
        if len(report_data) != tdx.REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be {tdx.REPORT_DATA_SIZE} bytes")
        header = bytearray(tdx.HEADER_SIZE)
        struct.pack_into("<HHI", header, tdx.HDR_VERSION, tdx.QUOTE_VERSION_4, tdx.ATTESTATION_KEY_ECDSA_P256, tdx.TEE_TYPE_TDX)
        header[tdx.HDR_QE_VENDOR_ID:tdx.HDR_QE_VENDOR_ID + tdx.QE_VENDOR_ID_SIZE] = SIMULATED_QE_VENDOR_ID
        body = bytearray(tdx.TD_REPORT10_SIZE)
        body[tdx.TD_MR_TD:tdx.TD_MR_TD + tdx.MEASUREMENT_SIZE] = hashlib.sha384(measurement).digest()
        if debug:
            body[tdx.TD_TD_ATTRIBUTES] |= TD_ATTRIBUTES_DEBUG
        body[tdx.TD_REPORT_DATA:tdx.TD_REPORT_DATA + tdx.REPORT_DATA_SIZE] = report_data
        signed = bytes(header + body)

        ak = _raw_point(self.attestation_key)
        qe_report = bytearray(tdx.QE_REPORT_SIZE)
        qe_report[tdx.QE_MR_SIGNER:tdx.QE_MR_SIGNER + tdx.SGX_HASH_SIZE] = SIMULATED_QE_MR_SIGNER
        struct.pack_into("<HH", qe_report, tdx.QE_ISV_PROD_ID, SIMULATED_QE_PROD_ID, 0)
        binding = hashlib.sha256(ak + QE_AUTH_DATA).digest()
        qe_report[tdx.QE_REPORT_DATA:tdx.QE_REPORT_DATA + 32] = binding
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.pck_certificate, self.root_certificate))
        qe_cert_data = (
            bytes(qe_report)
            + _sign_raw(self.pck_key, bytes(qe_report))
            + struct.pack("<H", len(QE_AUTH_DATA))
            + QE_AUTH_DATA
            + struct.pack("<HI", tdx.CERT_TYPE_PCK_CHAIN, len(chain))
            + chain
        )
        sig_data = (
            _sign_raw(self.attestation_key, signed)
            + ak
            + struct.pack("<HI", tdx.CERT_TYPE_QE_REPORT, len(qe_cert_data))
            + qe_cert_data
        )
        return signed + struct.pack("<I", len(sig_data)) + sig_data


class SimulatedProvider:
    """Simulated TDX; MRTD = SHA-384(measurement) where the node passes its code+config measurement."""

    tee = "simulated"

    def __init__(
        self, measurement: bytes, *, seed: bytes | None = None, state_dir: str | Path | None = None, debug: bool = False
    ):
        if (seed is None) == (state_dir is None):
            raise ValueError("give exactly one of seed or state_dir")
        self._tee = SimulatedTdx.from_seed(seed) if seed is not None else SimulatedTdx.from_state_dir(state_dir)
        self._measurement = bytes(measurement)
        self._debug = debug

    def get_evidence(self, report_data: bytes) -> CpuEvidence:
        check_report_data(report_data)
        quote = self._tee.quote(report_data, self._measurement, debug=self._debug)
        return CpuEvidence(tee=self.tee, format=FORMAT_TDX, quote=quote, certificates=None, simulated=True)
