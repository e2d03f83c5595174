"""The post-quantum hybrid key agreement of docs/protocol.md, against the echo node in process.

`IndependentHybridClient` is written from docs/protocol.md alone with `cryptography` and `hashlib` (no
node.envelope, no node.crypto): it takes the node's keys from `/v1/nodes/lock`, encapsulates
to the ML-KEM-768 key, derives the hybrid key exactly as docs/protocol.md says, pads its request to a
512 * 2^k bucket, and opens, hash-checks, signature-checks and size-checks every answer. If it
and the node agree, the node implements the text and not just itself. Then the refusals:
wrong-length, wrong and missing KEM ciphertexts, replays, stale keys, and the key epoch's
ML-KEM key in the lock body, the 422 body and the attestation document.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import string
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from server_support import (
    CONFIDENTIAL_CHAT,
    CONFIDENTIAL_COMPLETIONS,
    CONFIDENTIAL_EMBEDDINGS,
    MODEL,
    chat_body,
    completion_body,
    embedding_body,
)

from attestation.document import Policy, verify_document
from attestation.errors import ReportDataMismatch

PROMPT = "post quantum llamas graze on Héllo hills"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def blake2b_256(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def padded_request(body: dict[str, Any]) -> bytes:
    """Length hiding: the request's compact JSON with an `obfuscation` string making it 512 * 2^k bytes."""
    bare = len(json.dumps({**body, "obfuscation": ""}, separators=(",", ":")).encode())
    size = 512
    while size < bare:
        size *= 2
    pad = "".join(secrets.choice(string.ascii_letters) for _ in range(size - bare))
    plaintext = json.dumps({**body, "obfuscation": pad}, separators=(",", ":")).encode()
    assert len(plaintext) == size
    return plaintext


