"""Just enough DER reading for the vendor extensions of PCK and VCEK certificates."""

from __future__ import annotations

from typing import Iterator

from .errors import ParseError

TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_IA5_STRING = 0x16
TAG_OID = 0x06
TAG_ENUMERATED = 0x0A
TAG_SEQUENCE = 0x30


def read_tlv(data: bytes, offset: int = 0) -> tuple[int, bytes, int]:
    """Return (tag, value, offset after the element)."""
    if offset + 2 > len(data):
        raise ParseError("DER element truncated")
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or offset + count > len(data):
            raise ParseError("DER length is malformed")
        length = int.from_bytes(data[offset:offset + count], "big")
        offset += count
    if offset + length > len(data):
        raise ParseError("DER element truncated")
    return tag, data[offset:offset + length], offset + length


def iter_elements(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset < len(data):
        tag, value, offset = read_tlv(data, offset)
        yield tag, value


def decode_oid(value: bytes) -> str:
    if not value:
        raise ParseError("empty DER OID")
    first = value[0]
    parts = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    acc = 0
    for byte in value[1:]:
        acc = (acc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(acc)
            acc = 0
    return ".".join(map(str, parts))


def decode_integer(data: bytes) -> int:
    """A complete DER INTEGER element (tag included)."""
    tag, value, _ = read_tlv(data)
    if tag != TAG_INTEGER:
        raise ParseError(f"expected a DER INTEGER, found tag 0x{tag:02x}")
    return int.from_bytes(value, "big", signed=True)
