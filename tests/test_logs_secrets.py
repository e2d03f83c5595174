"""No plaintext, key material or ciphertext in the logs (every logger at DEBUG, aiohttp's too)
through full request/response cycles, streaming and not, and every error path; error bodies
carry none either.

The node's X25519 private keys are not reachable from outside (the keyring exposes public keys
only), so what is checked is every secret a test can know: the distinctive prompt and the
answer's words, the plaintext's base64 and hex, the client's private key, the shared secret,
the derived AES key, and every ciphertext (request and response) in base64, hex and prefixes.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from server_support import (
    CONFIDENTIAL_CHAT,
    CONFIDENTIAL_COMPLETIONS,
    CONFIDENTIAL_EMBEDDINGS,
    MODEL,
    SSE,
    GatedEcho,
    RaisingEcho,
    Sealed,
    chat_body,
    compact,
    completion_body,
    embedding_body,
    next_block,
    seal_with_secrets,
    wait_for,
)

from node.crypto import Aead, b64d, b64e, blake2b_256
from node.keys import Signer

SECRET = "xylophone-marmalade-4471"
PROMPT = f"{SECRET} whispers {SECRET}-confidential"
TOKEN = "log-test-token"
PROXY = Signer.generate()


class Secrets:
    """Every string that must never show up, in the encodings a careless log line would use."""

    def __init__(self) -> None:
        self.strings: set[str] = {SECRET}

    def add_bytes(self, data: bytes, prefixes: bool = False) -> None:
        encodings = [
            b64e(data),
            base64.urlsafe_b64encode(data).decode(),
            data.hex(),
            repr(data)[2:-1],
        ]
        for text in encodings:
            if len(text) >= 12:
                self.strings.add(text)
                if prefixes:
                    self.strings.add(text[:24])
                    self.strings.add(text[-24:])

    def add_sealed(self, sealed: Sealed) -> None:
        self.add_bytes(sealed.plaintext, prefixes=True)
        self.add_bytes(sealed.client_private_key)
        self.add_bytes(sealed.shared_secret)
        self.add_bytes(sealed.aes_key)
        self.add_bytes(b64d(sealed.outer["ciphertext"]), prefixes=True)
        if sealed.kem_shared_secret is not None:
            self.add_bytes(sealed.kem_shared_secret)
            self.add_bytes(b64d(sealed.outer["kem_ciphertext"]), prefixes=True)

    def add_answer(self, sealed: Sealed, message: dict) -> None:
        """A response or event: its ciphertext and the plaintext it decrypts to."""
        if "ciphertext" not in message:
            return
        ciphertext = b64d(message["ciphertext"])
        self.add_bytes(ciphertext, prefixes=True)
        plaintext = Aead(sealed.aes_key).decrypt(b64d(message["nonce"]), ciphertext)
        assert plaintext is not None
        self.add_bytes(plaintext, prefixes=True)

    def check(self, text: str, where: str) -> None:
        leaked = sorted(s for s in self.strings if s in text)
        assert not leaked, f"{where} contains secrets: {leaked[:3]}"


@pytest.fixture
def secrets() -> Secrets:
    return Secrets()


class Driver:
    def __init__(self, node, secrets: Secrets) -> None:
        self.node = node
        self.secrets = secrets
        self.statuses: list[int] = []

    def seal(self, payload, model_name: str | None = None, node_key: bytes | None = None, hybrid: bool = False) -> Sealed:
        plaintext = payload if isinstance(payload, bytes) else compact(payload)
        stream = payload.get("stream") if isinstance(payload, dict) else None
        kem_key = self.node.state.keyring.current.kem_public_key if hybrid else None
        sealed = seal_with_secrets(
            plaintext, node_key or self.node.current_key, model_name or MODEL, stream=stream, kem_public_key=kem_key
        )
        self.secrets.add_sealed(sealed)
        return sealed

    async def send(self, path: str, sealed_or_body, headers: dict | None = None) -> tuple[int, bytes]:
        """Post; record any answer's secrets; check an error body for secrets; return it."""
        outer = sealed_or_body.outer if isinstance(sealed_or_body, Sealed) else sealed_or_body
        response = await self.node.post(path, outer, headers)
        raw = await response.read()
        self.statuses.append(response.status)
        if isinstance(sealed_or_body, Sealed) and response.status == 200:
            messages = SSE.parse(raw).events if response.headers["Content-Type"].startswith("text/event-stream") else [json.loads(raw)]
            for message in messages:
                if isinstance(message, dict):
                    self.secrets.add_answer(sealed_or_body, message)
        if response.status != 200:
            body = json.loads(raw)
            assert set(body) == {"error"}
            self.secrets.check(raw.decode(), f"error body {response.status}")
        return response.status, raw


