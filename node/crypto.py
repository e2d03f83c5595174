"""The one module that owns the envelope's primitives and constants.

Callers never touch HKDF, AES-GCM, BLAKE2b or ML-KEM directly: they call these helpers, so the
protocol's parameters (docs/protocol.md, "Building blocks" and "Hybrid key agreement") live in exactly one place.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey, KEMKeyInterface, KEMKeyPair

SALT_SIZE = 16
NONCE_SIZE = 12
X25519_KEY_SIZE = 32
HASH_SIZE = 32
AES_KEY_SIZE = 32
TAG_SIZE = 16
ED25519_SIGNATURE_SIZE = 64
ED25519_KEY_SIZE = 32
SUI_ED25519_FLAG = 0x00
SUI_SIGNATURE_SIZE = 1 + ED25519_SIGNATURE_SIZE + ED25519_KEY_SIZE
HKDF_INFO = b""
# ML-KEM-768 (FIPS 203) sizes and the hybrid derivation's domain label.
KEM_PUBLIC_KEY_SIZE = 1184
KEM_CIPHERTEXT_SIZE = 1088
HYBRID_INFO_LABEL = b"tee-node/hybrid/v1"
# Oblivious HTTP (RFC 9458; chunked: draft-ietf-ohai-chunked-ohttp) over HPKE (RFC 9180).
OHTTP_KEM = KEMId.DHKEM_X25519_HKDF_SHA256
OHTTP_KDF = KDFId.HKDF_SHA256
OHTTP_AEADS = (AEADId.AES128_GCM, AEADId.CHACHA20_POLY1305)  # the gateway's preference order
OHTTP_REQUEST_LABEL = b"message/bhttp request"
OHTTP_RESPONSE_LABEL = b"message/bhttp response"
OHTTP_CHUNKED_REQUEST_LABEL = b"message/bhttp chunked request"
OHTTP_CHUNKED_RESPONSE_LABEL = b"message/bhttp chunked response"
OHTTP_FINAL_CHUNK_AAD = b"final"

__all__ = [
    "AES_KEY_SIZE",
    "Aead",
    "Base64Error",
    "HASH_SIZE",
    "HYBRID_INFO_LABEL",
    "KEM_CIPHERTEXT_SIZE",
    "KEM_PUBLIC_KEY_SIZE",
    "KemKeyPair",
    "NONCE_SIZE",
    "OHTTP_AEADS",
    "OHTTP_CHUNKED_REQUEST_LABEL",
    "OHTTP_CHUNKED_RESPONSE_LABEL",
    "OHTTP_FINAL_CHUNK_AAD",
    "OHTTP_KDF",
    "OHTTP_KEM",
    "OHTTP_REQUEST_LABEL",
    "OHTTP_RESPONSE_LABEL",
    "OhttpResponseAead",
    "hpke_suite",
    "hpke_x25519_key_pair",
    "hpke_x25519_public_key",
    "SALT_SIZE",
    "SUI_ED25519_FLAG",
    "SUI_SIGNATURE_SIZE",
    "TAG_SIZE",
    "X25519_KEY_SIZE",
    "b64d",
    "b64e",
    "blake2b_256",
    "constant_time_equal",
    "derive_hybrid_key",
    "derive_key",
    "hkdf_sha256",
    "kem_encapsulate",
    "random_bytes",
    "random_nonce",
    "random_salt",
]


try:  # SIMD base64 (installed with vLLM): ~20x faster than binascii on 4 KiB; same results.
    import pybase64 as _pybase64
except ImportError:  # pragma: no cover - the binascii path below is the reference
    _pybase64 = None
# Below this many characters binascii decodes faster (pybase64's call costs more than it saves).
_SIMD_DECODE_FROM = 128


# Standard-alphabet characters whose unused low bits are zero: the only ones a canonical encoder
# writes before "=" (2 unused bits) or before "==" (4 unused bits).
_ZERO_LOW_2_BITS = frozenset("AEIMQUYcgkosw048")
_ZERO_LOW_4_BITS = frozenset("AQgw")


class Base64Error(ValueError):
    """A field is not canonical standard base64 with padding."""


def b64e(data: bytes) -> str:
    if _pybase64 is not None:
        return _pybase64.b64encode_as_string(data)
    # binascii directly: base64.b64encode is this plus a Python-level wrapper.
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64d(text: str) -> bytes:
    """Strict standard base64: only the standard alphabet, padding required, canonical form.

    The validating decoders (pybase64 `validate=True`, binascii `strict_mode`) refuse foreign
    characters (urlsafe, whitespace), missing or excess padding and a leading '='; what they let
    through is non-zero unused bits in the character before the padding, so that character is
    checked: one byte string has exactly one accepted encoding.
    """
    # binascii's strict mode still takes a '=' after a complete quantum ('0000='): lengths first.
    if not isinstance(text, str) or not text.isascii() or len(text) % 4:
        raise Base64Error("not base64")
    try:
        if _pybase64 is not None and len(text) >= _SIMD_DECODE_FROM:
            data = _pybase64.b64decode(text, validate=True)
        else:
            data = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise Base64Error("not base64") from None
    if text.endswith("=="):
        canonical = text[-3] in _ZERO_LOW_4_BITS
    elif text.endswith("="):
        canonical = text[-2] in _ZERO_LOW_2_BITS
    else:
        canonical = True
    if not canonical:
        raise Base64Error("not canonical base64")
    return data


_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def b64url_e(data: bytes) -> str:
    """base64url (RFC 4648 section 5) with padding, as Privacy Pass writes token keys and tokens."""
    return b64e(data).replace("+", "-").replace("/", "_")


def b64url_d(text: str) -> bytes:
    """Strict base64url, padding optional (RFC 9577 tokens are written both ways): only the
    url-safe alphabet, canonical form, as `b64d` checks it."""
    if not isinstance(text, str) or "+" in text or "/" in text:
        raise Base64Error("not base64url")
    return b64d(text.translate(_URLSAFE_TO_STANDARD) + "=" * (-len(text) % 4 if not text.endswith("=") else 0))


def blake2b_256(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_SIZE).digest()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 HKDF-SHA256 with a 32-byte output (AES_KEY_SIZE): one expand block,
    T(1) = HMAC(PRK, info ‖ 0x01).

    The standard library's one-shot HMAC rather than cryptography's HKDF object, which writes
    the same bytes (tests/test_envelope.py compares them) with ~16 more SHA-256 compressions
    and an object set-up per request (callgrind).
    """
    prk = hmac.digest(salt, ikm, "sha256")
    return hmac.digest(prk, info + b"\x01", "sha256")


