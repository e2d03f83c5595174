"""The base64 (standard alphabet) and hex values of attestation JSON: the document's fields and
its workers entries. A value that does not decode, or has the wrong size, is DocumentInvalid
naming it (`what`, e.g. "document field 'nonce'")."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .errors import DocumentInvalid


def b64_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64_bytes(text: Any, what: str, size: int | None = None) -> bytes:
    try:
        if not isinstance(text, str):
            raise ValueError
        value = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DocumentInvalid(f"{what} is not standard base64") from None
    return _sized(value, what, size)


def hex_bytes(text: Any, what: str, size: int) -> bytes:
    try:
        if not isinstance(text, str):
            raise ValueError
        value = bytes.fromhex(text)
    except ValueError:
        raise DocumentInvalid(f"{what} is not hex") from None
    return _sized(value, what, size)


def _sized(value: bytes, what: str, size: int | None) -> bytes:
    if size is not None and len(value) != size:
        raise DocumentInvalid(f"{what} must be {size} bytes")
    return value