class Exchange:
    """One request's secrets on the client side, and the checks of its answers."""

    def __init__(self, key: bytes, request_hash: bytes, signing_key: bytes) -> None:
        self.aead = AESGCM(key)
        self.request_hash = request_hash
        self.signing_key = signing_key
        self.response_hashes: list[bytes] = []

    def open(self, message: dict[str, Any]) -> bytes:
        """The plaintext: decrypted, its hash and the node's signature over it checked."""
        plaintext = self.aead.decrypt(unb64(message["nonce"]), unb64(message["ciphertext"]), None)
        response_hash = unb64(message["response_hash"])
        assert blake2b_256(plaintext) == response_hash
        signature = unb64(message["signature"])
        assert signature[0] == 0x00 and signature[65:] == self.signing_key
        Ed25519PublicKey.from_public_bytes(self.signing_key).verify(signature[1:65], response_hash)
        self.response_hashes.append(response_hash)
        return plaintext

    def check_receipt(self, receipt: dict[str, Any]) -> None:
        """The receipt binds this request and every answer's hash in order."""
        unsigned = {k: v for k, v in receipt.items() if k != "signature"}
        digest = blake2b_256(json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
        signature = unb64(receipt["signature"])
        Ed25519PublicKey.from_public_bytes(self.signing_key).verify(signature[1:65], digest)
        assert receipt["request_hash"] == b64(self.request_hash)
        assert receipt["transcript_hash"] == b64(blake2b_256(b"".join(self.response_hashes)))
        assert receipt["events"] == len(self.response_hashes)


class IndependentHybridClient:
    def __init__(self, node) -> None:
        self.node = node

    async def keys(self) -> tuple[bytes, bytes, bytes]:
        """(X25519 key, ML-KEM-768 key, signing key): the lock body and the attestation document."""
        lock = await (await self.node.client.post("/v1/nodes/lock", json={"model": MODEL})).json()
        document = await (await self.node.client.get(f"/v1/attestation?nonce={os.urandom(32).hex()}")).json()
        assert document["kem_public_key"] == lock["kem_public_key"] and document["dh_public_key"] == lock["public_key"]
        return unb64(lock["public_key"]), unb64(lock["kem_public_key"]), unb64(document["signing_public_key"])

    async def seal(self, body: dict[str, Any]) -> tuple[dict[str, Any], Exchange]:
        node_key, kem_key, signing_key = await self.keys()
        assert len(kem_key) == 1184
        client_key = X25519PrivateKey.generate()
        client_public = client_key.public_key().public_bytes_raw()
        x25519_secret = client_key.exchange(X25519PublicKey.from_public_bytes(node_key))
        kem_secret, kem_ciphertext = MLKEM768PublicKey.from_public_bytes(kem_key).encapsulate()
        assert len(kem_ciphertext) == 1088
        salt, nonce = os.urandom(16), os.urandom(12)
        info = b"tee-node/hybrid/v1" + client_public + node_key + hashlib.sha256(kem_ciphertext).digest()
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(kem_secret + x25519_secret)
        plaintext = padded_request(body)
        outer = {
            "ciphertext": b64(AESGCM(key).encrypt(nonce, plaintext, None)),
            "client_dh_public_key": b64(client_public),
            "node_dh_public_key": b64(node_key),
            "kem_ciphertext": b64(kem_ciphertext),
            "nonce": b64(nonce),
            "salt": b64(salt),
            "plaintext_body_hash": b64(blake2b_256(plaintext)),
            "model_name": body["model"],
            "stack_small_id": 0,
            "stream": body.get("stream"),
        }
        return outer, Exchange(key, blake2b_256(plaintext), signing_key)

    async def call(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The answer's plaintexts (one, or one per event), each checked and padded as docs/protocol.md says."""
        outer, exchange = await self.seal(body)
        response = await self.node.post(path, outer)
        assert response.status == 200, await response.text()
        if not body.get("stream"):
            message = await response.json()
            plaintext = exchange.open(message)
            assert len(plaintext) >= 512 and len(plaintext) & (len(plaintext) - 1) == 0  # a 512 * 2^k bucket
            exchange.check_receipt(message["receipt"])
            return [json.loads(plaintext)]
        answers = []
        blocks = (await response.read()).decode().split("\n\n")
        for block in filter(None, blocks):
            event = json.loads(block.removeprefix("data: "))
            plaintext = exchange.open(event)
            assert len(plaintext) % 256 == 0
            answers.append(json.loads(plaintext))
        exchange.check_receipt(event["receipt"])
        return answers


def text_of(answers: list[dict[str, Any]]) -> str:
    out = ""
    for answer in answers:
        for choice in answer.get("choices", []):
            if "delta" in choice:
                out += choice["delta"].get("content", "")
            elif "message" in choice:
                out += choice["message"]["content"]
            else:
                out += choice["text"]
    return out


class RecordingEcho:
    """Wraps the echo engine's calls to keep every request the engine was given."""

    def __init__(self, engine) -> None:
        self.requests: list[dict[str, Any]] = []
        for name in ("chat", "complete", "embed"):
            setattr(engine, name, self._recording(getattr(engine, name)))

    def _recording(self, call):
        async def recorded(request, request_id):
            self.requests.append(json.loads(json.dumps(request)))
            return await call(request, request_id)

        return recorded


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CONFIDENTIAL_CHAT, chat_body(PROMPT)),
        (CONFIDENTIAL_CHAT, chat_body(PROMPT, stream=True)),
        (CONFIDENTIAL_COMPLETIONS, completion_body(PROMPT)),
        (CONFIDENTIAL_COMPLETIONS, completion_body(PROMPT, stream=True)),
    ],
    ids=["chat", "chat-stream", "completions", "completions-stream"],
)
async def test_independent_hybrid_client_completes_hybrid_requests(make_node, path, body):
    node = await make_node()
    engine = RecordingEcho(node.engine)
    answers = await IndependentHybridClient(node).call(path, body)
    assert text_of(answers) == PROMPT
    # The node opened it with the hybrid key, and took the request's padding off before the engine.
    assert node.state.keyring.current.replay_entries == 1
    assert engine.requests and all("obfuscation" not in request for request in engine.requests)
    assert all(isinstance(answer["obfuscation"], str) for answer in answers)  # the answers are padded too


async def test_independent_hybrid_client_embeddings(make_node):
    node = await make_node()
    (answer,) = await IndependentHybridClient(node).call(CONFIDENTIAL_EMBEDDINGS, embedding_body(["alpha beta", "gamma"]))
    assert [item["index"] for item in answer["data"]] == [0, 1]
    assert isinstance(answer["obfuscation"], str)


async def test_our_envelope_and_an_independent_client_derive_the_same_key(make_node):
    """node.envelope's client half, sealed hybrid, opens on the node; the outer JSON has the
    hybrid field with the right size."""
    node = await make_node()
    outer, opener = node.seal(chat_body(PROMPT), hybrid=True, padding=True)
    assert len(unb64(outer["kem_ciphertext"])) == 1088
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    assert response.status == 200
    answer = json.loads(opener.open_response(await response.json()))
    assert answer["choices"][0]["message"]["content"] == PROMPT


# --- refusals -----------------------------------------------------------------------------------


async def expect(node, outer: dict[str, Any], status: int, code: str) -> None:
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    body = await response.json()
    assert (response.status, body["error"]["code"]) == (status, code), body


def with_kem(outer: dict[str, Any], value: Any) -> dict[str, Any]:
    return {**outer, "kem_ciphertext": value}


