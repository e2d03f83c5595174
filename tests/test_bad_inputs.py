"""A corpus of bad inputs, one table: each case sends something wrong to a real loopback node
(echo engine) and asserts the exact status and code of the protocol's error table, that the
body carries only public fields, and that afterwards nothing is held (no slot, no engine
request) and a good request still succeeds."""

from __future__ import annotations

import base64
import hashlib
import json
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from node.crypto import b64d, b64e
from node.keys import Signer
from reliability import CHAT, COMPLETIONS, EMBEDDINGS, MODEL, ServerThread, chat, compact, error_of, node_config

READ_TIMEOUT = 0.5
MAX_BODY = 64 * 1024
TOKEN = "reliability-token"
PROXY = Signer.generate()

Answer = tuple[int, dict[str, str], bytes]


@pytest.fixture(scope="module")
def plain_node():
    config = node_config(limits={"read_timeout": READ_TIMEOUT, "max_body_bytes": MAX_BODY, "max_in_flight": 4})
    with ServerThread(config) as node:
        yield node


@pytest.fixture(scope="module")
def auth_node():
    config = node_config(
        auth={"api_token_sha256": [hashlib.sha256(TOKEN.encode()).hexdigest()], "trusted_proxy_keys": [PROXY.public_key_b64]}
    )
    with ServerThread(config) as node:
        yield node


def auth_headers(outer: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "X-Signature": PROXY.sign_b64(b64d(outer["plaintext_body_hash"]))}


# --- building blocks ---------------------------------------------------------------------------


def in_loop(node: ServerThread, fn: Callable[[], Any]) -> Any:
    async def call():
        return fn()

    return node.run(call())


def send(node: ServerThread, body: bytes | dict, path: str = CHAT, headers: dict[str, str] | None = None) -> Answer:
    return node.post(path, body, headers)


def sealed(node: ServerThread, payload: dict | bytes | None = None, model_name: str = MODEL, hybrid: bool = False) -> dict:
    return node.seal(payload if payload is not None else chat("bad input corpus"), model_name, hybrid=hybrid)[0]


def with_fields(**fields: Any) -> Callable[[ServerThread], Answer]:
    return lambda node: send(node, {**sealed(node), **fields})


def without(name: str) -> Callable[[ServerThread], Answer]:
    return lambda node: send(node, {k: v for k, v in sealed(node).items() if k != name})


def transform(name: str, fn: Callable[[str], Any], hybrid: bool = False) -> Callable[[ServerThread], Answer]:
    def case(node: ServerThread) -> Answer:
        outer = sealed(node, hybrid=hybrid)
        return send(node, {**outer, name: fn(outer[name])})

    return case


def hybrid_without_kem_ciphertext(node: ServerThread) -> Answer:
    return send(node, {k: v for k, v in sealed(node, hybrid=True).items() if k != "kem_ciphertext"})


def flip(index: int) -> Callable[[str], str]:
    def fn(value: str) -> str:
        data = bytearray(b64d(value))
        data[index] ^= 0x01
        return b64e(bytes(data))

    return fn


def raw_body(body: bytes, content_type: str = "application/json") -> Callable[[ServerThread], Answer]:
    return lambda node: send(node, body, headers={"Content-Type": content_type})


def body_edit(fn: Callable[[bytes], bytes]) -> Callable[[ServerThread], Answer]:
    return lambda node: send(node, fn(compact(sealed(node))))


def plaintext(data: bytes | dict, model_name: str = MODEL, path: str = CHAT) -> Callable[[ServerThread], Answer]:
    return lambda node: send(node, sealed(node, data if isinstance(data, bytes) else compact(data), model_name), path)


def foreign_key() -> str:
    return b64e(Signer.generate().public_key)  # 32 random-looking bytes: not a key of this node


