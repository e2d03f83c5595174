"""NVIDIA GPU attestation reports: the SPDM 1.1 GET_MEASUREMENTS request and its signed MEASUREMENTS
response, as NVML returns them (request ‖ response), with NVIDIA's opaque-data fields.

Layouts from DMTF DSP0274 (SPDM 1.1) and NVIDIA's opaque-data TLV types; all integers little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from ..errors import ParseError
from ..layout import need

SPDM_VERSION_1_1 = 0x11
CODE_GET_MEASUREMENTS = 0xE0
CODE_MEASUREMENTS = 0x60
NONCE_SIZE = 32

# --- GET_MEASUREMENTS request (37 bytes) ---
REQ_VERSION = 0
REQ_CODE = 1
REQ_PARAM1 = 2  # bit 0: a signature is requested
REQ_PARAM2 = 3  # measurement operation: 0xFF = every block
REQ_NONCE = 4
REQ_SLOT_ID = 36
REQUEST_SIZE = 37
PARAM1_SIGNATURE_REQUESTED = 0x01
ALL_MEASUREMENTS = 0xFF

# --- MEASUREMENTS response ---
RESP_VERSION = 0
RESP_CODE = 1
RESP_PARAM1 = 2
RESP_PARAM2 = 3  # slot id
RESP_NUMBER_OF_BLOCKS = 4
RESP_RECORD_LENGTH = 5  # u24
RECORD_LENGTH_SIZE = 3
RESP_RECORD = 8
# After the record: nonce (32), opaque length (u16), opaque data, signature.
OPAQUE_LENGTH_SIZE = 2
SIGNATURE_SIZE = 96  # ECDSA P-384: r ‖ s, big-endian

# --- Measurement block (in the record) ---
BLOCK_INDEX = 0
BLOCK_SPECIFICATION = 1
BLOCK_SIZE = 2  # u16
BLOCK_MEASUREMENT = 4
BLOCK_HEADER_SIZE = 4
MEASUREMENT_SPEC_DMTF = 0x01
# DMTF measurement inside a block.
DMTF_VALUE_TYPE = 0
DMTF_VALUE_SIZE = 1  # u16
DMTF_VALUE = 3
DMTF_HEADER_SIZE = 3

# --- Opaque data: a run of TLVs, type u16, size u16, value ---
TLV_TYPE = 0
TLV_SIZE = 2
TLV_VALUE = 4
TLV_HEADER_SIZE = 4
VBIOS_VERSION_SIZE = 8
MSR_COUNT_SIZE = 4


class OpaqueField(IntEnum):
    """NVIDIA's opaque-data field types (nvtrust's OPAQUE_FIELD_ID_*)."""

    CERT_ISSUER_NAME = 1
    CERT_AUTHORITY_KEY_IDENTIFIER = 2
    DRIVER_VERSION = 3
    GPU_INFO = 4
    SKU = 5
    VBIOS_VERSION = 6
    MANUFACTURER_ID = 7
    TAMPER_DETECTION = 8
    SMC = 9
    VPR = 10
    NVDEC0_STATUS = 11
    MSRSCNT = 12
    CPRINFO = 13
    BOARD_ID = 14
    CHIP_SKU = 15
    CHIP_SKU_MOD = 16
    PROJECT = 17
    PROJECT_SKU = 18
    PROJECT_SKU_MOD = 19
    FWID = 20
    PROTECTED_PCIE_STATUS = 21
    SWITCH_PDI = 22
    FLOORSWEPT_PORTS = 23
    POSITION_ID = 24
    LOCK_SWITCH_STATUS = 25
    GPU_LINK_CONN = 32
    SYS_ENABLE_STATUS = 33
    OPAQUE_DATA_VERSION = 34
    CHIP_INFO = 35


NVDEC0_DISABLED = 0x55


def _need(data: bytes, offset: int, size: int, what: str) -> bytes:
    return need(data, offset, size, what, "GPU attestation report")


def _text(value: bytes) -> str:
    """NVIDIA's strings are NUL-terminated inside a fixed field."""
    return value.split(b"\x00", 1)[0].decode("ascii", errors="replace")


def format_vbios_version(value: bytes) -> str:
    """NVIDIA's spelling, e.g. bytes 00 5E 00 96 01 .. -> '96.00.5E.00.01' (the low u32, then byte 4)."""
    if len(value) != VBIOS_VERSION_SIZE:
        raise ParseError(f"VBIOS version field is {len(value)} bytes, expected {VBIOS_VERSION_SIZE}")
    (low,) = struct.unpack_from("<I", value, 0)
    digits = f"{low:08X}{value[4]:02X}"
    return ".".join(digits[i:i + 2] for i in range(0, len(digits), 2))


