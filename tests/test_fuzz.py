"""Hypothesis fuzzing of the confidential routes over HTTP against a real loopback node (echo).

Three fuzzers, each with an oracle: structured mutations of every envelope field (the expected
status and code computed independently from the protocol's checks and their order), byte-level
mutations of the outer JSON (any answer must be a row of the error table, never 500), and
properly sealed arbitrary plaintexts (the endpoint's schema decides). Every answer is checked
for status, code and body shape; the node must never answer 500, never hang, and keep serving:
a good request succeeds after every batch and at the end. ~200 examples each in the default
suite; `pytest -m long` runs 10,000 of the envelope fuzzer and thousands of the others.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.protocol import ChatCompletionRequest
from reliability import CHAT, ERROR_TABLE, MODEL, ServerThread, chat, compact, error_of, node_config

FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    derandomize=False,
)
DEFAULT = settings(FUZZ, max_examples=200)
LONG = settings(FUZZ, max_examples=10_000)

STRING_FIELDS = ["ciphertext", "client_dh_public_key", "model_name", "node_dh_public_key", "nonce", "plaintext_body_hash", "salt"]
BINARY_SIZES = {"salt": 16, "nonce": 12, "client_dh_public_key": 32, "node_dh_public_key": 32, "plaintext_body_hash": 32, "ciphertext": None}
KEM_CIPHERTEXT_SIZE = 1088  # docs/protocol.md, optional: null or absent means the X25519-only derivation
ALL_FIELDS = [*STRING_FIELDS, "kem_ciphertext", "stack_small_id", "num_compute_units", "stream", "extra_field"]
INT64_MAX = 2**63 - 1
P25519 = 2**255 - 19
MISSING = object()


@pytest.fixture(scope="module")
def node():
    config = node_config(limits={"max_in_flight": 64, "max_queue": 256, "max_body_bytes": 1024 * 1024})
    with ServerThread(config) as server:
        yield server
        # Nothing left behind: no slot held, no request in the engine, the engine healthy.
        assert server.settled(), (server.state.admission.in_flight, server.engine.running)
        assert server.engine.ready


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.statuses: dict[tuple[int, str], int] = {}


@pytest.fixture(scope="module")
def seen():
    counter = Counter()
    yield counter
    print("\nfuzz answers:", dict(sorted(counter.statuses.items())))


# --- strategies ------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
unicode_edge = st.sampled_from(
    ["\ud800", "\udfff", "a\udc00b", "\x00", "\u202e" + MODEL, MODEL + "\u200f", "\ufeff" + MODEL, "😀", "e\u0301", "\uffff", "A" * 5000]
)


def b64_of(size: st.SearchStrategy[int]) -> st.SearchStrategy[str]:
    return size.flatmap(lambda n: st.binary(min_size=n, max_size=n)).map(lambda b: base64.b64encode(b).decode())


def noncanonical(value: str) -> list[str]:
    """Encodings of (nearly) the same bytes the strict decoder must refuse."""
    variants = [
        value.rstrip("="),
        value + "=",
        value + "\n",
        " " + value,
        value[:-4] + "\n" + value[-4:],
        value.replace("+", "-").replace("/", "_") if ("+" in value or "/" in value) else value + "====",
        "=" + value,
        value + "AA",
    ]
    if value.endswith("="):  # non-zero trailing bits: same bytes under a lenient decoder
        last = value.rstrip("=")
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        idx = alphabet.index(last[-1])
        variants.append(last[:-1] + alphabet[idx ^ 1] + value[len(last) :])
    return variants


@st.composite
def mutations(draw) -> list[tuple]:
    """1-3 mutations of named fields: ("delete", f) | ("set", f, value) | ("flip", f, bit) | ("noncanon", f)."""
    out = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        field = draw(st.sampled_from(ALL_FIELDS))
        kinds = ["delete", "set", "set_special"]
        if field in BINARY_SIZES or field == "kem_ciphertext":
            kinds += ["flip", "flip", "flip", "noncanon", "b64len", "b64len"]
        if field == "model_name":
            kinds += ["model"] * 3
        kind = draw(st.sampled_from(kinds))
        if kind == "delete":
            out.append(("delete", field))
        elif kind == "set":
            out.append(("set", field, draw(json_values)))
        elif kind == "set_special":
            special = draw(
                st.sampled_from([0, -1, 1, INT64_MAX, INT64_MAX + 1, 2**64, -(2**63), 10**30, 1.0, True, False, None, "", [], {}])
                | unicode_edge
                | b64_of(st.integers(0, 48))
            )
            out.append(("set", field, special))
        elif kind == "flip":
            out.append(("flip", field, draw(st.integers(0, 8 * 64 - 1))))
        elif kind == "model":
            out.append(("set", field, draw(st.sampled_from(["other", MODEL.upper(), MODEL + " ", MODEL + "\x00", "", MODEL]))))
        elif kind == "b64len":
            size = KEM_CIPHERTEXT_SIZE if field == "kem_ciphertext" else BINARY_SIZES[field]
            sizes = st.integers(0, 64) if size is None else st.sampled_from([0, 1, size - 1, size, size + 1, 2 * size])
            out.append(("set", field, draw(b64_of(sizes))))
        else:
            out.append(("noncanon", field, draw(st.integers(0, 100))))
    return out


def apply(outer: dict[str, Any], muts: list[tuple]) -> dict[str, Any]:
    outer = dict(outer)
    for mut in muts:
        kind, field = mut[0], mut[1]
        if kind == "delete":
            outer.pop(field, None)
        elif kind == "set":
            outer[field] = mut[2]
        elif kind == "flip":
            value = outer.get(field)
            if isinstance(value, str):
                try:
                    data = bytearray(base64.b64decode(value, validate=True))
                except (binascii.Error, ValueError):
                    continue
                if data:
                    bit = mut[2] % (8 * len(data))
                    data[bit // 8] ^= 1 << (bit % 8)
                    outer[field] = base64.b64encode(bytes(data)).decode()
        elif kind == "noncanon":
            value = outer.get(field)
            if isinstance(value, str) and value:
                options = noncanonical(value)
                outer[field] = options[mut[2] % len(options)]
    return outer


# --- the oracle ----------------------------------------------------------------------------


def _strict_b64(value: str) -> bytes | None:
    """docs/protocol.md: standard alphabet, padding required, canonical (an independent decoder)."""
    if not value.isascii():
        return None
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if base64.b64encode(data).decode() == value else None


def _has_lone_surrogate(obj: Any) -> bool:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, list):
        return any(_has_lone_surrogate(v) for v in obj)
    if isinstance(obj, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in obj.items())
    return False


def _int64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= INT64_MAX


def _canonical_x25519(key: bytes) -> int:
    return (int.from_bytes(key, "little") & ((1 << 255) - 1)) % P25519


def expected(outer: Any, original: dict[str, Any], node_key: bytes) -> tuple[int, str]:
    """The status and code docs/protocol.md prescribes for this outer JSON (sealed as `original`)."""
    invalid = (400, "INVALID_BODY")
    if not isinstance(outer, dict) or _has_lone_surrogate(outer):
        return invalid
    for name in STRING_FIELDS:
        if not isinstance(outer.get(name, MISSING), str):
            return invalid
    if not _int64(outer.get("stack_small_id", MISSING)):
        return invalid
    units = outer.get("num_compute_units")
    if units is not None and not _int64(units):
        return invalid
    if outer.get("stream") is not None and type(outer["stream"]) is not bool:
        return invalid
    decoded = {}
    for name, size in BINARY_SIZES.items():
        data = _strict_b64(outer[name])
        if data is None or (size is not None and len(data) != size) or (size is None and len(data) < 16):
            return invalid
        decoded[name] = data
    kem = outer.get("kem_ciphertext")
    if kem is not None:
        data = _strict_b64(kem) if isinstance(kem, str) else None
        if data is None or len(data) != KEM_CIPHERTEXT_SIZE:
            return invalid
    if decoded["node_dh_public_key"] != node_key:
        return 422, "STALE_NODE_KEY"
    # Another KEM ciphertext, or one added or taken away, derives another key.
    if kem != original.get("kem_ciphertext"):
        return 400, "DECRYPTION_FAILED"
    original_client = base64.b64decode(original["client_dh_public_key"])
    if kem is None:  # X25519 alone: every encoding of the same key gives the same secret
        same_client = _canonical_x25519(decoded["client_dh_public_key"]) == _canonical_x25519(original_client)
    else:  # the hybrid key's info carries the client key's bytes
        same_client = decoded["client_dh_public_key"] == original_client
    if not same_client:
        return 400, "DECRYPTION_FAILED"
    for name in ("salt", "nonce", "ciphertext"):
        if outer[name] != original[name]:
            return 400, "DECRYPTION_FAILED"
    if outer["plaintext_body_hash"] != original["plaintext_body_hash"]:
        return 400, "HASH_MISMATCH"
    if outer["model_name"] != MODEL:
        return 404, "MODEL_NOT_FOUND"
    return 200, ""


def serialize(outer: Any, ascii_only: bool) -> bytes:
    if not ascii_only and not _has_lone_surrogate(outer):
        return json.dumps(outer, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return json.dumps(outer, ensure_ascii=True).encode("ascii")


def check_answer(node: ServerThread, status: int, headers: dict[str, str], raw: bytes, opener=None) -> tuple[int, str]:
    """The answer is a 200 that opens and verifies, or an error-table row with a clean body."""
    assert status != 500, raw[:300]
    if status == 200:
        if headers.get("content-type", "").startswith("text/event-stream"):
            for block in raw.decode().split("\n\n"):
                if block:
                    assert block.startswith("data: "), block[:100]
                    event = json.loads(block[6:])
                    assert "error" not in event, event
                    if opener is not None:
                        opener.open_event(event)
            if opener is not None:
                opener.finish()
        elif opener is not None:
            opener.open_response(json.loads(raw))
        return 200, ""
    assert headers.get("content-type", "").startswith("application/json"), headers
    code, error = error_of(raw)
    assert (status, code) in ERROR_TABLE, (status, code)
    if code == "STALE_NODE_KEY":
        assert error["node_dh_public_key"] == base64.b64encode(node.node_key).decode()
    return status, code


def record(seen: Counter, node: ServerThread, answer: tuple[int, str]) -> None:
    seen.n += 1
    seen.statuses[answer] = seen.statuses.get(answer, 0) + 1
    if seen.n % 25 == 0:
        node.good_request()


# --- envelope fields ----------------------------------------------------------------------------


def _envelope_case(node: ServerThread, seen: Counter, muts: list[tuple], ascii_only: bool, stream: bool, hybrid: bool) -> None:
    outer, opener = node.seal(chat("fuzz the envelope", stream=stream), stream=stream, hybrid=hybrid, padding=True)
    mutated = apply(outer, muts)
    want = expected(mutated, outer, node.node_key)
    status, headers, raw = node.post(CHAT, serialize(mutated, ascii_only))
    got = check_answer(node, status, headers, raw, opener if want[0] == 200 else None)
    assert got == want, (muts, got, want, raw[:200])
    record(seen, node, got)


@DEFAULT
@given(muts=mutations(), ascii_only=st.booleans(), stream=st.booleans(), hybrid=st.booleans())
def test_envelope_fields(node, seen, muts, ascii_only, stream, hybrid):
    _envelope_case(node, seen, muts, ascii_only, stream, hybrid)


@pytest.mark.long
@LONG
@given(muts=mutations(), ascii_only=st.booleans(), stream=st.booleans(), hybrid=st.booleans())
def test_envelope_fields_long(node, seen, muts, ascii_only, stream, hybrid):
    _envelope_case(node, seen, muts, ascii_only, stream, hybrid)


# --- whole outer JSON ----------------------------------------------------------------------


@st.composite
def byte_edits(draw) -> list[tuple]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "insert", "delete", "replace", "dup"]))
        out.append((kind, draw(st.floats(0, 1)), draw(st.binary(min_size=1, max_size=8)), draw(st.integers(1, 40))))
    return out


def edit_bytes(data: bytes, edits: list[tuple]) -> bytes:
    for kind, where, blob, count in edits:
        i = int(where * len(data))
        if kind == "truncate":
            data = data[:i]
        elif kind == "insert":
            data = data[:i] + blob + data[i:]
        elif kind == "delete":
            data = data[:i] + data[i + count :]
        elif kind == "replace":
            data = data[:i] + blob + data[i + len(blob) :]
        else:
            data = data[:i] + data[i : i + count] + data[i:]
    return data


def _outer_case(node: ServerThread, seen: Counter, edits, whole) -> None:
    outer, opener = node.seal(chat("fuzz the outer json"))
    body = edit_bytes(compact(outer), edits) if whole is None else serialize(whole, True)
    status, headers, raw = node.post(CHAT, body)
    got = check_answer(node, status, headers, raw, opener if status == 200 else None)
    if whole is not None:
        assert got == (400, "INVALID_BODY"), (whole, got)
    elif got == (200, ""):
        json.loads(body)  # a 200 only for a body that is still JSON
    record(seen, node, got)


non_objects = st.one_of(scalars, st.lists(json_values, max_size=5)).filter(lambda v: not isinstance(v, dict))


@DEFAULT
@given(edits=byte_edits(), whole=st.none() | non_objects)
def test_outer_json(node, seen, edits, whole):
    _outer_case(node, seen, edits, whole)


@pytest.mark.long
@settings(LONG, max_examples=3000)
@given(edits=byte_edits(), whole=st.none() | non_objects)
def test_outer_json_long(node, seen, edits, whole):
    _outer_case(node, seen, edits, whole)


# --- the sealed plaintext ---------------------------------------------------------------------

messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]) | json_values},
        optional={"content": st.text(max_size=30) | json_values, "name": json_values},
    )
    | json_values,
    max_size=3,
)
# Mostly-valid chat requests with a few fields replaced, so that the fuzzer gets past the
# schema into the node's own handling (streaming options, model checks, the engine).
_replacements = st.fixed_dictionaries(
    {},
    optional={
        "model": st.just(MODEL) | st.sampled_from(["other", MODEL.upper(), MODEL + " ", ""]) | json_values,
        "messages": messages,
        "max_tokens": st.integers(-5, 2**40) | json_values,
        "max_completion_tokens": st.integers(-5, 2**40) | json_values,
        "n": st.integers(-1, 200) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": json_values
        | st.fixed_dictionaries({}, optional={"include_obfuscation": st.booleans() | json_values, "include_usage": st.booleans()}),
        "obfuscation": json_values,
        "temperature": json_values,
        "extra": json_values,
    },
)
chat_like = _replacements.map(
    lambda fields: {"model": MODEL, "messages": [{"role": "user", "content": "fuzz the plaintext"}], **fields}
)


def plaintext_expected(plaintext: bytes) -> tuple[int, str]:
    try:
        payload = json.loads(plaintext)
    except (ValueError, UnicodeDecodeError):
        return 400, "INVALID_BODY"
    if not isinstance(payload, dict) or _has_lone_surrogate(payload):
        return 400, "INVALID_BODY"
    try:
        ChatCompletionRequest.model_validate(payload)
    except ValueError:
        return 400, "INVALID_BODY"
    options = payload.get("stream_options")
    if not isinstance(options, (dict, type(None))):
        return 400, "INVALID_BODY"
    if isinstance(options, dict) and not isinstance(options.get("include_obfuscation", False), bool):
        return 400, "INVALID_BODY"
    if payload["model"] != MODEL:
        return 404, "MODEL_NOT_FOUND"
    return 200, ""


def _plaintext_case(node: ServerThread, seen: Counter, value, raw_bytes) -> None:
    if raw_bytes is not None:
        plaintext = raw_bytes
    else:
        try:
            plaintext = json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            plaintext = json.dumps(value).encode("ascii")
    outer, opener = node.seal(plaintext)
    want = plaintext_expected(plaintext)
    if want[0] == 200:  # length hiding: answers are padded unless the request turned it off
        opener.padding = (json.loads(plaintext).get("stream_options") or {}).get("include_obfuscation") is not False
    status, headers, raw = node.post(CHAT, outer)
    got = check_answer(node, status, headers, raw, opener if status == 200 else None)
    assert got == want, (plaintext[:300], got, want, raw[:200])
    record(seen, node, got)


@DEFAULT
@given(value=chat_like | json_values, raw_bytes=st.none() | st.binary(max_size=64))
def test_plaintext(node, seen, value, raw_bytes):
    _plaintext_case(node, seen, value, raw_bytes)


@pytest.mark.long
@settings(LONG, max_examples=3000)
@given(value=chat_like | json_values, raw_bytes=st.none() | st.binary(max_size=64))
def test_plaintext_long(node, seen, value, raw_bytes):
    _plaintext_case(node, seen, value, raw_bytes)


def test_node_still_serves_after_fuzzing(node):
    node.good_request()
    node.good_request(stream=True)
