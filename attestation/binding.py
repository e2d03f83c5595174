"""The report_data and GPU nonce commitments (docs/protocol.md, "Verify the attestation").

report_data v3 commits to everything report_data v2 did, then to the node's other public keys
(`public_keys`: OHTTP key configuration, Privacy Pass token key) and to the evidence of the other
VMs of a multi-VM deployment (`workers`). v2 stays here for clients that verify v2 documents.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from .canonical import canonical_json

REPORT_DATA_DOMAIN_V2 = b"tee-node/report-data/v2"
REPORT_DATA_DOMAIN_V3 = b"tee-node/report-data/v3"
GPU_NONCE_DOMAIN = b"tee-node/gpu-nonce/v1"
NONCE_SIZE = 32
KEY_SIZE = 32
DIGEST_SIZE = 32
REPORT_DATA_SIZE = 64
# FIPS 203 ML-KEM-768 encapsulation key: the size the document's kem_public_key must have.
KEM_PUBLIC_KEY_SIZE = 1184
MAX_KEY_EPOCH = 2**64 - 1
NO_TLS_CERTIFICATE = bytes(DIGEST_SIZE)
# The names of v3's public_keys object, each a base64 string or null.
PUBLIC_KEY_NAMES = ("ohttp", "privacy_pass")

__all__ = ["canonical_json", "config_digest", "empty_public_keys", "gpu_nonce", "report_data"]


def _check(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")


def config_digest(measured_config: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical JSON of the measured part of the config."""
    return hashlib.sha256(canonical_json(measured_config)).digest()


def empty_public_keys() -> dict[str, str | None]:
    """v3's `public_keys` before any of them is served."""
    return dict.fromkeys(PUBLIC_KEY_NAMES)


def report_data(
    *,
    nonce: bytes,
    dh_public_key: bytes,
    signing_public_key: bytes,
    key_epoch: int,
    config_digest: bytes,
    gpu_evidence: list[dict[str, Any]],
    kem_public_key: bytes | None,
    tls_cert_sha256: bytes | None,
    version: int = 3,
    public_keys: dict[str, Any] | None = None,
    workers: list[Any] | None = None,
) -> bytes:
    """report_data of a document of `version` 3 (the default) or 2 (no public_keys, no workers)."""
    _check("nonce", nonce, NONCE_SIZE)
    _check("dh_public_key", dh_public_key, KEY_SIZE)
    _check("signing_public_key", signing_public_key, KEY_SIZE)
    _check("config_digest", config_digest, DIGEST_SIZE)
    if kem_public_key is not None:
        _check("kem_public_key", kem_public_key, KEM_PUBLIC_KEY_SIZE)
    if tls_cert_sha256 is not None:
        _check("tls_cert_sha256", tls_cert_sha256, DIGEST_SIZE)
    if not isinstance(key_epoch, int) or isinstance(key_epoch, bool) or not 0 <= key_epoch <= MAX_KEY_EPOCH:
        raise ValueError("key_epoch must be an integer in [0, 2**64)")
    v2_inputs = (
        nonce
        + dh_public_key
        + signing_public_key
        + struct.pack("<Q", key_epoch)
        + config_digest
        + hashlib.sha256(canonical_json(gpu_evidence)).digest()
        + hashlib.sha256(kem_public_key or b"").digest()
        + (tls_cert_sha256 or NO_TLS_CERTIFICATE)
    )
    if version == 2:
        if public_keys is not None or workers is not None:
            raise ValueError("report_data v2 binds no public_keys and no workers")
        return hashlib.sha512(REPORT_DATA_DOMAIN_V2 + b"\x00" + v2_inputs).digest()
    if version != 3:
        raise ValueError("report_data version must be 2 or 3")
    if not isinstance(public_keys, dict):
        raise ValueError("report_data v3 needs public_keys (an object)")
    if workers is not None and not isinstance(workers, list):
        raise ValueError("workers must be a list or None")
    return hashlib.sha512(
        REPORT_DATA_DOMAIN_V3
        + b"\x00"
        + v2_inputs
        + hashlib.sha256(canonical_json(public_keys)).digest()
        + hashlib.sha256(canonical_json(workers) if workers is not None else b"").digest()
    ).digest()


def gpu_nonce(*, nonce: bytes, dh_public_key: bytes, signing_public_key: bytes) -> bytes:
    _check("nonce", nonce, NONCE_SIZE)
    _check("dh_public_key", dh_public_key, KEY_SIZE)
    _check("signing_public_key", signing_public_key, KEY_SIZE)
    return hashlib.sha256(GPU_NONCE_DOMAIN + b"\x00" + nonce + dh_public_key + signing_public_key).digest()