def stale_key(node: ServerThread) -> Answer:
    """Sealed to a key rotated away (two rotations: neither current nor previous)."""
    outer = sealed(node)
    in_loop(node, node.state.keyring.rotate)
    in_loop(node, node.state.keyring.rotate)
    answer = send(node, outer)
    assert json.loads(answer[2])["error"]["node_dh_public_key"] == b64e(node.node_key)
    return answer


def replay(node: ServerThread, hybrid: bool = False) -> Answer:
    outer = sealed(node, hybrid=hybrid)
    assert send(node, outer)[0] == 200
    return send(node, outer)


def replay_other_encoding(node: ServerThread) -> Answer:
    """The same request with bit 255 of the client key flipped (same X25519 key, other bytes)."""
    outer = sealed(node)
    assert send(node, outer)[0] == 200
    key = bytearray(b64d(outer["client_dh_public_key"]))
    key[31] ^= 0x80
    return send(node, {**outer, "client_dh_public_key": b64e(bytes(key))})


def not_ready(node: ServerThread) -> Answer:
    in_loop(node, lambda: setattr(node.engine, "_ready", False))
    try:
        return send(node, sealed(node))
    finally:
        in_loop(node, lambda: setattr(node.engine, "_ready", True))


def duplicate_key(name: str, first: str, last_value: Callable[[dict], Any]) -> Callable[[ServerThread], Answer]:
    """`name` twice in the outer JSON: the first occurrence good, the last bad (last one wins)."""

    def case(node: ServerThread) -> Answer:
        outer = sealed(node)
        rest = {k: v for k, v in outer.items() if k != name}
        body = b"{" + json.dumps(name).encode() + b":" + json.dumps(outer[name] if first == "good" else "x").encode()
        body += b"," + compact(rest)[1:-1] + b"," + json.dumps(name).encode() + b":" + compact(last_value(outer)) + b"}"
        return send(node, body)

    return case


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def parse_http(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return status, headers, body


def exchange(node: ServerThread, parts: list[bytes], interval: float = 0.0, total: float = 10.0) -> Answer:
    """Send `parts` on a raw socket (`interval` apart) until the node answers; read the answer.
    Send errors are ignored: the node may answer and close before the client is done."""
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=total)
    received = b""
    deadline = time.monotonic() + total
    try:
        for part in parts:
            readable, _, _ = select.select([sock], [], [], interval)
            if readable:
                break
            try:
                sock.sendall(part)
            except OSError:
                break
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                break
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            received += chunk
            if b"\r\n\r\n" in received:
                status, headers, body = parse_http(received)
                if len(body) >= int(headers.get("content-length", 1 << 30)):
                    break
    finally:
        sock.close()
    assert received, "no answer before the deadline"
    return parse_http(received)


