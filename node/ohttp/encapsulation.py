"""Oblivious HTTP (RFC 9458) and chunked Oblivious HTTP (draft-ietf-ohai-chunked-ohttp), both
sides, sans-I/O: key configurations, request and response encapsulation.

HPKE is pyhpke's; the response AEAD and the parameters are `node.crypto`'s. Every failure to
decapsulate raises `DecapsulationError` with no detail, and `UnknownKeyConfig` when the request
names a key id or algorithms this gateway does not hold (RFC 9458 section 5.3 lets a gateway
say that much, so that a client fetches the keys again).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyhpke import AEADId, KDFId, KEMId, KEMKeyPair
from pyhpke.context_interface import ContextInterface

from ..crypto import (
    OHTTP_AEADS,
    OHTTP_CHUNKED_REQUEST_LABEL,
    OHTTP_CHUNKED_RESPONSE_LABEL,
    OHTTP_FINAL_CHUNK_AAD,
    OHTTP_KDF,
    OHTTP_KEM,
    OHTTP_REQUEST_LABEL,
    OHTTP_RESPONSE_LABEL,
    X25519_KEY_SIZE,
    OhttpResponseAead,
    hpke_suite,
    hpke_x25519_key_pair,
    hpke_x25519_public_key,
)
from .bhttp import BhttpError, encode_varint, read_varint

MEDIA_KEYS = "application/ohttp-keys"
MEDIA_REQUEST = "message/ohttp-req"
MEDIA_RESPONSE = "message/ohttp-res"
MEDIA_CHUNKED_REQUEST = "message/ohttp-chunked-req"
MEDIA_CHUNKED_RESPONSE = "message/ohttp-chunked-res"

HEADER_SIZE = 7  # key id (1), KEM (2), KDF (2), AEAD (2)
ENC_SIZE = X25519_KEY_SIZE
TAG_SIZE = 16
# Sealed chunk lengths a receiver takes (the draft's 16 KiB plaintext limit every receiver
# accepts, its tag, and room for larger peers).
MAX_SEALED_CHUNK = 1024 * 1024


class OhttpError(ValueError):
    """An OHTTP message this side refuses."""


class DecapsulationError(OhttpError):
    """Does not decapsulate or open; deliberately no detail about which part failed."""

    def __init__(self) -> None:
        super().__init__("message does not decapsulate")


class UnknownKeyConfig(OhttpError):
    """The request names a key id or algorithms the gateway does not hold."""

    def __init__(self) -> None:
        super().__init__("unknown key configuration")


# --- key configurations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyConfig:
    key_id: int
    kem_id: KEMId
    public_key: bytes
    symmetric: tuple[tuple[KDFId, AEADId], ...]

    def encode(self) -> bytes:
        algorithms = b"".join(struct.pack(">HH", kdf.value, aead.value) for kdf, aead in self.symmetric)
        return (
            struct.pack(">BH", self.key_id, self.kem_id.value)
            + self.public_key
            + struct.pack(">H", len(algorithms))
            + algorithms
        )

    @classmethod
    def decode(cls, data: bytes) -> KeyConfig:
        """One configuration with the X25519 KEM (the only one this code speaks), exactly."""
        if len(data) < 3 + ENC_SIZE + 2:
            raise OhttpError("key configuration truncated")
        key_id, kem = struct.unpack_from(">BH", data)
        if kem != OHTTP_KEM.value:
            raise OhttpError("unsupported KEM")
        public_key = data[3 : 3 + ENC_SIZE]
        (size,) = struct.unpack_from(">H", data, 3 + ENC_SIZE)
        algorithms = data[5 + ENC_SIZE :]
        if size != len(algorithms) or size == 0 or size % 4:
            raise OhttpError("malformed symmetric algorithms")
        symmetric = []
        for offset in range(0, size, 4):
            kdf, aead = struct.unpack_from(">HH", algorithms, offset)
            if kdf == OHTTP_KDF.value and aead in {a.value for a in OHTTP_AEADS}:
                symmetric.append((KDFId(kdf), AEADId(aead)))
        return cls(key_id, OHTTP_KEM, public_key, tuple(symmetric))


def encode_key_configs(configs: list[KeyConfig]) -> bytes:
    """The `application/ohttp-keys` body: each configuration prefixed with its 2-byte length."""
    return b"".join(struct.pack(">H", len(encoded)) + encoded for encoded in (c.encode() for c in configs))


def decode_key_configs(data: bytes) -> list[KeyConfig]:
    """Every configuration of an `application/ohttp-keys` body; OhttpError for any encoding error."""
    configs = []
    offset = 0
    while offset < len(data):
        if offset + 2 > len(data):
            raise OhttpError("key configuration list truncated")
        (size,) = struct.unpack_from(">H", data, offset)
        if offset + 2 + size > len(data):
            raise OhttpError("key configuration list truncated")
        configs.append(KeyConfig.decode(data[offset + 2 : offset + 2 + size]))
        offset += 2 + size
    if not configs:
        raise OhttpError("no key configuration")
    return configs


class GatewayKey:
    """One key id's X25519 key pair (in memory only) and its public configuration."""

    __slots__ = ("key_id", "_pair", "config")

    def __init__(self, key_id: int, pair: KEMKeyPair) -> None:
        self.key_id = key_id
        self._pair = pair
        self.config = KeyConfig(
            key_id, OHTTP_KEM, pair.public_key.to_public_bytes(), tuple((OHTTP_KDF, aead) for aead in OHTTP_AEADS)
        )

    @classmethod
    def generate(cls, key_id: int, raw_private_key: bytes | None = None) -> GatewayKey:
        return cls(key_id, hpke_x25519_key_pair(raw_private_key))

    def __repr__(self) -> str:
        return f"GatewayKey(key_id={self.key_id})"


