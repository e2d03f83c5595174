"""The node's keys: a keyring of X25519 + ML-KEM-768 key epochs and an Ed25519 signer (Sui format).

Key material never appears in a repr, a log line or an exception text; objects here show only
public keys and epochs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import nacl.bindings as _sodium
import nacl.exceptions as _sodium_errors
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .crypto import (
    ED25519_KEY_SIZE,
    SUI_ED25519_FLAG,
    SUI_SIGNATURE_SIZE,
    Base64Error,
    KemKeyPair,
    b64d,
    b64e,
)
from .errors import BadSignature, ReplayedRequest

_RAW = (Encoding.Raw, PublicFormat.Raw)


def _raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(*_RAW)


class Signer:
    """Ed25519 signing key producing Sui-format signatures: flag 0x00 ‖ signature ‖ public key."""

    __slots__ = ("_private", "public_key", "_suffix", "_sodium_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key = _raw_public(private_key.public_key())
        self._suffix = self.public_key
        # libsodium signs in ~60% of OpenSSL's time here (bench/envelope.py); Ed25519 is
        # deterministic, so the signature bytes are the same either way.
        self._sodium_key = _sodium.crypto_sign_seed_keypair(private_key.private_bytes_raw())[1]

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public_key_b64(self) -> str:
        return b64e(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """The 97-byte Sui signature over `message` (the raw 32 hash bytes, no intent prefix)."""
        return b"\x00" + _sodium.crypto_sign(message, self._sodium_key)[:64] + self._suffix

    def sign_b64(self, message: bytes) -> str:
        return b64e(self.sign(message))

    def __repr__(self) -> str:
        return f"Signer(public_key={self.public_key_b64})"


def verify_sui_signature(
    signature: str | bytes, message: bytes, expected_public_key: bytes | None = None
) -> bytes:
    """Verify a Sui Ed25519 signature over `message`; return the signer's public key.

    Raises BadSignature for a wrong encoding, flag, length, key or signature.
    """
    if isinstance(signature, str):
        try:
            signature = b64d(signature)
        except Base64Error:
            raise BadSignature("signature is not base64") from None
    if len(signature) != SUI_SIGNATURE_SIZE:
        raise BadSignature("signature has the wrong length")
    if signature[0] != SUI_ED25519_FLAG:
        raise BadSignature("signature scheme flag is not Ed25519")
    public_key = signature[-ED25519_KEY_SIZE:]
    if expected_public_key is not None and public_key != expected_public_key:
        raise BadSignature("signature is by an unexpected key")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature[1:-ED25519_KEY_SIZE], message)
    except (_CryptoInvalidSignature, ValueError):
        raise BadSignature() from None
    return public_key


class NodeKey:
    """One key epoch: an X25519 key, its ML-KEM-768 twin (docs/protocol.md) and the replay
    identities accepted under them. Both private keys live in this object only."""

    __slots__ = (
        "epoch", "public_key", "public_key_b64", "kem_public_key", "kem_public_key_b64", "created_at",
        "_private", "_raw_private", "_kem", "_seen", "_capacity",
    )  # fmt: skip

    def __init__(self, epoch: int, private_key: X25519PrivateKey, created_at: float, capacity: int) -> None:
        self.epoch = epoch
        self._private = private_key
        self._raw_private = private_key.private_bytes_raw()
        self.public_key = _raw_public(private_key.public_key())
        self.public_key_b64 = b64e(self.public_key)
        self._kem = KemKeyPair.generate()
        self.kem_public_key = self._kem.public_key
        self.kem_public_key_b64 = b64e(self.kem_public_key)
        self.created_at = created_at
        self._seen: set[bytes] = set()
        self._capacity = capacity

    def exchange(self, peer_public_key: bytes) -> bytes:
        """The raw X25519 shared secret; ValueError for an invalid or low-order peer key."""
        # libsodium's X25519 (faster than building an OpenSSL key object per request, see
        # bench/envelope.py); like OpenSSL it clamps, ignores bit 255 and refuses an all-zero
        # result, which it reports as its own RuntimeError.
        if not isinstance(peer_public_key, bytes) or len(peer_public_key) != 32:
            raise ValueError("X25519 public key must be 32 bytes")
        try:
            return _sodium.crypto_scalarmult(self._raw_private, peer_public_key)
        except _sodium_errors.CryptoError:
            raise ValueError("invalid X25519 peer key") from None

    def decapsulate(self, kem_ciphertext: bytes) -> bytes:
        """The ML-KEM-768 shared secret of a 1088-byte ciphertext (ValueError for another length)."""
        return self._kem.decapsulate(kem_ciphertext)

    @property
    def replay_entries(self) -> int:
        return len(self._seen)

    @property
    def full(self) -> bool:
        return len(self._seen) >= self._capacity

    def __repr__(self) -> str:
        return f"NodeKey(epoch={self.epoch}, public_key={self.public_key_b64})"


_P25519 = 2**255 - 19


def _canonical_x25519(public_key: bytes) -> bytes:
    """The u-coordinate X25519 actually uses: bit 255 cleared, reduced mod p (RFC 7748 5).

    Without this, flipping the ignored top bit of a captured request's client key (or adding
    p) gives the same shared secret under a different replay identity: a replay bypass.
    """
    if len(public_key) != 32 or public_key[31] < 0x7F:  # fast path: already canonical
        return public_key
    u = (int.from_bytes(public_key, "little") & ((1 << 255) - 1)) % _P25519
    return u.to_bytes(32, "little")


def replay_identity(client_public_key: bytes, salt: bytes, nonce: bytes, kem_ciphertext: bytes = b"") -> bytes:
    """A 16-byte digest of (client key, salt, nonce, KEM ciphertext or nothing): what the replay
    cache stores per request.

    The client key is canonicalised first, so every encoding of one X25519 key is one identity.
    The fields before the ciphertext have fixed sizes, so the concatenation is unambiguous.
    """
    return hashlib.blake2b(
        _canonical_x25519(client_public_key) + salt + nonce + kem_ciphertext, digest_size=16
    ).digest()


class KeyRing:
    """The current key epoch and, for `overlap` seconds after a rotation, the previous one.

    A key rotates every `rotation_interval` seconds, on demand, and early when its replay cache
    reaches `replay_capacity`: a full key takes no new requests (they get STALE_NODE_KEY and the
    current key), so replay protection is total and memory is bounded by two caches.
    """

    def __init__(
        self,
        rotation_interval: float = 3600.0,
        overlap: float = 300.0,
        replay_capacity: int = 500_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if overlap < 0 or rotation_interval <= 0 or replay_capacity <= 0:
            raise ValueError("rotation_interval and replay_capacity must be positive, overlap non-negative")
        self.rotation_interval = rotation_interval
        self.overlap = overlap
        self.replay_capacity = replay_capacity
        self._clock = clock
        self._epoch = 0
        self._previous: NodeKey | None = None
        self._previous_until = 0.0
        self._listeners: list[Callable[[NodeKey], None]] = []
        self.current = self._new_key()

    def _new_key(self) -> NodeKey:
        self._epoch += 1
        return NodeKey(self._epoch, X25519PrivateKey.generate(), self._clock(), self.replay_capacity)

    def on_rotate(self, listener: Callable[[NodeKey], None]) -> None:
        self._listeners.append(listener)

    def rotate(self) -> NodeKey:
        now = self._clock()
        self._previous, self._previous_until = self.current, now + self.overlap
        self.current = self._new_key()
        for listener in self._listeners:
            listener(self.current)
        return self.current

    def maintain(self) -> None:
        """Rotate when the interval has passed; retire the previous key after its overlap."""
        now = self._clock()
        if now - self.current.created_at >= self.rotation_interval:
            self.rotate()
        if self._previous is not None and now >= self._previous_until:
            self._previous = None

    def live_keys(self) -> list[NodeKey]:
        self.maintain()
        return [k for k in (self.current, self._previous) if k is not None]

    def live_key(self, public_key: bytes) -> NodeKey | None:
        """The live key with this public key that still takes requests, else None."""
        for key in self.live_keys():
            if key.public_key == public_key:
                return None if key.full else key
        return None

    def claim(self, key: NodeKey, identity: bytes) -> None:
        """Record a request's replay identity under `key`; ReplayedRequest if seen before."""
        if identity in key._seen:
            raise ReplayedRequest()
        key._seen.add(identity)
        if key.full and key is self.current:
            self.rotate()

    def __repr__(self) -> str:
        previous = self._previous.epoch if self._previous else None
        return f"KeyRing(current_epoch={self.current.epoch}, previous_epoch={previous})"
