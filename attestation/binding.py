"""The report_data and GPU nonce commitments of PROTOCOL.md part B."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

REPORT_DATA_DOMAIN = b"tee-node/report-data/v1"
GPU_NONCE_DOMAIN = b"tee-node/gpu-nonce/v1"
NONCE_SIZE = 32
KEY_SIZE = 32
DIGEST_SIZE = 32
REPORT_DATA_SIZE = 64
MAX_KEY_EPOCH = 2**64 - 1


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _check(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")


def report_data(
    *,
    nonce: bytes,
    dh_public_key: bytes,
    signing_public_key: bytes,
    key_epoch: int,
    config_digest: bytes,
    gpu_evidence: list[dict[str, Any]],
) -> bytes:
    _check("nonce", nonce, NONCE_SIZE)
    _check("dh_public_key", dh_public_key, KEY_SIZE)
    _check("signing_public_key", signing_public_key, KEY_SIZE)
    _check("config_digest", config_digest, DIGEST_SIZE)
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
    ).digest()


def gpu_nonce(*, nonce: bytes, dh_public_key: bytes, signing_public_key: bytes) -> bytes:
    _check("nonce", nonce, NONCE_SIZE)
    _check("dh_public_key", dh_public_key, KEY_SIZE)
    _check("signing_public_key", signing_public_key, KEY_SIZE)
    return hashlib.sha256(GPU_NONCE_DOMAIN + b"\x00" + nonce + dh_public_key + signing_public_key).digest()