def flip(value: str, index: int = 0) -> str:
    data = bytearray(b64d(value))
    data[index] ^= 1
    return b64e(bytes(data))


async def test_full_cycles_and_every_error_path(make_node, all_logs, secrets):
    node = await make_node(GatedEcho())
    d = Driver(node, secrets)

    # successful cycles: chat, chat stream, completions, completions stream, embeddings
    assert (await d.send(CONFIDENTIAL_CHAT, d.seal(chat_body(PROMPT))))[0] == 200
    assert (await d.send(CONFIDENTIAL_CHAT, d.seal(chat_body(PROMPT, stream=True))))[0] == 200
    assert (await d.send(CONFIDENTIAL_COMPLETIONS, d.seal(completion_body(PROMPT))))[0] == 200
    assert (await d.send(CONFIDENTIAL_COMPLETIONS, d.seal(completion_body(PROMPT, stream=True))))[0] == 200
    assert (await d.send(CONFIDENTIAL_EMBEDDINGS, d.seal(embedding_body(PROMPT))))[0] == 200

    # envelope errors
    sealed = d.seal(chat_body(PROMPT))
    o = sealed.outer
    for outer, status in [
        ({**o, "ciphertext": flip(o["ciphertext"])}, 400),  # DECRYPTION_FAILED
        ({**o, "nonce": flip(o["nonce"])}, 400),
        ({**o, "plaintext_body_hash": b64e(blake2b_256(b"x"))}, 400),  # HASH_MISMATCH
        ({**o, "salt": "!!"}, 400),  # INVALID_BODY
        ({**o, "stack_small_id": PROMPT}, 400),  # wrong type, the value is the secret
        ({**o, "node_dh_public_key": b64e(bytes(range(32)))}, 422),  # STALE_NODE_KEY
    ]:
        assert (await d.send(CONFIDENTIAL_CHAT, outer))[0] == status
    assert (await d.send(CONFIDENTIAL_CHAT, sealed))[0] == 200
    assert (await d.send(CONFIDENTIAL_CHAT, sealed))[0] == 409  # REPLAYED_REQUEST
    other = d.seal(chat_body(PROMPT))
    assert (await d.send(CONFIDENTIAL_CHAT, {**other.outer, "model_name": "other"}))[0] == 404

    # malformed outer JSON quoting the secret
    assert (await d.send(CONFIDENTIAL_CHAT, f'{{"ciphertext": "{PROMPT}'.encode()))[0] == 400
    assert (await d.send(CONFIDENTIAL_CHAT, json.dumps({"ciphertext": PROMPT}).encode()))[0] == 400
    # plaintext errors: not JSON, not the schema (validators quote inputs), unknown model
    assert (await d.send(CONFIDENTIAL_CHAT, d.seal(PROMPT.encode())))[0] == 400
    assert (await d.send(CONFIDENTIAL_CHAT, d.seal({"model": MODEL, "messages": PROMPT})))[0] == 400
    assert (await d.send(CONFIDENTIAL_CHAT, d.seal(chat_body(PROMPT, max_tokens=PROMPT))))[0] == 400
    assert (await d.send(CONFIDENTIAL_CHAT, d.seal(chat_body(PROMPT, stream=True, stream_options=PROMPT))))[0] == 400
    assert (await d.send(CONFIDENTIAL_CHAT, d.seal(chat_body(PROMPT, model="nope"), model_name="nope")))[0] == 404
    assert (await d.send("/v1/nodes/lock", json.dumps({"model": PROMPT}).encode()))[0] == 404
    assert (await d.send("/v1/nodes/lock", json.dumps({"model": MODEL, "timeout": PROMPT}).encode()))[0] == 400

    # a client that goes away mid-stream
    node.engine.token_delay = 0.01
    sealed = d.seal(chat_body(" ".join([PROMPT] * 300), stream=True))
    response = await node.post(CONFIDENTIAL_CHAT, sealed.outer)
    first = json.loads((await next_block(response))[len("data: ") :])
    secrets.add_answer(sealed, first)
    response.close()
    await wait_for(lambda: not node.engine.running, what="abort")
    node.engine.token_delay = 0

    # NOT_READY
    await node.engine.stop()
    assert (await d.send(CONFIDENTIAL_CHAT, d.seal(chat_body(PROMPT))))[0] == 503
    await node.engine.start()
    assert (await d.send(CONFIDENTIAL_CHAT, d.seal(chat_body(PROMPT))))[0] == 200

    assert {200, 400, 404, 409, 422, 503} <= set(d.statuses)
    logs = all_logs()
    # the capture works: access lines of successes and refusals are there
    for status in (200, 400, 404, 409, 422, 499, 503):
        assert f"route={CONFIDENTIAL_CHAT} model=" in logs and f"status={status} " in logs, status
    secrets.check(logs, "logs")


