"""An Oblivious HTTP client written from RFC 9458, RFC 9292 and draft-ietf-ohai-chunked-ohttp
alone, for the tests: none of node.ohttp's code. Its own Binary HTTP encoder and decoder, HPKE
through pyhpke's calls, the response AEAD through `cryptography` and `hmac` directly.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey

REQUEST_LABEL = b"message/bhttp request"
RESPONSE_LABEL = b"message/bhttp response"
CHUNKED_REQUEST_LABEL = b"message/bhttp chunked request"
CHUNKED_RESPONSE_LABEL = b"message/bhttp chunked response"
SIZES = {0x0001: (16, 12), 0x0003: (32, 12)}  # AEAD id -> (Nk, Nn)


def varint(value: int) -> bytes:
    for size, prefix in ((1, 0), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (8 * size - 2):
            encoded = bytearray(value.to_bytes(size, "big"))
            encoded[0] |= prefix
            return bytes(encoded)
    raise ValueError(value)


def read_varint(data: bytes, at: int) -> tuple[int, int]:
    size = 1 << (data[at] >> 6)
    return int.from_bytes(data[at : at + size], "big") & ((1 << (8 * size - 2)) - 1), at + size


def _lp(data: bytes) -> bytes:
    return varint(len(data)) + data


def encode_request(method: str, path: str, headers: list[tuple[str, str]], content: bytes = b"", authority: str = "") -> bytes:
    """RFC 9292 known-length request (framing 0), header names lower-cased."""
    section = b"".join(_lp(n.lower().encode()) + _lp(v.encode()) for n, v in headers)
    return b"\x00" + _lp(method.encode()) + _lp(b"https") + _lp(authority.encode()) + _lp(path.encode()) + _lp(section) + _lp(content) + _lp(b"")


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""


def decode_response(data: bytes) -> Answer:
    """RFC 9292 response, both framings (informational responses skipped)."""
    framing, at = read_varint(data, 0)
    assert framing in (1, 3), framing
    while True:
        status, at = read_varint(data, at)
        fields, at = _fields(data, at, framing == 3)
        if status >= 200:
            break
    content = b""
    if at < len(data):
        if framing == 1:
            size, at = read_varint(data, at)
            content, at = data[at : at + size], at + size
        else:
            while True:
                size, at = read_varint(data, at)
                if size == 0:
                    break
                content += data[at : at + size]
                at += size
    return Answer(status, dict(fields), content)


def _fields(data: bytes, at: int, indeterminate: bool) -> tuple[list[tuple[str, str]], int]:
    fields = []
    if indeterminate:
        while True:
            size, at = read_varint(data, at)
            if size == 0:
                return fields, at
            name, at = data[at : at + size], at + size
            size, at = read_varint(data, at)
            fields.append((name.decode(), data[at : at + size].decode()))
            at += size
    total, at = read_varint(data, at)
    end = at + total
    while at < end:
        size, at = read_varint(data, at)
        name, at = data[at : at + size], at + size
        size, at = read_varint(data, at)
        fields.append((name.decode(), data[at : at + size].decode()))
        at += size
    return fields, at


@dataclass
class Config:
    key_id: int
    public_key: bytes
    suites: list[tuple[int, int]]


def parse_key_configs(data: bytes) -> list[Config]:
    configs, at = [], 0
    while at < len(data):
        (size,) = struct.unpack_from(">H", data, at)
        raw = data[at + 2 : at + 2 + size]
        key_id, kem = struct.unpack_from(">BH", raw)
        assert kem == 0x0020
        (sym_size,) = struct.unpack_from(">H", raw, 35)
        suites = [struct.unpack_from(">HH", raw, 37 + i) for i in range(0, sym_size, 4)]
        configs.append(Config(key_id, raw[3:35], suites))
        at += 2 + size
    return configs


class Exchange:
    """One request to a gateway key and the opening of its answer."""

    def __init__(self, config: Config, aead: int = 0x0001, chunked: bool = False) -> None:
        assert (0x0001, aead) in config.suites
        self.aead, self.chunked = aead, chunked
        self.header = struct.pack(">BHHH", config.key_id, 0x0020, 0x0001, aead)
        suite = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId(aead))
        label = CHUNKED_REQUEST_LABEL if chunked else REQUEST_LABEL
        recipient = KEMKey.from_pyca_cryptography_key(_x25519_public(config.public_key))
        self.enc, self.context = suite.create_sender_context(recipient, label + b"\x00" + self.header)

    def request(self, bhttp_request: bytes) -> bytes:
        if not self.chunked:
            return self.header + self.enc + self.context.seal(bhttp_request)
        half = len(bhttp_request) // 2
        sealed = self.context.seal(bhttp_request[:half])
        return self.header + self.enc + varint(len(sealed)) + sealed + b"\x00" + self.context.seal(bhttp_request[half:], b"final")

    def _aead(self, nonce: bytes) -> tuple[AESGCM | ChaCha20Poly1305, bytes]:
        nk, nn = SIZES[self.aead]
        secret = self.context.export(CHUNKED_RESPONSE_LABEL if self.chunked else RESPONSE_LABEL, max(nk, nn))
        prk = hmac.digest(self.enc + nonce, secret, "sha256")
        key = hmac.digest(prk, b"key\x01", "sha256")[:nk]
        iv = hmac.digest(prk, b"nonce\x01", "sha256")[:nn]
        return (AESGCM(key) if self.aead == 0x0001 else ChaCha20Poly1305(key)), iv

    def open(self, body: bytes) -> bytes:
        size = max(SIZES[self.aead])
        aead, iv = self._aead(body[:size])
        return aead.decrypt(iv, body[size:], None)

    def open_chunks(self, pieces: list[bytes]) -> list[bytes]:
        """The plaintext of each chunk, from the body's pieces as they arrived."""
        body = b"".join(pieces)
        size = max(SIZES[self.aead])
        aead, iv = self._aead(body[:size])
        at, counter, out = size, 0, []
        while True:
            length, at = read_varint(body, at)
            nonce = (int.from_bytes(iv, "big") ^ counter).to_bytes(len(iv), "big")
            counter += 1
            if length == 0:
                out.append(aead.decrypt(nonce, body[at:], b"final"))
                return out
            out.append(aead.decrypt(nonce, body[at : at + length], None))
            at += length


def _x25519_public(raw: bytes):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    return X25519PublicKey.from_public_bytes(raw)