@dataclass(frozen=True)
class SpdmRequest:
    version: int
    param1: int
    param2: int
    nonce: bytes
    slot_id: int

    @classmethod
    def from_bytes(cls, data: bytes) -> "SpdmRequest":
        raw = _need(data, 0, REQUEST_SIZE, "GET_MEASUREMENTS request")
        if raw[REQ_VERSION] != SPDM_VERSION_1_1:
            raise ParseError(f"SPDM request version 0x{raw[REQ_VERSION]:02x} is not 1.1 (0x11)")
        if raw[REQ_CODE] != CODE_GET_MEASUREMENTS:
            raise ParseError(f"SPDM request code 0x{raw[REQ_CODE]:02x} is not GET_MEASUREMENTS (0xe0)")
        if not raw[REQ_PARAM1] & PARAM1_SIGNATURE_REQUESTED:
            raise ParseError("the GET_MEASUREMENTS request did not ask for a signature")
        return cls(
            version=raw[REQ_VERSION],
            param1=raw[REQ_PARAM1],
            param2=raw[REQ_PARAM2],
            nonce=raw[REQ_NONCE:REQ_NONCE + NONCE_SIZE],
            slot_id=raw[REQ_SLOT_ID],
        )


@dataclass(frozen=True)
class MeasurementBlock:
    index: int  # SPDM block index, from 1
    value_type: int
    value: bytes

    @classmethod
    def from_bytes(cls, data: bytes, offset: int) -> tuple["MeasurementBlock", int]:
        """The block at `offset` of a measurement record, and the offset after it."""
        header = _need(data, offset, BLOCK_HEADER_SIZE, "measurement block header")
        if header[BLOCK_SPECIFICATION] != MEASUREMENT_SPEC_DMTF:
            raise ParseError(f"measurement block {header[BLOCK_INDEX]} does not follow the DMTF specification")
        (size,) = struct.unpack_from("<H", header, BLOCK_SIZE)
        measurement = _need(data, offset + BLOCK_MEASUREMENT, size, f"measurement block {header[BLOCK_INDEX]}")
        dmtf = _need(measurement, 0, DMTF_HEADER_SIZE, "DMTF measurement header")
        (value_size,) = struct.unpack_from("<H", dmtf, DMTF_VALUE_SIZE)
        if DMTF_HEADER_SIZE + value_size != size:
            raise ParseError(f"measurement block {header[BLOCK_INDEX]} declares a {value_size}-byte value in {size} bytes")
        block = cls(index=header[BLOCK_INDEX], value_type=dmtf[DMTF_VALUE_TYPE], value=measurement[DMTF_VALUE:])
        return block, offset + BLOCK_MEASUREMENT + size


@dataclass(frozen=True)
class OpaqueData:
    fields: tuple[tuple[int, bytes], ...]  # (type, value) in report order

    @classmethod
    def from_bytes(cls, data: bytes) -> "OpaqueData":
        fields: list[tuple[int, bytes]] = []
        offset = 0
        while offset < len(data):
            kind, size = struct.unpack("<HH", _need(data, offset, TLV_HEADER_SIZE, "opaque data field header"))
            fields.append((kind, _need(data, offset + TLV_VALUE, size, f"opaque data field {kind}")))
            offset += TLV_HEADER_SIZE + size
        types = [kind for kind, _ in fields]
        duplicated = sorted({kind for kind in types if types.count(kind) > 1})
        if duplicated:
            raise ParseError(f"opaque data repeats field type(s) {duplicated}")
        return cls(fields=tuple(fields))

    def get(self, kind: OpaqueField) -> bytes | None:
        for field_type, value in self.fields:
            if field_type == kind:
                return value
        return None

    def require(self, kind: OpaqueField) -> bytes:
        value = self.get(kind)
        if value is None:
            raise ParseError(f"opaque data has no {kind.name} field")
        return value

    @property
    def driver_version(self) -> str:
        return _text(self.require(OpaqueField.DRIVER_VERSION))

    @property
    def vbios_version(self) -> str:
        return format_vbios_version(self.require(OpaqueField.VBIOS_VERSION))

    def text(self, kind: OpaqueField) -> str | None:
        value = self.get(kind)
        return None if value is None else _text(value)

    @property
    def fwid(self) -> bytes | None:
        return self.get(OpaqueField.FWID)

    @property
    def nvdec0_disabled(self) -> bool:
        value = self.get(OpaqueField.NVDEC0_STATUS)
        return value is not None and len(value) == 1 and value[0] == NVDEC0_DISABLED

    @property
    def measurement_counts(self) -> tuple[int, ...]:
        value = self.get(OpaqueField.MSRSCNT) or b""
        if len(value) % MSR_COUNT_SIZE:
            raise ParseError("opaque MSRSCNT field is not a whole number of u32 counts")
        return struct.unpack(f"<{len(value) // MSR_COUNT_SIZE}I", value)