def request_head(length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{size}{extra}\r\n".encode()


def slowloris(node: ServerThread) -> Answer:
    """The body one byte every 50 ms (far slower in total than read_timeout); while it dribbles,
    another client is served, and the slow one holds no slot."""
    body = compact(sealed(node))
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    try:
        sock.sendall(request_head(len(body)))
        served_meanwhile = False
        for i in range(len(body)):
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:  # the node answered: stop sending
                break
            sock.sendall(body[i : i + 1])
            if not served_meanwhile:
                node.good_request("served while a slow client dribbles")
                assert node.state.admission.in_flight == 0
                served_meanwhile = True
        else:
            raise AssertionError("the whole body went out before the node gave up on it")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received:
                _, headers, rest = parse_http(received)
                if len(rest) >= int(headers.get("content-length", 1 << 30)):
                    break
        return parse_http(received)
    finally:
        sock.close()


def stalled_body(node: ServerThread) -> Answer:
    """Headers and half the body, then silence: answered once read_timeout passes."""
    body = compact(sealed(node))
    return exchange(node, [request_head(len(body)) + body[: len(body) // 2]], total=10)


def oversized_declared(node: ServerThread) -> Answer:
    return exchange(node, [request_head(MAX_BODY + 1), b"{" + b" " * 1000])


def oversized_chunked(node: ServerThread) -> Answer:
    chunk = b" " * 8192
    parts = [request_head(None)] + [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * ((MAX_BODY // len(chunk)) + 4) + [b"0\r\n\r\n"]
    return exchange(node, parts)


def oversized_plaintext(node: ServerThread) -> Answer:
    return send(node, sealed(node, chat("x " * MAX_BODY)))


# --- the table --------------------------------------------------------------------------------

INVALID = (400, "INVALID_BODY")
DECRYPT = (400, "DECRYPTION_FAILED")
MODEL_404 = (404, "MODEL_NOT_FOUND")

CASES: list[tuple[str, str, Callable[[ServerThread], Answer], tuple[int, str]]] = [
    # outer JSON
    ("empty-body", "plain", raw_body(b""), INVALID),
    ("malformed-json", "plain", raw_body(b'{"ciphertext": "AAAA",'), INVALID),
    ("truncated-sealed-json", "plain", body_edit(lambda b: b[:-7]), INVALID),
    ("trailing-garbage", "plain", body_edit(lambda b: b + b"x"), INVALID),
    ("utf8-bom", "plain", body_edit(lambda b: b"\xef\xbb\xbf" + b), INVALID),
    ("json-array", "plain", raw_body(b"[1, 2, 3]"), INVALID),
    ("json-number", "plain", raw_body(b"42"), INVALID),
    ("json-null", "plain", raw_body(b"null"), INVALID),
    ("json-string", "plain", raw_body(b'"ciphertext"'), INVALID),
    ("missing-salt", "plain", without("salt"), INVALID),
    ("missing-stack-small-id", "plain", without("stack_small_id"), INVALID),
    ("stack-small-id-string", "plain", with_fields(stack_small_id="0"), INVALID),
    ("stack-small-id-negative", "plain", with_fields(stack_small_id=-1), INVALID),
    ("stack-small-id-2^64", "plain", with_fields(stack_small_id=2**64), INVALID),
    ("stack-small-id-1e400", "plain", body_edit(lambda b: b.replace(b'"stack_small_id":0', b'"stack_small_id":1e400')), INVALID),
    ("stack-small-id-float", "plain", with_fields(stack_small_id=1.0), INVALID),
    ("stack-small-id-bool", "plain", with_fields(stack_small_id=True), INVALID),
    ("num-compute-units-negative", "plain", with_fields(num_compute_units=-5), INVALID),
    ("num-compute-units-2^63", "plain", with_fields(num_compute_units=2**63), INVALID),
    ("stream-not-bool", "plain", with_fields(stream="yes"), INVALID),
    ("model-name-number", "plain", with_fields(model_name=7), INVALID),
    ("ciphertext-object", "plain", with_fields(ciphertext={"b64": "AAAA"}), INVALID),
    # base64 and lengths
    ("nonce-not-base64", "plain", with_fields(nonce="!!!!not base64!!"), INVALID),
    ("salt-unpadded", "plain", transform("salt", lambda v: v.rstrip("=")), INVALID),
    ("salt-extra-padding", "plain", transform("salt", lambda v: v + "=="), INVALID),
    ("hash-urlsafe-alphabet", "plain", with_fields(plaintext_body_hash=b64e(b"\xfb\xff" * 16).replace("+", "-").replace("/", "_")), INVALID),
    ("salt-noncanonical-trailing-bits", "plain", transform("salt", lambda v: v[:-3] + "B=="), INVALID),
    ("nonce-with-newline", "plain", transform("nonce", lambda v: v[:8] + "\n" + v[8:]), INVALID),
    ("nonce-11-bytes", "plain", with_fields(nonce=b64e(bytes(11))), INVALID),
    ("client-key-31-bytes", "plain", with_fields(client_dh_public_key=b64e(bytes(range(31)))), INVALID),
    ("hash-33-bytes", "plain", with_fields(plaintext_body_hash=b64e(bytes(33))), INVALID),
    ("ciphertext-shorter-than-tag", "plain", with_fields(ciphertext=b64e(bytes(15))), INVALID),
    ("ciphertext-empty", "plain", with_fields(ciphertext=""), INVALID),
    # hybrid: the ML-KEM-768 ciphertext
    ("kem-ciphertext-1087-bytes", "plain", transform("kem_ciphertext", lambda v: b64e(b64d(v)[:-1]), hybrid=True), INVALID),
    ("kem-ciphertext-1089-bytes", "plain", transform("kem_ciphertext", lambda v: b64e(b64d(v) + b"\x00"), hybrid=True), INVALID),
    ("kem-ciphertext-empty", "plain", with_fields(kem_ciphertext=""), INVALID),
    ("kem-ciphertext-not-base64", "plain", transform("kem_ciphertext", lambda v: "!" + v[1:], hybrid=True), INVALID),
    ("kem-ciphertext-number", "plain", with_fields(kem_ciphertext=1088), INVALID),
    ("kem-ciphertext-object", "plain", with_fields(kem_ciphertext={"b64": "AAAA"}), INVALID),
    # tampering
    ("tampered-ciphertext", "plain", transform("ciphertext", flip(0)), DECRYPT),
    ("tampered-tag", "plain", transform("ciphertext", flip(-1)), DECRYPT),
    ("tampered-nonce", "plain", transform("nonce", flip(3)), DECRYPT),
    ("tampered-salt", "plain", transform("salt", flip(15)), DECRYPT),
    ("foreign-client-key", "plain", with_fields(client_dh_public_key=foreign_key()), DECRYPT),
    ("tampered-kem-ciphertext", "plain", transform("kem_ciphertext", flip(100), hybrid=True), DECRYPT),
    ("kem-ciphertext-of-zeros", "plain", transform("kem_ciphertext", lambda v: b64e(bytes(1088)), hybrid=True), DECRYPT),
    ("kem-ciphertext-on-x25519-request", "plain", with_fields(kem_ciphertext=b64e(bytes(1088))), DECRYPT),
    ("hybrid-request-without-kem-ciphertext", "plain", hybrid_without_kem_ciphertext, DECRYPT),
    ("low-order-client-key", "plain", with_fields(client_dh_public_key=b64e(bytes(32))), DECRYPT),
    ("wrong-hash", "plain", transform("plaintext_body_hash", flip(0)), (400, "HASH_MISMATCH")),
    ("hash-of-empty-plaintext", "plain", with_fields(plaintext_body_hash=b64e(hashlib.blake2b(b"", digest_size=32).digest())), (400, "HASH_MISMATCH")),
    # keys and replays
    ("foreign-node-key", "plain", with_fields(node_dh_public_key=foreign_key()), (422, "STALE_NODE_KEY")),
    ("stale-node-key", "plain", stale_key, (422, "STALE_NODE_KEY")),
    ("replay", "plain", replay, (409, "REPLAYED_REQUEST")),
    ("replay-hybrid", "plain", lambda node: replay(node, hybrid=True), (409, "REPLAYED_REQUEST")),
    ("replay-other-client-key-encoding", "plain", replay_other_encoding, (409, "REPLAYED_REQUEST")),
    # sizes and slow clients
    ("oversized-content-length", "plain", oversized_declared, (413, "BODY_TOO_LARGE")),
    ("oversized-chunked", "plain", oversized_chunked, (413, "BODY_TOO_LARGE")),
    ("oversized-sealed-plaintext", "plain", oversized_plaintext, (413, "BODY_TOO_LARGE")),
    ("slowloris-body", "plain", slowloris, INVALID),
    ("stalled-body", "plain", stalled_body, INVALID),
    # the plaintext
    ("plaintext-not-json", "plain", plaintext(b"model=echo-model&messages=hi"), INVALID),
    ("plaintext-invalid-utf8", "plain", plaintext(b'{"model":"echo-model","messages":[{"role":"user","content":"\xc0\xaf"}]}'), INVALID),
    ("plaintext-array", "plain", plaintext(b"[]"), INVALID),
    ("plaintext-no-messages", "plain", plaintext({"model": MODEL}), INVALID),
    ("plaintext-empty-messages", "plain", plaintext({"model": MODEL, "messages": []}), INVALID),
    ("plaintext-message-without-role", "plain", plaintext({"model": MODEL, "messages": [{"content": "hi"}]}), INVALID),
    ("plaintext-max-tokens-zero", "plain", plaintext(chat("hi", max_tokens=0)), INVALID),
    ("plaintext-max-tokens-2^40", "plain", plaintext(chat("hi", max_tokens=2**40)), INVALID),
    ("plaintext-n-negative", "plain", plaintext(chat("hi", n=-1)), INVALID),
    ("plaintext-stream-options-string", "plain", plaintext(chat("hi", stream=True, stream_options="x")), INVALID),
    ("plaintext-include-obfuscation-string", "plain", plaintext(chat("hi", stream=True, stream_options={"include_obfuscation": "no"})), INVALID),
    ("plaintext-include-obfuscation-null", "plain", plaintext(chat("hi", stream_options={"include_obfuscation": None})), INVALID),
    ("plaintext-completion-on-chat-route", "plain", plaintext({"model": MODEL, "prompt": "hi"}), INVALID),
    ("plaintext-chat-on-embeddings-route", "plain", plaintext(chat("hi"), path=EMBEDDINGS), INVALID),
    ("plaintext-deeply-nested", "plain", plaintext(b'{"model":"echo-model","messages":[{"role":"user","content":"a"}],"x":' + deep(5000) + b"}"), INVALID),
    ("plaintext-lone-surrogate", "plain", plaintext(b'{"model":"echo-model","messages":[{"role":"user","content":"\\ud800"}]}'), INVALID),
    # models
    ("unknown-model", "plain", plaintext(chat("hi", model="no-such-model"), model_name="no-such-model"), MODEL_404),
    ("model-name-differs-from-plaintext", "plain", plaintext(chat("hi"), model_name="other-model"), MODEL_404),
    ("plaintext-model-differs", "plain", plaintext(chat("hi", model="other-model")), MODEL_404),
    ("model-name-case", "plain", plaintext(chat("hi"), model_name=MODEL.upper()), MODEL_404),
    ("model-name-nul", "plain", plaintext(chat("hi", model=MODEL + "\x00"), model_name=MODEL + "\x00"), MODEL_404),
    ("model-name-rtl-mark", "plain", plaintext(chat("hi", model="\u202e" + MODEL), model_name="\u202e" + MODEL), MODEL_404),
    ("model-name-zero-width", "plain", plaintext(chat("hi"), model_name=MODEL + "\u200b"), MODEL_404),
    ("model-name-overlong", "plain", plaintext(chat("hi", model="m" * 15_000), model_name="m" * 15_000), MODEL_404),
    ("completions-unknown-model", "plain", plaintext({"model": "nope", "prompt": "hi"}, "nope", COMPLETIONS), MODEL_404),
    # unicode in the outer JSON
    ("outer-lone-surrogate", "plain", body_edit(lambda b: b.replace(b'"model_name":"echo-model"', b'"model_name":"\\ud800"')), INVALID),
    ("outer-overlong-utf8", "plain", body_edit(lambda b: b.replace(b'"model_name":"echo-model"', b'"model_name":"\xc0\xaf"')), INVALID),
    ("outer-nul-escape-in-base64", "plain", transform("nonce", lambda v: v[:4] + "\u0000" + v[5:]), INVALID),
    ("outer-rtl-in-base64", "plain", transform("salt", lambda v: "\u202e" + v[1:]), INVALID),
    ("outer-fullwidth-digits-in-base64", "plain", transform("nonce", lambda v: v[:-1] + "\uff10"), INVALID),
    # JSON structure
    ("duplicate-key-last-bad", "plain", duplicate_key("nonce", "good", lambda o: "AAAA"), INVALID),
    ("duplicate-key-last-tampered", "plain", duplicate_key("ciphertext", "good", lambda o: flip(0)(o["ciphertext"])), DECRYPT),
    ("duplicate-model-name", "plain", duplicate_key("model_name", "good", lambda o: "other-model"), MODEL_404),
    ("deeply-nested-outer", "plain", body_edit(lambda b: b[:-1] + b',"x":' + deep(10_000) + b"}"), INVALID),
    # content types and methods
    ("form-urlencoded", "plain", raw_body(b"ciphertext=AAAA&nonce=AAAA", "application/x-www-form-urlencoded"), INVALID),
    ("multipart", "plain", raw_body(b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b"), INVALID),
    ("engine-not-ready", "plain", not_ready, (503, "NOT_READY")),
    # auth and proxy signatures
    ("no-bearer-token", "auth", lambda n: send(n, sealed(n)), (401, "UNAUTHORIZED")),
    ("wrong-bearer-token", "auth", lambda n: send(n, sealed(n), headers={"Authorization": "Bearer nope"}), (401, "UNAUTHORIZED")),
    ("basic-auth-scheme", "auth", lambda n: send(n, sealed(n), headers={"Authorization": "Basic " + base64.b64encode(b"a:" + TOKEN.encode()).decode()}), (401, "UNAUTHORIZED")),
    ("missing-x-signature", "auth", lambda n: send(n, sealed(n), headers={"Authorization": f"Bearer {TOKEN}"}), (401, "INVALID_SIGNATURE")),
    ("x-signature-foreign-proxy", "auth", lambda n: (lambda o: send(n, o, headers={"Authorization": f"Bearer {TOKEN}", "X-Signature": Signer.generate().sign_b64(b64d(o["plaintext_body_hash"]))}))(sealed(n)), (401, "INVALID_SIGNATURE")),
    ("x-signature-other-hash", "auth", lambda n: send(n, sealed(n), headers={"Authorization": f"Bearer {TOKEN}", "X-Signature": PROXY.sign_b64(bytes(32))}), (401, "INVALID_SIGNATURE")),
    ("x-signature-garbage", "auth", lambda n: send(n, sealed(n), headers={"Authorization": f"Bearer {TOKEN}", "X-Signature": "%%%"}), (401, "INVALID_SIGNATURE")),
]


def test_corpus_is_large_and_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 30


@pytest.mark.parametrize(("case", "send_bad", "want"), [pytest.param(kind, fn, want, id=name) for name, kind, fn, want in CASES])
def test_bad_input(request, case, send_bad, want):
    node: ServerThread = request.getfixturevalue(f"{case}_node")
    status, headers, raw = send_bad(node)
    code, error = error_of(raw)
    assert (status, code) == want, (status, error)
    assert headers.get("content-type", "").startswith("application/json")
    if status == 429:
        assert "retry-after" in headers
    # Nothing is held, and the node still serves.
    assert node.settled(), (node.state.admission.in_flight, node.engine.running)
    node.good_request(headers=auth_headers if case == "auth" else None)
    assert node.settled()


def test_content_type_is_not_required(plain_node):
    """The node reads the body as JSON whatever the Content-Type says (atoma clients always send
    application/json; a proxy that drops it still works)."""
    for content_type in ("text/plain", "application/octet-stream", ""):
        outer, opener = plain_node.seal(chat("content type does not matter"))
        status, _, raw = plain_node.post(CHAT, outer, {"Content-Type": content_type})
        assert status == 200, raw[:200]
        opener.open_response(json.loads(raw))
