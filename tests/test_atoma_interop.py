"""The real atoma-sdk 0.1.3 (own venv, driven by tests/atoma_driver.py) against our envelope.

No node server: requests sealed by the SDK's `encrypt_message` are opened by node.envelope,
responses sealed by node.envelope are opened by the SDK's `decrypt_message`. The last tests
put the SDK's whole client (lock call, HTTP, SSE parsing, decryption) in front of a small
stdlib HTTP stub that answers with node.envelope, which also checks the driver's `chat`,
`embeddings` and `lock` commands that the server tests rely on.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from atoma import run_driver, run_driver_lines

from node.envelope import decode_request, open_request, parse_request
from node.keys import KeyRing, Signer
from node.protocol import Usage

pytestmark = pytest.mark.usefixtures("atoma_sdk")

MODEL = "m/x"
USAGE = Usage.from_openai({"prompt_tokens": 7, "completion_tokens": 3}).model_dump()


@pytest.fixture
def node():
    return KeyRing(), Signer.generate()


def sdk_encrypt(keyring: KeyRing, **spec) -> dict:
    out = run_driver(["encrypt"], {"node_public_key": keyring.current.public_key_b64, "model": MODEL, **spec})
    assert out["ok"], out
    return out


def sdk_decrypt(sealed: dict, keyring: KeyRing, response: dict, stream_event: bool = False) -> dict:
    return run_driver(
        ["decrypt"],
        {
            "client_private_key": sealed["client_private_key"],
            "node_public_key": keyring.current.public_key_b64,
            "salt": sealed["salt"],
            "response": response,
            "stream_event": stream_event,
        },
    )


def open_sdk_request(sealed: dict, keyring: KeyRing, signer: Signer):
    return open_request(decode_request(parse_request(sealed["body"].encode())), keyring, signer)


@pytest.mark.parametrize(
    ("kind", "params", "stream", "units"),
    [
        ("chat", {"max_tokens": 16, "messages": [{"role": "user", "content": "Héllo ✓"}]}, False, 16),
        ("chat_stream", {"max_tokens": 8}, True, 8),
        ("embeddings", {"input": ["a", "b"]}, False, None),
        # The SDK sends no num_compute_units for images (its request has no width or height).
        ("images", {"prompt": "a cat", "n": 2, "size": "64x64"}, False, None),
    ],
)
def test_sdk_request_opens_with_our_envelope(node, kind, params, stream, units):
    keyring, signer = node
    sealed = sdk_encrypt(keyring, kind=kind, params=params, stack_small_id=5)
    assert sealed["lock_request"] == {"model": MODEL}
    request = parse_request(sealed["body"].encode())
    # Outer fields exactly as the SDK put them on the wire.
    assert (request.model_name, request.stack_small_id, request.stream, request.num_compute_units) == (
        MODEL,
        5,
        stream,
        units,
    )
    opened = open_request(decode_request(request), keyring, signer)
    assert opened.plaintext == sealed["plaintext"].encode("utf-8")
    body = json.loads(opened.plaintext)
    assert body["model"] == MODEL
    if kind.startswith("chat"):
        assert body["stream"] is stream
    assert opened.key is keyring.current
    assert base64.b64encode(opened.request_hash).decode() == sealed["request"]["plaintext_body_hash"]


def test_our_response_opens_with_sdk_decrypt(node):
    keyring, signer = node
    sealed = sdk_encrypt(keyring)
    opened = open_sdk_request(sealed, keyring, signer)
    plaintext = json.dumps({"object": "chat.completion", "choices": [{"message": {"content": "Hé"}}]}).encode()
    response = opened.sealer.seal_response(plaintext, MODEL, USAGE)
    out = sdk_decrypt(sealed, keyring, response)
    assert out["ok"], out
    assert base64.b64decode(out["plaintext_b64"]) == plaintext


def test_our_stream_events_open_with_sdk_decrypt(node):
    keyring, signer = node
    sealed = sdk_encrypt(keyring, kind="chat_stream")
    sealer = open_sdk_request(sealed, keyring, signer).sealer
    chunk = b'{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"}}]}'
    event = sealer.seal_event(chunk)
    out = sdk_decrypt(sealed, keyring, event, stream_event=True)
    assert out["ok"], out
    assert base64.b64decode(out["plaintext_b64"]) == chunk
    final = sealer.seal_final_event(b'{"choices":[]}', MODEL, USAGE)
    out = sdk_decrypt(sealed, keyring, final, stream_event=True)
    assert out["ok"] and base64.b64decode(out["plaintext_b64"]) == b'{"choices":[]}', out


def test_our_padded_answers_open_with_sdk_decrypt(node):
    """the protocol's length hiding is inside the plaintext: the SDK decrypts and
    hash-checks padded answers like any other, and an OpenAI-shaped parser ignores the field."""
    keyring, signer = node
    sealed = sdk_encrypt(keyring, kind="chat_stream")
    sealer = open_sdk_request(sealed, keyring, signer).sealer
    sealer.padding = True
    chunk = b'{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"}}]}'
    out = sdk_decrypt(sealed, keyring, sealer.seal_event(chunk), stream_event=True)
    assert out["ok"], out
    padded = base64.b64decode(out["plaintext_b64"])
    assert len(padded) == 256 and json.loads(padded)["choices"] == json.loads(chunk)["choices"]
    sealed = sdk_encrypt(keyring)
    sealer = open_sdk_request(sealed, keyring, signer).sealer
    sealer.padding = True
    plaintext = b'{"object":"chat.completion","choices":[{"message":{"content":"H\xc3\xa9"}}]}'
    out = sdk_decrypt(sealed, keyring, sealer.seal_response(plaintext, MODEL, USAGE))
    assert out["ok"], out
    padded = base64.b64decode(out["plaintext_b64"])
    assert len(padded) == 512 and json.loads(padded)["choices"] == json.loads(plaintext)["choices"]


def test_sdk_refuses_tampered_hash_and_ciphertext(node):
    keyring, signer = node
    sealed = sdk_encrypt(keyring)
    response = open_sdk_request(sealed, keyring, signer).sealer.seal_response(b'{"ok":1}', MODEL, USAGE)
    wrong_hash = bytearray(base64.b64decode(response["response_hash"]))
    wrong_hash[0] ^= 1
    out = sdk_decrypt(sealed, keyring, {**response, "response_hash": base64.b64encode(bytes(wrong_hash)).decode()})
    assert not out["ok"] and "hash verification failed" in out["error"], out
    ct = bytearray(base64.b64decode(response["ciphertext"]))
    ct[0] ^= 1
    out = sdk_decrypt(sealed, keyring, {**response, "ciphertext": base64.b64encode(bytes(ct)).decode()})
    assert not out["ok"] and "plaintext" not in out, out


# --- the whole SDK client against a stdlib stub that answers with node.envelope --------------


def _stub_server(keyring: KeyRing, signer: Signer):
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "x": self.headers.get("X-Test")})
            if self.path == "/v1/nodes/lock":
                key = keyring.current
                return self._json(200, {"public_key": key.public_key_b64, "node_small_id": 1,
                                        "stack_entry_digest": None, "stack_small_id": 3})
            if self.headers.get("Authorization") != "Bearer tok":
                return self._json(401, {"error": {"code": "UNAUTHORIZED", "message": "missing or unknown bearer token"}})
            opened = open_request(decode_request(parse_request(body)), keyring, signer)
            request = json.loads(opened.plaintext)
            if self.path == "/v1/confidential/embeddings":
                answer = {"object": "list", "model": MODEL, "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25, 1.0]}],
                          "usage": {"prompt_tokens": 1, "total_tokens": 1}}
                return self._json(200, opened.sealer.seal_response(json.dumps(answer).encode(), MODEL, USAGE))
            words = ["Hé", "llo", " ✓"]
            if not request.get("stream"):
                answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": MODEL,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
                return self._json(200, opened.sealer.seal_response(json.dumps(answer).encode(), MODEL, USAGE))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: closing the connection ends the stream (no [DONE])
            for word in words:
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                         "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                event = opened.sealer.seal_event(json.dumps(chunk).encode())
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            final = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "choices": [],
                     "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
            event = opened.sealer.seal_final_event(json.dumps(final).encode(), MODEL, USAGE)
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture
def stub(node):
    keyring, signer = node
    server, seen = _stub_server(keyring, signer)
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode", [[], ["--async"]])
def test_sdk_client_chat_against_stub(stub, mode):
    url, seen = stub
    out = run_driver(["chat", "--url", url, "--token", "tok", "--max-tokens", "4", "--header", "X-Test=1", *mode])
    assert out["ok"], out
    assert out["content"] == "Héllo ✓"
    assert out["response"]["usage"]["total_tokens"] == 10
    assert [s["path"] for s in seen] == ["/v1/nodes/lock", "/v1/confidential/chat/completions"]
    assert seen[1]["auth"] == "Bearer tok" and seen[1]["x"] == "1"


@pytest.mark.parametrize("mode", [[], ["--async"]])
def test_sdk_client_stream_against_stub(stub, mode):
    url, _ = stub
    lines = run_driver_lines(["chat", "--url", url, "--token", "tok", "--stream", *mode])
    *chunks, summary = lines
    assert summary == {"ok": True, "done": True, "chunks": 3, "content": "Héllo ✓"}
    # The final chunk (empty choices, usage + receipt) decrypts but the SDK skips it.
    assert [c["chunk"]["choices"][0]["delta"]["content"] for c in chunks] == ["Hé", "llo", " ✓"]


def test_sdk_client_embeddings_lock_and_error_against_stub(stub):
    url, _ = stub
    out = run_driver(["embeddings", "--url", url, "--token", "tok", "--input", "a"])
    assert out["ok"] and out["dimensions"] == 3, out
    out = run_driver(["lock", "--url", url, "--model", MODEL])
    assert out["ok"] and out["response"]["stack_small_id"] == 3, out
    out = run_driver(["chat", "--url", url, "--token", "wrong"])
    assert out["ok"] is False and out["status_code"] == 401 and "UNAUTHORIZED" in out["body"], out