def derive_key(shared_secret: bytes, salt: bytes) -> bytes:
    return hkdf_sha256(shared_secret, salt, HKDF_INFO)


def derive_hybrid_key(
    kem_shared_secret: bytes,
    x25519_shared_secret: bytes,
    salt: bytes,
    client_public_key: bytes,
    node_public_key: bytes,
    kem_ciphertext: bytes,
) -> bytes:
    """The hybrid key: both secrets in the IKM, both DH keys and the KEM ciphertext in info.

    Binding the ciphertext and the keys into `info` ties the key to this exact exchange, so
    neither secret can be transplanted into another request.
    """
    info = HYBRID_INFO_LABEL + client_public_key + node_public_key + hashlib.sha256(kem_ciphertext).digest()
    return hkdf_sha256(kem_shared_secret + x25519_shared_secret, salt, info)


class KemKeyPair:
    """An ML-KEM-768 decapsulation key (in memory only) and its 1184-byte encapsulation key."""

    __slots__ = ("_private", "public_key")

    def __init__(self, private_key: MLKEM768PrivateKey) -> None:
        self._private = private_key
        self.public_key = private_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> KemKeyPair:
        return cls(MLKEM768PrivateKey.generate())

    def decapsulate(self, ciphertext: bytes) -> bytes:
        """The shared secret. A ciphertext of the right length never fails: ML-KEM's implicit
        rejection turns a wrong one into an unrelated secret, so decryption fails instead."""
        return self._private.decapsulate(ciphertext)

    def __repr__(self) -> str:
        return "KemKeyPair(<key hidden>)"


def kem_encapsulate(public_key: bytes) -> tuple[bytes, bytes]:
    """(shared secret, ciphertext) to an ML-KEM-768 encapsulation key (the client's half)."""
    return MLKEM768PublicKey.from_public_bytes(public_key).encapsulate()


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def random_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def random_salt() -> bytes:
    return os.urandom(SALT_SIZE)