# --- the gateway's side ---------------------------------------------------------------------------


def _header(key_id: int, kem: KEMId, kdf: KDFId, aead: AEADId) -> bytes:
    return struct.pack(">BHHH", key_id, kem.value, kdf.value, aead.value)


def _info(label: bytes, header: bytes) -> bytes:
    return label + b"\x00" + header


def _response_aead(
    context: ContextInterface, aead: AEADId, enc: bytes, chunked: bool, response_nonce: bytes
) -> OhttpResponseAead:
    """The response AEAD both ends derive from the request's HPKE context (RFC 9458 section 4.4)."""
    label = OHTTP_CHUNKED_RESPONSE_LABEL if chunked else OHTTP_RESPONSE_LABEL
    secret = context.export(label, OhttpResponseAead.nonce_size(aead))
    return OhttpResponseAead(aead, secret, enc, response_nonce)


class ResponseEncapsulator:
    """Seals the answer to one decapsulated request: whole (`seal`) or chunk by chunk
    (`chunked_start`, `chunk`, `final_chunk`)."""

    def __init__(self, context: ContextInterface, enc: bytes, aead: AEADId, chunked: bool) -> None:
        self._context = context
        self._enc = enc
        self._aead_id = aead
        self._chunked = chunked
        self._aead: OhttpResponseAead | None = None
        self._counter = 0

    def _keys(self, response_nonce: bytes) -> OhttpResponseAead:
        return _response_aead(self._context, self._aead_id, self._enc, self._chunked, response_nonce)

    def seal(self, plaintext: bytes, response_nonce: bytes | None = None) -> bytes:
        """A `message/ohttp-res` body: response nonce, then the sealed answer."""
        nonce = response_nonce or os.urandom(OhttpResponseAead.nonce_size(self._aead_id))
        return nonce + self._keys(nonce).seal(plaintext)

    def chunked_start(self) -> bytes:
        """The response nonce that opens a `message/ohttp-chunked-res` body."""
        nonce = os.urandom(OhttpResponseAead.nonce_size(self._aead_id))
        self._aead = self._keys(nonce)
        return nonce

    def chunk(self, plaintext: bytes) -> bytes:
        """One non-final chunk, length-prefixed (an empty plaintext makes no chunk)."""
        assert self._aead is not None, "chunked_start first"
        if not plaintext:
            return b""
        sealed = self._aead.seal(plaintext, self._counter)
        self._counter += 1
        return encode_varint(len(sealed)) + sealed

    def final_chunk(self, plaintext: bytes = b"") -> bytes:
        """The final chunk: a zero length, then the chunk sealed with the "final" AAD."""
        assert self._aead is not None, "chunked_start first"
        sealed = self._aead.seal(plaintext, self._counter, OHTTP_FINAL_CHUNK_AAD)
        self._counter += 1
        return b"\x00" + sealed


