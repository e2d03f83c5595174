"""A Sigstore-shaped instance made in the tests, for the release tests and the CLI tests.

`SigstoreInstance()` makes a Fulcio-like CA, a CT log key, a Rekor-like log key and the trusted
root JSON naming them; `instance.sign(statement, identity=..., issuer=...)` issues a short-lived
signing certificate for that OIDC identity (with an SCT from the CT log embedded, as Fulcio does),
signs the statement as a DSSE envelope, logs a `dsse` 0.0.1 entry in a Merkle tree with other
entries, and returns the Sigstore bundle (v0.3 JSON) with its inclusion proof, signed checkpoint
and signed entry timestamp. sigstore-python verifies it offline under `instance.trusted_root`.

This is the signing side only (what Fulcio, the CT log and Rekor do); every check is
sigstore-python's. The Merkle tree follows RFC 6962 (leaf 0x00, node 0x01 prefixes, largest
power-of-two split), the SCT RFC 6962 section 3.2 (precertificate entry), the checkpoint
the transparency-dev signed note format as sigstore-python reads it (key hint: the first four
bytes of the log's key ID).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
TRUSTED_ROOT_MEDIA_TYPE = "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
# Fulcio's certificate extensions (github.com/sigstore/fulcio docs/oid-info.md).
OIDC_ISSUER_V1 = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")  # raw bytes
OIDC_ISSUER_V2 = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")  # DER UTF8String
SCT_LIST = ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def key_id(key: ec.EllipticCurvePublicKey) -> bytes:
    """RFC 6962 log ID: SHA-256 of the key's SubjectPublicKeyInfo."""
    return hashlib.sha256(spki(key)).digest()


def _der_utf8(text: str) -> bytes:
    raw = text.encode()
    assert len(raw) < 128
    return bytes([0x0C, len(raw)]) + raw