async def test_hybrid_cycles_and_their_errors(make_node, all_logs, secrets):
    """docs/protocol.md: the ML-KEM secret and ciphertext join the secrets that never show."""
    node = await make_node(GatedEcho())
    d = Driver(node, secrets)
    assert (await d.send(CONFIDENTIAL_CHAT, d.seal(chat_body(PROMPT), hybrid=True)))[0] == 200
    assert (await d.send(CONFIDENTIAL_CHAT, d.seal(chat_body(PROMPT, stream=True), hybrid=True)))[0] == 200
    sealed = d.seal(chat_body(PROMPT), hybrid=True)
    o = sealed.outer
    for outer in (
        {**o, "kem_ciphertext": flip(o["kem_ciphertext"], 77)},  # DECRYPTION_FAILED
        {**o, "kem_ciphertext": o["kem_ciphertext"][:-8]},  # INVALID_BODY (base64 of another length)
        {k: v for k, v in o.items() if k != "kem_ciphertext"},  # DECRYPTION_FAILED
        {**o, "kem_ciphertext": PROMPT},  # INVALID_BODY, the value is the secret
    ):
        assert (await d.send(CONFIDENTIAL_CHAT, outer))[0] == 400
    assert (await d.send(CONFIDENTIAL_CHAT, sealed))[0] == 200
    assert (await d.send(CONFIDENTIAL_CHAT, sealed))[0] == 409
    logs = all_logs()
    assert f"route={CONFIDENTIAL_CHAT} model=" in logs
    secrets.check(logs, "logs")