@dataclass(frozen=True)
class SpdmResponse:
    version: int
    param1: int
    slot_id: int
    blocks: tuple[MeasurementBlock, ...]
    nonce: bytes
    opaque: OpaqueData
    signature: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> "SpdmResponse":
        """`data` is the whole response, signature included, and nothing after it."""
        head = _need(data, 0, RESP_RECORD, "MEASUREMENTS response header")
        if head[RESP_VERSION] != SPDM_VERSION_1_1:
            raise ParseError(f"SPDM response version 0x{head[RESP_VERSION]:02x} is not 1.1 (0x11)")
        if head[RESP_CODE] != CODE_MEASUREMENTS:
            raise ParseError(f"SPDM response code 0x{head[RESP_CODE]:02x} is not MEASUREMENTS (0x60)")
        count = head[RESP_NUMBER_OF_BLOCKS]
        record_length = int.from_bytes(head[RESP_RECORD_LENGTH:RESP_RECORD_LENGTH + RECORD_LENGTH_SIZE], "little")
        record = _need(data, RESP_RECORD, record_length, "measurement record")
        blocks: list[MeasurementBlock] = []
        offset = 0
        for _ in range(count):
            block, offset = MeasurementBlock.from_bytes(record, offset)
            blocks.append(block)
        if offset != record_length:
            raise ParseError(f"measurement record holds {record_length} bytes but its {count} blocks take {offset}")
        indices = [b.index for b in blocks]
        if len(set(indices)) != len(indices):
            raise ParseError("measurement record repeats a block index")
        nonce_offset = RESP_RECORD + record_length
        nonce = _need(data, nonce_offset, NONCE_SIZE, "response nonce")
        opaque_length_offset = nonce_offset + NONCE_SIZE
        (opaque_length,) = struct.unpack("<H", _need(data, opaque_length_offset, OPAQUE_LENGTH_SIZE, "opaque length"))
        opaque_offset = opaque_length_offset + OPAQUE_LENGTH_SIZE
        opaque = OpaqueData.from_bytes(_need(data, opaque_offset, opaque_length, "opaque data"))
        signature_offset = opaque_offset + opaque_length
        signature = _need(data, signature_offset, SIGNATURE_SIZE, "signature")
        if signature_offset + SIGNATURE_SIZE != len(data):
            raise ParseError(f"{len(data) - signature_offset - SIGNATURE_SIZE} bytes follow the response signature")
        return cls(
            version=head[RESP_VERSION],
            param1=head[RESP_PARAM1],
            slot_id=head[RESP_PARAM2],
            blocks=tuple(blocks),
            nonce=nonce,
            opaque=opaque,
            signature=signature,
        )

    def measurement(self, index: int) -> bytes | None:
        for block in self.blocks:
            if block.index == index:
                return block.value
        return None


@dataclass(frozen=True)
class GpuAttestationReport:
    """What NVML's confidential-computing attestation report holds: request ‖ signed response."""

    request: SpdmRequest
    response: SpdmResponse
    signed_bytes: bytes  # request ‖ response without its signature: what the device key signed
    raw: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> "GpuAttestationReport":
        data = bytes(data)
        request = SpdmRequest.from_bytes(data)
        response = SpdmResponse.from_bytes(data[REQUEST_SIZE:])
        if response.version != request.version:
            raise ParseError("SPDM request and response versions differ")
        return cls(request=request, response=response, signed_bytes=data[:-SIGNATURE_SIZE], raw=data)

    @property
    def nonce(self) -> bytes:
        """The requester's nonce: the one the verifier chose (the response nonce is the responder's own)."""
        return self.request.nonce

    @property
    def driver_version(self) -> str:
        return self.response.opaque.driver_version

    @property
    def vbios_version(self) -> str:
        return self.response.opaque.vbios_version


def parse_report_text(data: bytes) -> bytes:
    """A report given as hex text (NVIDIA's sample format, whitespace allowed) or as raw bytes."""
    stripped = b"".join(data.split())
    if stripped and len(stripped) % 2 == 0 and all(c in b"0123456789abcdefABCDEF" for c in stripped):
        return bytes.fromhex(stripped.decode("ascii"))
    return bytes(data)