KeyLookup = Callable[[int], "GatewayKey | None"]


def _open_whole_chunks(buffer: bytearray, open_chunk: Callable[[bytes, bytes], bytes]) -> tuple[bytes, bool]:
    """Reads a chunked body's length-prefixed chunks for both receivers: opens and drops every
    whole non-final chunk at the start of `buffer`; returns their plaintext and whether the final
    chunk's zero length has come (dropped too: the final chunk runs to the end of the body)."""
    out = []
    while True:
        try:
            size, offset = read_varint(buffer, 0)
        except BhttpError:
            return b"".join(out), False
        if size == 0:
            del buffer[:offset]
            return b"".join(out), True
        if size > MAX_SEALED_CHUNK:
            raise DecapsulationError()
        if offset + size > len(buffer):
            return b"".join(out), False
        out.append(open_chunk(bytes(buffer[offset : offset + size]), b""))
        del buffer[: offset + size]


def _open_header(data: bytes, lookup: KeyLookup, label: bytes) -> tuple[ContextInterface, bytes, AEADId]:
    """The HPKE recipient context of a request's header (RFC 9458 section 4.3)."""
    if len(data) < HEADER_SIZE + ENC_SIZE:
        raise DecapsulationError()
    key_id, kem, kdf, aead = struct.unpack_from(">BHHH", data)
    key = lookup(key_id)
    if key is None or kem != OHTTP_KEM.value or (kdf, aead) not in {(k.value, a.value) for k, a in key.config.symmetric}:
        raise UnknownKeyConfig()
    aead_id = AEADId(aead)
    enc = data[HEADER_SIZE : HEADER_SIZE + ENC_SIZE]
    try:
        context = hpke_suite(OHTTP_KEM, OHTTP_KDF, aead_id).create_recipient_context(
            enc, key._pair.private_key, _info(label, data[:HEADER_SIZE])
        )
    except Exception:  # pyhpke's and cryptography's errors for a bad (e.g. low-order) key
        raise DecapsulationError() from None
    return context, enc, aead_id


def decapsulate_request(data: bytes, lookup: KeyLookup) -> tuple[bytes, ResponseEncapsulator]:
    """A `message/ohttp-req` body: the Binary HTTP request and the sealer of its answer."""
    context, enc, aead = _open_header(data, lookup, OHTTP_REQUEST_LABEL)
    try:
        plaintext = context.open(data[HEADER_SIZE + ENC_SIZE :])
    except Exception:
        raise DecapsulationError() from None
    return plaintext, ResponseEncapsulator(context, enc, aead, chunked=False)


class ChunkedRequestDecapsulator:
    """A `message/ohttp-chunked-req` body fed in pieces of any size: `feed` returns the
    plaintext of every chunk it completes; `finished` once the final chunk has opened. The
    final chunk runs to the end of the body, so `end` must be called when the body ends."""

    def __init__(self, lookup: KeyLookup, max_body: int) -> None:
        self._lookup = lookup
        self._max_body = max_body
        self._buffer = bytearray()
        self._context: ContextInterface | None = None
        self.encapsulator: ResponseEncapsulator | None = None
        self._final = False  # the zero length of the final chunk has been read
        self.finished = False
        self._received = 0

    def feed(self, data: bytes) -> bytes:
        self._received += len(data)
        if self._received > self._max_body:
            raise OhttpError("body too large")
        self._buffer += data
        if self._context is None:
            if len(self._buffer) < HEADER_SIZE + ENC_SIZE:
                return b""
            head = bytes(self._buffer[: HEADER_SIZE + ENC_SIZE])
            self._context, enc, aead = _open_header(head, self._lookup, OHTTP_CHUNKED_REQUEST_LABEL)
            self.encapsulator = ResponseEncapsulator(self._context, enc, aead, chunked=True)
            del self._buffer[: HEADER_SIZE + ENC_SIZE]
        if self._final:
            return b""
        plaintext, self._final = _open_whole_chunks(self._buffer, self._open)
        return plaintext

    def end(self) -> bytes:
        """The body has ended: the final chunk's plaintext."""
        if self._context is None or not self._final:
            raise DecapsulationError()
        plaintext = self._open(bytes(self._buffer), OHTTP_FINAL_CHUNK_AAD)
        self.finished = True
        return plaintext

    def _open(self, sealed: bytes, aad: bytes) -> bytes:
        assert self._context is not None
        try:
            return self._context.open(sealed, aad)
        except Exception:
            raise DecapsulationError() from None