async def test_auth_signature_size_and_overload_paths(make_node, all_logs, secrets):
    engine = GatedEcho()
    node = await make_node(
        engine,
        auth={"api_token_sha256": [hashlib.sha256(TOKEN.encode()).hexdigest()], "trusted_proxy_keys": [PROXY.public_key_b64]},
        limits={"max_body_bytes": 4096, "max_in_flight": 1, "max_queue": 0},
    )
    d = Driver(node, secrets)
    secrets.strings.add(TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    sealed = d.seal(chat_body(PROMPT))
    signature = {"X-Signature": PROXY.sign_b64(b64d(sealed.outer["plaintext_body_hash"]))}
    assert (await d.send(CONFIDENTIAL_CHAT, sealed))[0] == 401  # no token
    assert (await d.send(CONFIDENTIAL_CHAT, sealed, {"Authorization": f"Bearer {SECRET}"}))[0] == 401
    assert (await d.send(CONFIDENTIAL_CHAT, sealed, auth))[0] == 401  # no signature
    assert (await d.send(CONFIDENTIAL_CHAT, sealed, {**auth, "X-Signature": SECRET}))[0] == 401
    assert (await d.send(CONFIDENTIAL_CHAT, sealed, {**auth, **signature}))[0] == 200
    big = d.seal(chat_body(" ".join([PROMPT] * 200)))
    assert (await d.send(CONFIDENTIAL_CHAT, big, auth))[0] == 413

    engine.gate.clear()
    holder = d.seal(chat_body(PROMPT, stream=True))
    sig = {"X-Signature": PROXY.sign_b64(b64d(holder.outer["plaintext_body_hash"]))}
    response = await node.post(CONFIDENTIAL_CHAT, holder.outer, {**auth, **sig})
    assert response.status == 200
    queued = d.seal(chat_body(PROMPT))
    sig2 = {"X-Signature": PROXY.sign_b64(b64d(queued.outer["plaintext_body_hash"]))}
    assert (await d.send(CONFIDENTIAL_CHAT, queued, {**auth, **sig2}))[0] == 429
    engine.gate.set()
    for event in SSE.parse(await response.read()).events:
        secrets.add_answer(holder, event)
    secrets.check(all_logs(), "logs")


@pytest.mark.parametrize("in_stream", [False, True], ids=["call", "mid-stream"])
async def test_unexpected_engine_errors_quoting_the_prompt(make_node, all_logs, secrets, in_stream):
    """Exception messages can quote the input: the node logs their type and location only."""
    engine = RaisingEcho(ValueError(f"cannot handle {PROMPT}"))
    engine.fail_in_stream = in_stream
    node = await make_node(engine)
    d = Driver(node, secrets)
    status, raw = await d.send(CONFIDENTIAL_CHAT, d.seal(chat_body(PROMPT, stream=in_stream)))
    if in_stream:
        assert status == 200
        assert SSE.parse(raw).events[-1] == {"error": {"code": "INTERNAL_ERROR", "message": "engine failed"}}
    else:
        assert status == 500
    logs = all_logs()
    assert "ValueError" in logs  # the failure is logged, by type
    secrets.check(logs, "logs")


async def test_engine_failure_mid_stream_logs_no_secrets(make_node, all_logs, secrets):
    node = await make_node(GatedEcho(fail_after_tokens=1))
    d = Driver(node, secrets)
    status, raw = await d.send(CONFIDENTIAL_CHAT, d.seal(chat_body(PROMPT, stream=True)))
    assert status == 200
    error_event = SSE.parse(raw).events[-1]
    assert error_event == {"error": {"code": "INTERNAL_ERROR", "message": "engine failed"}}
    secrets.check(all_logs(), "logs")


async def test_repr_of_envelope_objects_hide_secrets(node_client, secrets):
    """What a stray `log.debug("%r", obj)` would print."""
    from node import envelope

    d = Driver(node_client, secrets)
    sealed = d.seal(chat_body(PROMPT))
    decoded = envelope.decode_request(envelope.parse_request(compact(sealed.outer)))
    opened = envelope.open_request(decoded, node_client.state.keyring, node_client.state.signer)
    texts = [repr(opened), repr(opened.sealer), repr(node_client.state.keyring), repr(opened.key), repr(node_client.state.signer), repr(sealed.opener)]
    for text in texts:
        secrets.check(text, "repr")
    assert repr(Aead(sealed.aes_key)) == "Aead(<key hidden>)"
    # the public keys are what the reprs show
    assert node_client.state.keyring.current.public_key_b64 in repr(opened.key)
