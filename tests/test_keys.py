"""node.keys: Sui-format Ed25519 signatures (checked with pynacl, an independent library) and
the X25519 KeyRing's epochs, rotation, overlap and replay cache (clock injected)."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from node.errors import BadSignature, ReplayedRequest
from node.keys import KeyRing, Signer, replay_identity, verify_sui_signature

SEED = bytes(range(32))
HASH = bytes(range(100, 132))  # what the node signs: 32 raw hash bytes


# --- signatures -----------------------------------------------------------------------------


def test_sui_layout_verifies_with_pynacl():
    signer = Signer.from_seed(SEED)
    sig = signer.sign(HASH)
    assert len(sig) == 97 and sig[0] == 0x00
    assert sig[65:] == signer.public_key == bytes(SigningKey(SEED).verify_key)
    # Ed25519 over the 32 hash bytes themselves: no intent prefix, no pre-hash.
    assert VerifyKey(sig[65:]).verify(HASH, sig[1:65]) == HASH
    with pytest.raises(BadSignatureError):
        VerifyKey(sig[65:]).verify(bytes([3, 0, 0]) + HASH, sig[1:65])  # Sui intent-prefixed form
    # Ed25519 is deterministic: both libraries give the same signature bytes.
    assert sig[1:65] == SigningKey(SEED).sign(HASH).signature
    assert base64.b64decode(signer.sign_b64(HASH)) == sig
    assert signer.public_key_b64 == base64.b64encode(signer.public_key).decode()


def test_verify_accepts_pynacl_signature():
    key = SigningKey(bytes(range(1, 33)))
    sui = b"\x00" + key.sign(HASH).signature + bytes(key.verify_key)
    assert verify_sui_signature(sui, HASH) == bytes(key.verify_key)
    assert verify_sui_signature(base64.b64encode(sui).decode(), HASH, bytes(key.verify_key)) == bytes(key.verify_key)


def _bad(sig: bytes) -> list[bytes]:
    other = Signer.generate()
    flipped = bytearray(sig)
    flipped[10] ^= 1
    return [
        b"\x01" + sig[1:],  # secp256k1 flag
        b"\x02" + sig[1:],  # secp256r1 flag
        sig[:-1],
        sig + b"\x00",
        sig[1:],
        b"",
        bytes(flipped),
        sig[:65] + other.public_key,  # signature by one key, another key named
        other.sign(HASH)[:65] + sig[65:],
    ]


@pytest.mark.parametrize("index", range(9))
def test_verify_refuses(index):
    sig = Signer.from_seed(SEED).sign(HASH)
    with pytest.raises(BadSignature):
        verify_sui_signature(_bad(sig)[index], HASH)


def test_verify_refuses_other_message_expected_key_and_bad_base64():
    signer = Signer.from_seed(SEED)
    sig = signer.sign(HASH)
    with pytest.raises(BadSignature):
        verify_sui_signature(sig, HASH[:-1] + b"\x00")
    with pytest.raises(BadSignature):
        verify_sui_signature(sig, HASH, expected_public_key=Signer.generate().public_key)
    for text in ("!!!", base64.urlsafe_b64encode(sig).decode() + "-", base64.b64encode(sig).decode().rstrip("=") + " "):
        with pytest.raises(BadSignature):
            verify_sui_signature(text, HASH)


def test_signer_repr_has_no_secret():
    signer = Signer.from_seed(SEED)
    text = repr(signer)
    assert signer.public_key_b64 in text
    assert SEED.hex() not in text and base64.b64encode(SEED).decode() not in text


# --- keyring --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_epochs_and_rotation_on_demand():
    ring = KeyRing(clock=Clock())
    seen = []
    ring.on_rotate(seen.append)
    first = ring.current
    assert first.epoch == 1
    second = ring.rotate()
    assert (second.epoch, ring.current) == (2, second) and seen == [second]
    assert second.public_key != first.public_key
    assert [k.epoch for k in ring.live_keys()] == [2, 1]
    assert ring.live_key(first.public_key) is first  # overlap: requests in flight still open


def test_rotation_by_interval_and_overlap_expiry():
    clock = Clock()
    ring = KeyRing(rotation_interval=100, overlap=10, clock=clock)
    first = ring.current
    clock.now += 99
    assert ring.live_keys() == [first]
    clock.now += 1
    # Rotation is lazy: any live-key lookup (what open_request does) applies it first.
    assert ring.live_key(first.public_key) is first and ring.current.epoch == 2
    clock.now += 9
    assert ring.live_key(first.public_key) is first
    clock.now += 1
    assert ring.live_key(first.public_key) is None and ring.live_keys() == [ring.current]
    assert ring.live_key(bytes(32)) is None


def test_zero_overlap_retires_immediately():
    clock = Clock()
    ring = KeyRing(overlap=0, clock=clock)
    first = ring.current
    ring.rotate()
    assert ring.live_key(first.public_key) is None


def test_claim_refuses_repeat_and_early_rotation_when_full():
    clock = Clock()
    ring = KeyRing(replay_capacity=3, overlap=60, clock=clock)
    first = ring.current
    ring.claim(first, b"a" * 16)
    with pytest.raises(ReplayedRequest):
        ring.claim(first, b"a" * 16)
    ring.claim(first, b"b" * 16)
    assert ring.current is first and first.replay_entries == 2 and not first.full
    ring.claim(first, b"c" * 16)  # cache now full: rotate at once, without waiting the interval
    assert first.full and ring.current.epoch == 2
    # The full key takes no new requests even inside its overlap (they get STALE_NODE_KEY)...
    assert ring.live_key(first.public_key) is None
    # ...and its identities are still refused while it lives.
    with pytest.raises(ReplayedRequest):
        ring.claim(first, b"a" * 16)
    # The new epoch has its own, empty cache.
    ring.claim(ring.current, b"a" * 16)
    assert ring.current.replay_entries == 1


def test_replay_identity():
    ident = replay_identity(b"k" * 32, b"s" * 16, b"n" * 12)
    assert len(ident) == 16
    assert ident == replay_identity(b"k" * 32, b"s" * 16, b"n" * 12)
    assert len({ident, replay_identity(b"K" * 32, b"s" * 16, b"n" * 12), replay_identity(b"k" * 32, b"S" * 16, b"n" * 12),
                replay_identity(b"k" * 32, b"s" * 16, b"N" * 12)}) == 4


def test_invalid_parameters():
    for kwargs in ({"rotation_interval": 0}, {"overlap": -1}, {"replay_capacity": 0}):
        with pytest.raises(ValueError):
            KeyRing(**kwargs)


def test_exchange_and_low_order_peer():
    ring = KeyRing()
    peer = X25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    shared = ring.current.exchange(peer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    assert len(shared) == 32
    with pytest.raises(ValueError):
        ring.current.exchange(bytes(32))


def test_reprs_have_no_secrets():
    ring = KeyRing()
    ring.rotate()
    for key in ring.live_keys():
        secret = key._private.private_bytes_raw()
        for text in (repr(key), repr(ring), str(key)):
            assert secret.hex() not in text and base64.b64encode(secret).decode() not in text
        assert key.public_key_b64 in repr(key) and f"epoch={key.epoch}" in repr(key)
    assert repr(ring) == "KeyRing(current_epoch=2, previous_epoch=1)"