@pytest.mark.parametrize(
    "value",
    [b64(bytes(1087)), b64(bytes(1089)), b64(bytes(2176)), "", b64(bytes(32)), 1088, [], "not base64!", b64(bytes(1088)).rstrip("=") + "A"],
    ids=["1087", "1089", "2176", "empty", "32", "number", "list", "not-base64", "noncanonical"],
)
async def test_kem_ciphertext_of_wrong_length_or_form_is_invalid_body(make_node, value):
    node = await make_node()
    outer, _ = node.seal(chat_body("refused"), hybrid=True)
    await expect(node, with_kem(outer, value), 400, "INVALID_BODY")
    assert node.state.keyring.current.replay_entries == 0
    await node.chat_ok()


def flipped(text: str, index: int) -> str:
    data = bytearray(unb64(text))
    data[index] ^= 0x01
    return b64(bytes(data))


async def test_kem_ciphertext_of_valid_length_but_wrong_fails_decryption(make_node):
    node = await make_node()
    other_kem_key = MLKEM768PrivateKey.generate().public_key()
    cases = {
        "random": lambda outer: with_kem(outer, b64(os.urandom(1088))),
        "one bit flipped": lambda outer: with_kem(outer, flipped(outer["kem_ciphertext"], 500)),
        "to another ML-KEM key": lambda outer: with_kem(outer, b64(other_kem_key.encapsulate()[1])),
        "removed": lambda outer: {k: v for k, v in outer.items() if k != "kem_ciphertext"},
        "null": lambda outer: with_kem(outer, None),
    }
    for mutate in cases.values():
        outer, _ = node.seal(chat_body("refused"), hybrid=True)
        await expect(node, mutate(outer), 400, "DECRYPTION_FAILED")
    # A v1 request given a KEM ciphertext derives another key: refused just as well.
    outer, _ = node.seal(chat_body("refused"))
    await expect(node, with_kem(outer, b64(os.urandom(1088))), 400, "DECRYPTION_FAILED")
    assert node.state.keyring.current.replay_entries == 0
    await node.chat_ok()


async def test_hybrid_key_binds_the_client_key_bytes(make_node):
    """Flipping the ignored top bit of the client key keeps the X25519 secret (RFC 7748) but
    not the hybrid key: its info carries the key's bytes."""
    node = await make_node()
    outer, _ = node.seal(chat_body("refused"), hybrid=True)
    key = bytearray(unb64(outer["client_dh_public_key"]))
    key[31] ^= 0x80
    await expect(node, {**outer, "client_dh_public_key": b64(bytes(key))}, 400, "DECRYPTION_FAILED")


async def test_replayed_hybrid_request_is_refused(make_node):
    node = await make_node()
    outer, opener = node.seal(chat_body("once only"), hybrid=True)
    first = await node.post(CONFIDENTIAL_CHAT, outer)
    assert first.status == 200
    opener.open_response(await first.json())
    await expect(node, outer, 409, "REPLAYED_REQUEST")
    # Changing the KEM ciphertext changes the replay identity, but also the key: not a way in.
    await expect(node, with_kem(outer, flipped(outer["kem_ciphertext"], 0)), 400, "DECRYPTION_FAILED")
    assert node.state.keyring.current.replay_entries == 1


async def test_previous_epoch_ml_kem_key_serves_its_overlap(make_node):
    node = await make_node()
    outer, opener = node.seal(chat_body("sealed before the rotation"), hybrid=True)
    old_kem_key = node.state.keyring.current.kem_public_key
    node.state.keyring.rotate()
    assert node.state.keyring.current.kem_public_key != old_kem_key
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    assert response.status == 200
    assert json.loads(opener.open_response(await response.json()))["choices"][0]["message"]["content"] == "sealed before the rotation"


async def test_stale_key_body_and_lock_carry_the_current_ml_kem_key(make_node):
    node = await make_node()
    outer, _ = node.seal(chat_body("stale"), hybrid=True)
    keyring = node.state.keyring
    keyring.rotate()
    keyring.rotate()
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    error = (await response.json())["error"]
    assert (response.status, error["code"]) == (422, "STALE_NODE_KEY")
    assert unb64(error["kem_public_key"]) == keyring.current.kem_public_key
    assert unb64(error["node_dh_public_key"]) == keyring.current.public_key
    lock = await (await node.client.post("/v1/nodes/lock", json={"model": MODEL})).json()
    assert unb64(lock["kem_public_key"]) == keyring.current.kem_public_key


async def test_attestation_binds_the_ml_kem_key(make_node):
    node = await make_node()
    nonce = os.urandom(32)
    document = await (await node.client.get(f"/v1/attestation?nonce={nonce.hex()}")).json()
    verified = verify_document(document, expected_nonce=nonce, policy=Policy(allow_simulated=True))
    assert verified.kem_public_key == node.state.keyring.current.kem_public_key
    # Another ML-KEM key in the document no longer matches report_data.
    document["kem_public_key"] = b64(MLKEM768PrivateKey.generate().public_key().public_bytes_raw())
    with pytest.raises(ReportDataMismatch):
        verify_document(document, expected_nonce=nonce, policy=Policy(allow_simulated=True))