class Aead:
    """AES-256-GCM with no associated data and the tag appended (the `AESGCM` default layout)."""

    __slots__ = ("_aesgcm",)

    def __init__(self, key: bytes) -> None:
        self._aesgcm = AESGCM(key)

    @classmethod
    def from_shared_secret(cls, shared_secret: bytes, salt: bytes) -> Aead:
        return cls(derive_key(shared_secret, salt))

    def encrypt(self, nonce: bytes, plaintext: bytes) -> bytes:
        return self._aesgcm.encrypt(nonce, plaintext, None)

    def decrypt(self, nonce: bytes, ciphertext: bytes) -> bytes | None:
        """The plaintext, or None when the tag does not verify."""
        try:
            return self._aesgcm.decrypt(nonce, ciphertext, None)
        except InvalidTag:
            return None

    def __repr__(self) -> str:
        return "Aead(<key hidden>)"


# --- Oblivious HTTP's HPKE suites and response keys (RFC 9458 section 4.4) ----------------------

_HPKE_SUITES: dict[tuple[KEMId, KDFId, AEADId], CipherSuite] = {}


def hpke_suite(kem: KEMId, kdf: KDFId, aead: AEADId) -> CipherSuite:
    """pyhpke's suite object for these ids (made once each: building one derives nothing)."""
    key = (kem, kdf, aead)
    suite = _HPKE_SUITES.get(key)
    if suite is None:
        suite = _HPKE_SUITES[key] = CipherSuite.new(kem, kdf, aead)
    return suite


def hpke_x25519_key_pair(raw: bytes | None = None) -> KEMKeyPair:
    """An HPKE X25519 key pair: fresh, or from the private key's 32 raw bytes (test vectors)."""
    private = X25519PrivateKey.generate() if raw is None else X25519PrivateKey.from_private_bytes(raw)
    return KEMKeyPair(KEMKey.from_pyca_cryptography_key(private), KEMKey.from_pyca_cryptography_key(private.public_key()))


def hpke_x25519_public_key(raw: bytes) -> KEMKeyInterface:
    """ValueError for a key of the wrong length."""
    if len(raw) != X25519_KEY_SIZE:
        raise ValueError("X25519 public key must be 32 bytes")
    return hpke_suite(OHTTP_KEM, OHTTP_KDF, OHTTP_AEADS[0]).kem.deserialize_public_key(raw)


_OHTTP_AEAD_SIZES = {AEADId.AES128_GCM: (16, 12), AEADId.CHACHA20_POLY1305: (32, 12)}  # (Nk, Nn)


class OhttpResponseAead:
    """The AEAD of an OHTTP response: key and nonce from the HPKE context's exported secret, the
    encapsulated key and the response nonce (RFC 9458 section 4.4); chunk `counter` XORed into
    the nonce for chunked responses (counter 0 is the non-chunked nonce)."""

    __slots__ = ("_aead", "_nonce", "key_size")

    def __init__(self, aead_id: AEADId, secret: bytes, enc: bytes, response_nonce: bytes) -> None:
        key_size, nonce_size = _OHTTP_AEAD_SIZES[aead_id]
        prk = hmac.digest(enc + response_nonce, secret, "sha256")  # Extract(salt, secret)
        key = hmac.digest(prk, b"key\x01", "sha256")[:key_size]  # Expand: Nk, Nn <= 32 is one block
        self._nonce = hmac.digest(prk, b"nonce\x01", "sha256")[:nonce_size]
        self._aead = AESGCM(key) if aead_id == AEADId.AES128_GCM else ChaCha20Poly1305(key)
        self.key_size = key_size

    @staticmethod
    def nonce_size(aead_id: AEADId) -> int:
        """The response nonce's length: max(Nn, Nk)."""
        return max(_OHTTP_AEAD_SIZES[aead_id])

    def _chunk_nonce(self, counter: int) -> bytes:
        size = len(self._nonce)
        return (int.from_bytes(self._nonce, "big") ^ counter).to_bytes(size, "big")

    def seal(self, plaintext: bytes, counter: int = 0, aad: bytes = b"") -> bytes:
        return self._aead.encrypt(self._chunk_nonce(counter), plaintext, aad)

    def open(self, ciphertext: bytes, counter: int = 0, aad: bytes = b"") -> bytes | None:
        """The plaintext, or None when the tag does not verify."""
        try:
            return self._aead.decrypt(self._chunk_nonce(counter), ciphertext, aad)
        except InvalidTag:
            return None

    def __repr__(self) -> str:
        return "OhttpResponseAead(<key hidden>)"
