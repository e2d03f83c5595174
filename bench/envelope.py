"""Envelope cost next to the bare primitives it cannot avoid, measured in the same run.

Cases (medians, one call each):
  open_4k             decode_request + open_request of a 4 KiB request
  parse_open_4k       the same plus the outer JSON parse (parse_request)
  open_seal_4k        decode + open + seal_response of a 4 KiB answer (with its receipt)
  parse_open_seal_4k  the same plus the outer JSON parse
  event_200           seal_event of one 200-byte stream chunk
  hybrid_open_4k      decode + open of a 4 KiB request with the protocol's ML-KEM-768 + X25519 key
  event_200_padded    seal_event of the same chunk with length hiding on (padded to 256 bytes)

Floors (the fastest available implementation of each primitive, cryptography or pynacl):
  open+seal  one X25519, one HKDF-SHA256, AES-256-GCM key set-up + decrypt 4 KiB + encrypt
             4 KiB, BLAKE2b-256 of both, one Ed25519 signature
  +receipt   that plus what docs/protocol.md adds to every response: the receipt's BLAKE2b
             of its canonical JSON and its own Ed25519 signature
  event      AES-GCM encrypt 200 B, one BLAKE2b-256, one Ed25519 signature
  hybrid open  the open floor plus one ML-KEM-768 decapsulation and the SHA-256 of the KEM
             ciphertext (HKDF then takes the protocol's info)
  padded event the event floor over the 256 padded bytes

Timing (bench/common.py's interleaved_medians): functions take turns call by call, because
this VM's speed drifts by up to 1.8x within seconds; each comparison below times its case and
floor together on their own; `timings_ns` has every case and floor taking turns together.

Goals: envelope <= 1.3x its floor; a padded event <= 1.1x an unpadded one (padding may cost
at most 10 % of sealed events/s). Writes docs/benchmarks/envelope.json. Run:
    .venv/bin/python bench/envelope.py [--quick]
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nacl.bindings as sodium  # noqa: E402
from common import interleaved_medians, print_table, us, write_results  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: E402

from node.envelope import decode_request, open_request, parse_request, seal_request  # noqa: E402
from node.wire import canonical_json  # noqa: E402
from node.keys import KeyRing, Signer  # noqa: E402
from node.protocol import Usage  # noqa: E402

GOAL = 1.3
PADDING_GOAL = 1.1
MODEL = "bench/model"


def _pick_fastest(candidates: dict, repeat: int) -> tuple[str, object]:
    timings = interleaved_medians(candidates, rounds=3, repeat=repeat)
    best = min(timings, key=timings.get)
    return best, candidates[best]


def main() -> int:
    quick = "--quick" in sys.argv
    repeat = 300 if quick else 1500
    rounds = 3 if quick else 7
    started = time.perf_counter()

    keyring, signer = KeyRing(), Signer.generate()
    usage = Usage.from_openai({"prompt_tokens": 900, "completion_tokens": 1000}).model_dump()
    request_plaintext = json.dumps(
        {"model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": "x" * 4020}]},
        separators=(",", ":"),
    ).encode()[:4096]
    request_plaintext = request_plaintext[:-2] + b"}}"  # keep it 4 KiB; content need not parse here
    response_plaintext = os.urandom(3072).hex().encode()[:4096]
    event_plaintext = b'{"t":"' + os.urandom(100).hex().encode()[:192] + b'"}'  # a 200-byte JSON object
    assert len(request_plaintext) == len(response_plaintext) == 4096 and len(event_plaintext) == 200

    outer, _opener = seal_request(request_plaintext, keyring.current.public_key, MODEL, stack_small_id=1)
    body = json.dumps(outer).encode()
    model = parse_request(body)
    hybrid_outer, _ = seal_request(
        request_plaintext, keyring.current.public_key, MODEL, kem_public_key=keyring.current.kem_public_key, stack_small_id=1
    )
    hybrid_model = parse_request(json.dumps(hybrid_outer).encode())

    def open_4k():
        return open_request(decode_request(model), keyring, signer)

    def parse_open_4k():
        return open_request(decode_request(parse_request(body)), keyring, signer)

    def open_seal_4k():
        return open_request(decode_request(model), keyring, signer).sealer.seal_response(response_plaintext, MODEL, usage)

    def parse_open_seal_4k():
        opened = open_request(decode_request(parse_request(body)), keyring, signer)
        return opened.sealer.seal_response(response_plaintext, MODEL, usage)

    def hybrid_open_4k():
        return open_request(decode_request(hybrid_model), keyring, signer)

    sealer = open_4k().sealer
    padded_sealer = open_4k().sealer
    padded_sealer.padding = True

    def event_200():
        return sealer.seal_event(event_plaintext)

    def event_200_padded():
        return padded_sealer.seal_event(event_plaintext)

    # --- primitives: the fastest of cryptography / pynacl for each -------------------------
    node_sk = X25519PrivateKey.generate()
    node_sk_raw = node_sk.private_bytes_raw()
    client_pk_raw = X25519PrivateKey.generate().public_key().public_bytes_raw()
    x_name, x25519 = _pick_fastest(
        {
            "cryptography": lambda: node_sk.exchange(X25519PublicKey.from_public_bytes(client_pk_raw)),
            "pynacl": lambda: sodium.crypto_scalarmult(node_sk_raw, client_pk_raw),
        },
        repeat,
    )
    ed_priv = Ed25519PrivateKey.generate()
    ed_sodium = sodium.crypto_sign_seed_keypair(ed_priv.private_bytes_raw())[1]
    digest32 = hashlib.blake2b(b"x", digest_size=32).digest()
    ed_name, ed_sign = _pick_fastest(
        {
            "cryptography": lambda: ed_priv.sign(digest32),
            "pynacl": lambda: sodium.crypto_sign(digest32, ed_sodium)[:64],
        },
        repeat,
    )
    salt = os.urandom(16)
    shared = x25519()
    hk_name, hkdf = _pick_fastest(
        {
            "cryptography": lambda: HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"").derive(shared),
            # RFC 5869 with one output block: T(1) = HMAC(PRK, info || 0x01).
            "hmac": lambda: hmac.digest(hmac.digest(salt, shared, "sha256"), b"\x01", "sha256"),
        },
        repeat,
    )
    key = hkdf()
    aead = AESGCM(key)
    nonce = os.urandom(12)
    request_ct = aead.encrypt(nonce, request_plaintext, None)
    receipt_json = canonical_json(
        {"version": 1, "request_hash": "A" * 44, "transcript_hash": "A" * 44, "events": 1, "model": MODEL,
         "usage": usage, "key_epoch": 1}
    )

    def floor_open():
        aes = AESGCM(hkdf_from(x25519()))
        hashlib.blake2b(aes.decrypt(nonce, request_ct, None), digest_size=32).digest()

    def hkdf_from(secret):  # the chosen HKDF, taking the secret as input
        if hk_name == "hmac":
            return hmac.digest(hmac.digest(salt, secret, "sha256"), b"\x01", "sha256")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"").derive(secret)

    def floor_open_seal():
        aes = AESGCM(hkdf_from(x25519()))
        hashlib.blake2b(aes.decrypt(nonce, request_ct, None), digest_size=32).digest()
        aes.encrypt(nonce, response_plaintext, None)
        ed_sign_msg(hashlib.blake2b(response_plaintext, digest_size=32).digest())

    def floor_open_seal_receipt():
        floor_open_seal()
        ed_sign_msg(hashlib.blake2b(receipt_json, digest_size=32).digest())

    if ed_name == "pynacl":
        def ed_sign_msg(m):
            return sodium.crypto_sign(m, ed_sodium)[:64]
    else:
        ed_sign_msg = ed_priv.sign

    def floor_event():
        aead.encrypt(nonce, event_plaintext, None)
        ed_sign_msg(hashlib.blake2b(event_plaintext, digest_size=32).digest())

    padded_event = event_plaintext + b"x" * (256 - len(event_plaintext))

    def floor_event_padded():
        aead.encrypt(nonce, padded_event, None)
        ed_sign_msg(hashlib.blake2b(padded_event, digest_size=32).digest())

    kem_key = MLKEM768PrivateKey.generate()
    kem_ciphertext = kem_key.public_key().encapsulate()[1]
    client_pk_and_node_pk = client_pk_raw + node_sk.public_key().public_bytes_raw()

    def hybrid_hkdf_from(secret: bytes, info: bytes) -> bytes:  # the chosen HKDF, with the protocol's info
        if hk_name == "hmac":
            return hmac.digest(hmac.digest(salt, secret, "sha256"), info + b"\x01", "sha256")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)

    hybrid_info = b"tee-node/hybrid/v1" + client_pk_and_node_pk + hashlib.sha256(kem_ciphertext).digest()
    hybrid_key = hybrid_hkdf_from(kem_key.decapsulate(kem_ciphertext) + x25519(), hybrid_info)
    hybrid_request_ct = AESGCM(hybrid_key).encrypt(nonce, request_plaintext, None)

    def floor_hybrid_open():
        info = b"tee-node/hybrid/v1" + client_pk_and_node_pk + hashlib.sha256(kem_ciphertext).digest()
        aes = AESGCM(hybrid_hkdf_from(kem_key.decapsulate(kem_ciphertext) + x25519(), info))
        hashlib.blake2b(aes.decrypt(nonce, hybrid_request_ct, None), digest_size=32).digest()

    cases = {
        "open_4k": open_4k,
        "parse_open_4k": parse_open_4k,
        "open_seal_4k": open_seal_4k,
        "parse_open_seal_4k": parse_open_seal_4k,
        "event_200": event_200,
        "hybrid_open_4k": hybrid_open_4k,
        "event_200_padded": event_200_padded,
        "floor_open": floor_open,
        "floor_open_seal": floor_open_seal,
        "floor_open_seal_receipt": floor_open_seal_receipt,
        "floor_event": floor_event,
        "floor_hybrid_open": floor_hybrid_open,
        "floor_event_padded": floor_event_padded,
    }
    timings = interleaved_medians(cases, rounds=rounds, repeat=repeat)
    # Individual primitives, for the record.
    primitives = interleaved_medians(
        {
            f"x25519 ({x_name})": x25519,
            f"ed25519 sign ({ed_name})": lambda: ed_sign_msg(digest32),
            f"hkdf ({hk_name})": hkdf,
            "aesgcm key set-up": lambda: AESGCM(key),
            "aesgcm decrypt 4 KiB": lambda: aead.decrypt(nonce, request_ct, None),
            "aesgcm encrypt 4 KiB": lambda: aead.encrypt(nonce, response_plaintext, None),
            "blake2b-256 4 KiB": lambda: hashlib.blake2b(response_plaintext, digest_size=32).digest(),
            "aesgcm encrypt 200 B": lambda: aead.encrypt(nonce, event_plaintext, None),
            "blake2b-256 200 B": lambda: hashlib.blake2b(event_plaintext, digest_size=32).digest(),
            "ml-kem-768 decapsulate (cryptography)": lambda: kem_key.decapsulate(kem_ciphertext),
            "sha-256 1088 B": lambda: hashlib.sha256(kem_ciphertext).digest(),
        },
        rounds=3,
        repeat=repeat,
    )

    comparisons = [
        ("open 4 KiB (decode+open)", "open_4k", "floor_open", GOAL),
        ("open 4 KiB incl. JSON parse", "parse_open_4k", "floor_open", GOAL),
        ("open + seal 4 KiB", "open_seal_4k", "floor_open_seal", GOAL),
        ("open + seal 4 KiB vs floor+receipt", "open_seal_4k", "floor_open_seal_receipt", GOAL),
        ("parse + open + seal 4 KiB vs floor+receipt", "parse_open_seal_4k", "floor_open_seal_receipt", GOAL),
        ("seal 200 B event", "event_200", "floor_event", GOAL),
        ("hybrid open 4 KiB (decode+open)", "hybrid_open_4k", "floor_hybrid_open", GOAL),
        ("seal 200 B event padded to 256", "event_200_padded", "floor_event_padded", GOAL),
        ("padded / unpadded 200 B event", "event_200_padded", "event_200", PADDING_GOAL),
    ]
    rows, results = [], []
    for label, case, floor, goal in comparisons:
        # A case and its floor take turns on their own: with all cases taking turns, each ran
        # with the others' data in the caches and the ratios moved with the mix.
        pair = interleaved_medians({case: cases[case], floor: cases[floor]}, rounds=rounds, repeat=repeat)
        ratio = pair[case] / pair[floor]
        rows.append([label, us(pair[case]), us(pair[floor]), f"{ratio:.2f}x", f"{goal}x", "ok" if ratio <= goal else "above"])
        results.append({"case": label, "envelope_ns": pair[case], "floor_ns": pair[floor], "ratio": round(ratio, 3),
                        "envelope": case, "floor": floor, "goal": goal})

    print_table(["case", "envelope", "floor / baseline", "ratio", "goal", ""], rows)
    print()
    print_table(["primitive", "median"], [[name, us(ns)] for name, ns in primitives.items()])
    elapsed = time.perf_counter() - started
    path = write_results(
        "envelope",
        {
            "goal_ratio": GOAL,
            "quick": quick,
            "seconds": round(elapsed, 1),
            "implementations": {"x25519": x_name, "ed25519_sign": ed_name, "hkdf": hk_name},
            "timings_ns": timings,
            "primitives_ns": primitives,
            "comparisons": results,
            "notes": "Floors use the fastest of cryptography/pynacl per primitive. The non-streaming response "
            "carries a receipt (docs/protocol.md) with its own BLAKE2b and Ed25519 signature; "
            "'floor+receipt' counts them, the plain floor does not.",
        },
    )
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