# --- the client's side ----------------------------------------------------------------------------


def choose_aead(config: KeyConfig) -> AEADId:
    """The first of our AEADs the configuration offers with HKDF-SHA256."""
    for aead in OHTTP_AEADS:
        if (OHTTP_KDF, aead) in config.symmetric:
            return aead
    raise OhttpError("the key configuration offers no suite this client speaks")


class RequestEncapsulator:
    """A client's request to one gateway key: `encapsulate` (whole) or chunked (`header`,
    `chunk`, `final_chunk`); then `open_response`, or a ChunkedResponseOpener over it."""

    def __init__(self, config: KeyConfig, *, chunked: bool, aead: AEADId | None = None, ephemeral: KEMKeyPair | None = None) -> None:
        self.aead = aead or choose_aead(config)
        self.chunked = chunked
        self._header = _header(config.key_id, OHTTP_KEM, OHTTP_KDF, self.aead)
        label = OHTTP_CHUNKED_REQUEST_LABEL if chunked else OHTTP_REQUEST_LABEL
        self.enc, self._context = hpke_suite(OHTTP_KEM, OHTTP_KDF, self.aead).create_sender_context(
            hpke_x25519_public_key(config.public_key), _info(label, self._header), eks=ephemeral
        )

    def encapsulate(self, plaintext: bytes) -> bytes:
        """A `message/ohttp-req` body."""
        assert not self.chunked
        return self._header + self.enc + self._context.seal(plaintext)

    def header(self) -> bytes:
        return self._header + self.enc

    def chunk(self, plaintext: bytes) -> bytes:
        assert self.chunked and plaintext
        sealed = self._context.seal(plaintext)
        return encode_varint(len(sealed)) + sealed

    def final_chunk(self, plaintext: bytes = b"") -> bytes:
        assert self.chunked
        return b"\x00" + self._context.seal(plaintext, OHTTP_FINAL_CHUNK_AAD)

    def _keys(self, response_nonce: bytes) -> OhttpResponseAead:
        return _response_aead(self._context, self.aead, self.enc, self.chunked, response_nonce)

    def open_response(self, data: bytes) -> bytes:
        """The Binary HTTP answer of a `message/ohttp-res` body."""
        size = OhttpResponseAead.nonce_size(self.aead)
        if len(data) < size + TAG_SIZE:
            raise DecapsulationError()
        plaintext = self._keys(data[:size]).open(data[size:])
        if plaintext is None:
            raise DecapsulationError()
        return plaintext


class ChunkedResponseOpener:
    """A `message/ohttp-chunked-res` body fed in pieces: `feed` returns the plaintext of the
    chunks it completes; `end` (when the body ends) opens the final chunk. A body that ends
    without a final chunk that opens is refused: a cut stream never passes for a whole one."""

    def __init__(self, request: RequestEncapsulator) -> None:
        self._request = request
        self._aead: OhttpResponseAead | None = None
        self._buffer = bytearray()
        self._counter = 0
        self._final = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        if self._aead is None:
            size = OhttpResponseAead.nonce_size(self._request.aead)
            if len(self._buffer) < size:
                return b""
            self._aead = self._request._keys(bytes(self._buffer[:size]))
            del self._buffer[:size]
        if self._final:
            return b""
        plaintext, self._final = _open_whole_chunks(self._buffer, self._open)
        return plaintext

    def end(self) -> bytes:
        if self._aead is None or not self._final:
            raise DecapsulationError()
        return self._open(bytes(self._buffer), OHTTP_FINAL_CHUNK_AAD)

    def _open(self, sealed: bytes, aad: bytes) -> bytes:
        assert self._aead is not None
        plaintext = self._aead.open(sealed, self._counter, aad)
        if plaintext is None:
            raise DecapsulationError()
        self._counter += 1
        return plaintext
