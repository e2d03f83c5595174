"""Attested TLS (docs/protocol.md): a key pair made at start, held in memory only, in a
self-signed certificate whose SHA-256 the attestation document binds (`tls_cert_sha256`).

Clients trust the certificate because the TEE's quote commits to its hash, not because of a CA:
they fetch the attestation over an unverified connection, check that the certificate that
connection presented is the attested one, then require it on every later connection.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
import ssl
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

COMMON_NAME = "tee-node attested TLS"
# Validity means little here: clients pin the attested hash, and the key dies with the process.
VALIDITY = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(days=1)


@dataclass(frozen=True)
class TlsIdentity:
    """The node's TLS certificate (DER), its SHA-256 and a server context holding its key."""

    certificate_der: bytes
    sha256: bytes
    context: ssl.SSLContext = field(repr=False)

    @property
    def certificate_pem(self) -> str:
        return ssl.DER_cert_to_PEM_cert(self.certificate_der)

    @classmethod
    def generate(cls, names: list[str]) -> TlsIdentity:
        """A fresh P-256 key and a self-signed certificate naming `names` (DNS names or IPs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _self_signed(key, names)
        der = certificate.public_bytes(serialization.Encoding.DER)
        return cls(der, hashlib.sha256(der).digest(), _server_context(key, certificate))


def _self_signed(key: ec.EllipticCurvePrivateKey, names: list[str]) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(key, hashes.SHA256())


def _server_context(key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> ssl.SSLContext:
    """A TLS 1.3 server context holding the key.

    `ssl` loads keys from files only. The key goes through an anonymous memory file (memfd, no
    path on any file system, gone when closed), encrypted under a one-time password that never
    leaves this function: nothing readable is ever written out.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    password = secrets.token_bytes(32)
    pem = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    fd = os.memfd_create("tee-node-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}", password=password)
    finally:
        os.close(fd)
    return context