def _der_octet_string(data: bytes) -> bytes:
    if len(data) < 128:
        return bytes([0x04, len(data)]) + data
    size = len(data).to_bytes((len(data).bit_length() + 7) // 8, "big")
    return bytes([0x04, 0x80 | len(size)]) + size + data


def _u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def _leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash of leaf hashes."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return _node_hash(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def inclusion_path(index: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 audit path of leaf `index`, bottom up."""
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if index < k:
        return inclusion_path(index, leaves[:k]) + [merkle_root(leaves[k:])]
    return inclusion_path(index - k, leaves[k:]) + [merkle_root(leaves[:k])]


@dataclass
class Issued:
    """A bundle with the pieces a test may want to tamper with."""

    bundle: dict[str, Any]
    certificate: x509.Certificate

    def json(self) -> str:
        return json.dumps(self.bundle)

    @property
    def entry(self) -> dict[str, Any]:
        return self.bundle["verificationMaterial"]["tlogEntries"][0]


class SigstoreInstance:
    """A CA (Fulcio), a CT log and a transparency log (Rekor), each with its own key."""

    def __init__(self, name: str = "test-sigstore", *, start: datetime | None = None) -> None:
        self.name = name
        self.start = start or datetime.now(timezone.utc) - timedelta(days=1)
        self.ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name), x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.start)
            .not_valid_after(self.start + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA384())
        )
        self.ct_key = ec.generate_private_key(ec.SECP256R1())
        self.log_key = ec.generate_private_key(ec.SECP256R1())
        self.log_name = f"rekor.{name}.test"
        self.log_origin = f"{self.log_name} - 1"  # Rekor's origin line: the log's name and tree ID
        # Entries logged before ours, so that the inclusion proof has a path to check.
        self.entries: list[bytes] = [os.urandom(64) for _ in range(5)]

    # --- the trusted root a client pins -------------------------------------------------

    @property
    def trusted_root(self) -> dict[str, Any]:
        start = self.start.strftime("%Y-%m-%dT%H:%M:%SZ")

        def log(key: ec.EllipticCurvePrivateKey, url: str) -> dict[str, Any]:
            return {
                "baseUrl": url,
                "hashAlgorithm": "SHA2_256",
                "publicKey": {"rawBytes": b64(spki(key.public_key())), "keyDetails": "PKIX_ECDSA_P256_SHA_256", "validFor": {"start": start}},
                "logId": {"keyId": b64(key_id(key.public_key()))},
            }

        return {
            "mediaType": TRUSTED_ROOT_MEDIA_TYPE,
            "tlogs": [log(self.log_key, f"https://rekor.{self.name}.test")],
            "certificateAuthorities": [
                {
                    "subject": {"organization": self.name, "commonName": f"{self.name} CA"},
                    "uri": f"https://fulcio.{self.name}.test",
                    "certChain": {"certificates": [{"rawBytes": b64(self.ca.public_bytes(Encoding.DER))}]},
                    "validFor": {"start": start},
                }
            ],
            "ctlogs": [log(self.ct_key, f"https://ctfe.{self.name}.test")],
            "timestampAuthorities": [],
        }

    def trusted_root_json(self) -> str:
        return json.dumps(self.trusted_root, indent=2)

    # --- Fulcio: a short-lived certificate for an OIDC identity, with an SCT ------------

    def _leaf_builder(self, public_key, identity: str, issuer: str, at: datetime, serial: int) -> x509.CertificateBuilder:
        san = x509.RFC822Name(identity) if "@" in identity and "://" not in identity else x509.UniformResourceIdentifier(identity)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(at - timedelta(seconds=30))
            .not_valid_after(at + timedelta(minutes=10))
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
            .add_extension(x509.UnrecognizedExtension(OIDC_ISSUER_V1, issuer.encode()), critical=False)
            .add_extension(x509.UnrecognizedExtension(OIDC_ISSUER_V2, _der_utf8(issuer)), critical=False)
        )

    def sct(self, tbs_precertificate: bytes, at: datetime, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
        """One RFC 6962 SCT (TLS encoding) over a precertificate entry."""
        key = key or self.ct_key
        timestamp = int(at.timestamp() * 1000)
        issuer_key_hash = key_id(self.ca_key.public_key())
        signed = (
            struct.pack("!BBQH", 0, 0, timestamp, 1)  # v1, certificate_timestamp, time, precert_entry
            + issuer_key_hash
            + _u24(len(tbs_precertificate))
            + tbs_precertificate
            + struct.pack("!H", 0)  # no extensions
        )
        signature = key.sign(signed, ec.ECDSA(hashes.SHA256()))
        return (
            struct.pack("!B", 0)
            + key_id(self.ct_key.public_key())
            + struct.pack("!QH", timestamp, 0)
            + struct.pack("!BBH", 4, 3, len(signature))  # sha256, ecdsa
            + signature
        )

    def issue(self, public_key, identity: str, issuer: str, at: datetime, *, sct_key=None) -> x509.Certificate:
        serial = x509.random_serial_number()
        builder = self._leaf_builder(public_key, identity, issuer, at, serial)
        # The SCT signs the certificate without its SCT list: the TBS of the same certificate
        # built without that extension (the precertificate's TBS, as cryptography strips it).
        precert_tbs = builder.sign(self.ca_key, hashes.SHA384()).tbs_certificate_bytes
        sct = self.sct(precert_tbs, at, sct_key)
        sct_list = struct.pack("!H", len(sct) + 2) + struct.pack("!H", len(sct)) + sct
        leaf = builder.add_extension(x509.UnrecognizedExtension(SCT_LIST, _der_octet_string(sct_list)), critical=False).sign(
            self.ca_key, hashes.SHA384()
        )
        assert leaf.tbs_precertificate_bytes == precert_tbs
        return leaf

    # --- signing and Rekor --------------------------------------------------------------

    def sign(
        self,
        statement: dict[str, Any] | bytes,
        *,
        identity: str = "https://github.com/example/tee-node/.github/workflows/release.yml@refs/tags/v1.4.0",
        issuer: str = GITHUB_ISSUER,
        at: datetime | None = None,
        sct_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Issued:
        """The bundle of `statement` signed by `identity` (a DSSE envelope logged as a dsse entry);
        `sct_key` signs the SCT instead of the CT log's key."""
        at = (at or datetime.now(timezone.utc)).replace(microsecond=0)
        payload = statement if isinstance(statement, bytes) else json.dumps(statement, separators=(",", ":")).encode()
        signing_key = ec.generate_private_key(ec.SECP256R1())
        cert = self.issue(signing_key.public_key(), identity, issuer, at, sct_key=sct_key)
        pae = b"DSSEv1 %d %s %d %s" % (len(IN_TOTO_PAYLOAD_TYPE), IN_TOTO_PAYLOAD_TYPE.encode(), len(payload), payload)
        signature = signing_key.sign(pae, ec.ECDSA(hashes.SHA256()))
        envelope = {"payload": b64(payload), "payloadType": IN_TOTO_PAYLOAD_TYPE, "signatures": [{"sig": b64(signature)}]}
        body = json.dumps(
            {
                "apiVersion": "0.0.1",
                "kind": "dsse",
                "spec": {
                    "envelopeHash": {"algorithm": "sha256", "value": hashlib.sha256(json.dumps(envelope).encode()).hexdigest()},
                    "payloadHash": {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()},
                    "signatures": [{"signature": b64(signature), "verifier": b64(cert.public_bytes(Encoding.PEM))}],
                },
            },
            separators=(",", ":"),
        ).encode()
        return Issued(self.log(body, at, envelope, cert), cert)

    def log(self, body: bytes, at: datetime, envelope: dict[str, Any], cert: x509.Certificate) -> dict[str, Any]:
        """Append `body` to the log; the bundle with its inclusion proof, checkpoint and SET."""
        self.entries.append(body)
        index = len(self.entries) - 1
        leaves = [_leaf_hash(e) for e in self.entries]
        root = merkle_root(leaves)
        log_id = key_id(self.log_key.public_key())
        integrated = int(at.timestamp())
        set_payload = rfc8785.dumps({"body": b64(body), "integratedTime": integrated, "logID": log_id.hex(), "logIndex": index})
        entry = {
            "logIndex": str(index),
            "logId": {"keyId": b64(log_id)},
            "kindVersion": {"kind": "dsse", "version": "0.0.1"},
            "integratedTime": str(integrated),
            "inclusionPromise": {"signedEntryTimestamp": b64(self.log_key.sign(set_payload, ec.ECDSA(hashes.SHA256())))},
            "inclusionProof": {
                "logIndex": str(index),
                "rootHash": b64(root),
                "treeSize": str(len(leaves)),
                "hashes": [b64(h) for h in inclusion_path(index, leaves)],
                "checkpoint": {"envelope": self.checkpoint(len(leaves), root)},
            },
            "canonicalizedBody": b64(body),
        }
        return {
            "mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": {"certificate": {"rawBytes": b64(cert.public_bytes(Encoding.DER))}, "tlogEntries": [entry]},
            "dsseEnvelope": envelope,
        }

    def checkpoint(self, size: int, root: bytes, key: ec.EllipticCurvePrivateKey | None = None) -> str:
        """A signed note over the tree head, as sigstore-python reads it."""
        note = f"{self.log_origin}\n{size}\n{b64(root)}\n"
        signature = (key or self.log_key).sign(note.encode(), ec.ECDSA(hashes.SHA256()))
        hint = key_id(self.log_key.public_key())[:4]
        return f"{note}\n\u2014 {self.log_name} {b64(hint + signature)}\n"
