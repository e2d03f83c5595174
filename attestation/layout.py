"""Reading fixed binary layouts: one bounds check for every parser."""

from __future__ import annotations

from .errors import ParseError


def need(data: bytes, offset: int, size: int, what: str, container: str) -> bytes:
    """`size` bytes at `offset`, or a ParseError naming the field and the structure it belongs to."""
    if offset < 0 or size < 0 or offset + size > len(data):
        raise ParseError(f"{container} truncated: {what} needs {size} bytes at offset {offset}, only {len(data)} present")
    return data[offset:offset + size]
