"""The report_data and GPU nonce commitments of PROTOCOL.md (report_data v2, part C)."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from node.crypto import KEM_PUBLIC_KEY_SIZE
from node.wire import canonical_json

REPORT_DATA_DOMAIN = b"tee-node/report-data/v2"
GPU_NONCE_DOMAIN = b"tee-node/gpu-nonce/v1"
NONCE_SIZE = 32
KEY_SIZE = 32
DIGEST_SIZE = 32
REPORT_DATA_SIZE = 64
MAX_KEY_EPOCH = 2**64 - 1
NO_TLS_CERTIFICATE = bytes(DIGEST_SIZE)

__all__ = ["canonical_json", "config_digest", "gpu_nonce", "report_data"]


def _check(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")


def config_digest(measured_config: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical JSON of the measured part of the config."""
    return hashlib.sha256(canonical_json(measured_config)).digest()


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
) -> bytes:
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
    return hashlib.sha512(
        REPORT_DATA_DOMAIN
        + b"\x00"
        + nonce
        + dh_public_key
        + signing_public_key
        + struct.pack("<Q", key_epoch)
        + config_digest
        + hashlib.sha256(canonical_json(gpu_evidence)).digest()
        + hashlib.sha256(kem_public_key or b"").digest()
        + (tls_cert_sha256 or NO_TLS_CERTIFICATE)
    ).digest()


def gpu_nonce(*, nonce: bytes, dh_public_key: bytes, signing_public_key: bytes) -> bytes:
    _check("nonce", nonce, NONCE_SIZE)
    _check("dh_public_key", dh_public_key, KEY_SIZE)
    _check("signing_public_key", signing_public_key, KEY_SIZE)
    return hashlib.sha256(GPU_NONCE_DOMAIN + b"\x00" + nonce + dh_public_key + signing_public_key).digest()
