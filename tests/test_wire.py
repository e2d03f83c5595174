"""node.wire: the SSE codec every reader and writer of events uses, and the error table from
which the node's errors, the client's errors and the OpenAPI error responses are made."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.client.errors import ERRORS_BY_CODE, error_from_body
from node.config import load_config
from node.errors import NODE_ERRORS, EngineBadRequest, EngineError, MalformedJson
from node.server.openapi import openapi_document
from node.wire import (
    ERROR_TABLE,
    ERRORS,
    SSE_KEEPALIVE,
    EventTooLarge,
    SSEDecoder,
    canonical_json,
    sse_event,
)

# the protocol's error table, code -> status: these must never change.
PROTOCOL_ERRORS = {
    "INVALID_BODY": 400, "UNAUTHORIZED": 401, "INVALID_SIGNATURE": 401, "DECRYPTION_FAILED": 400,
    "HASH_MISMATCH": 400, "MODEL_NOT_FOUND": 404, "BODY_TOO_LARGE": 413, "REPLAYED_REQUEST": 409,
    "STALE_NODE_KEY": 422, "OVERLOADED": 429, "NOT_READY": 503, "INTERNAL_ERROR": 500,
}
# Anonymous tokens (docs/privacy-pass.md): TOKEN_SPENT is the protocol's, the others this node's.
PRIVACY_PASS_ERRORS = {
    "TOKEN_SPENT": 401, "INVALID_TOKEN": 401, "TOKEN_KEY_RETIRED": 401, "INVALID_TOKEN_REQUEST": 422,
    "TOKEN_BATCH_TOO_LARGE": 422, "TOKEN_QUOTA_EXCEEDED": 429,
}
# The node's own codes beyond the protocol's table: image requests the model cannot answer.
IMAGE_ERRORS = {"UNSUPPORTED_IMAGE_SIZE": 400, "TOO_MANY_IMAGES": 400, "PROMPT_TOO_LONG": 400}


# --- canonical JSON ---------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(_JSON)
def test_canonical_json_is_protocol_md_definition(obj):
    """The orjson path must write exactly the protocol's json.dumps bytes (floats, big integers
    and lone surrogates take the reference path)."""
    try:
        reference = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate has no UTF-8: neither path writes it
        with pytest.raises(UnicodeEncodeError):
            canonical_json(obj)
        return
    assert canonical_json(obj) == reference


# --- SSE ----------------------------------------------------------------------------------------

LINE_ENDS = [b"\n", b"\r\n", b"\r"]


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        # SSE data is UTF-8 text: no lone surrogates, no line breaks inside one data line.
        st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=40),
        min_size=1,
        max_size=6,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    newline=st.sampled_from(LINE_ENDS),
)
def test_decoder_is_independent_of_read_boundaries_and_line_ends(events, cuts, newline):
    raw = b"".join(b": keep-alive" + newline * 2 + b"data: " + e.encode() + newline * 2 for e in events)
    decoder = SSEDecoder()
    got: list[bytes] = []
    start = 0
    for cut in sorted(c for c in cuts if c < len(raw)) + [len(raw)]:
        got += decoder.feed(raw[start:cut])
        start = cut
    assert got == [e.encode() for e in events] and not decoder.pending


@pytest.mark.parametrize("newline", LINE_ENDS, ids=["LF", "CRLF", "CR"])
def test_decoder_fields(newline):
    n = newline
    raw = (b"data: a" + n + b"data:b" + n + b"data" + n + b"id: 7" + n + n  # three data lines, an id
           + b"event: x" + n + b": comment" + n + n  # no data: no event
           + b"data:  two spaces" + n + n)
    assert SSEDecoder().feed(raw) == [b"a\nb\n", b" two spaces"]


def test_decoder_byte_by_byte_crlf_split_and_pending():
    decoder = SSEDecoder()
    got = []
    for byte in b"data: 1\r\n\r\ndata: 2\r":
        got += decoder.feed(bytes([byte]))
    assert got == [b"1"] and decoder.pending
    assert decoder.feed(b"\n\r\n") == [b"2"] and not decoder.pending


def test_decoder_limit():
    decoder = SSEDecoder(limit=64)
    assert decoder.feed(b"data: " + b"x" * 50 + b"\n\n") == [b"x" * 50]
    with pytest.raises(EventTooLarge):
        for _ in range(10):
            decoder.feed(b"data: " + b"y" * 20)


def test_encoder_round_trips():
    payload = b'{"a":"\xc3\xa9","b":[1,2]}'
    assert sse_event(payload) == b"data: " + payload + b"\n\n"
    assert SSEDecoder().feed(SSE_KEEPALIVE + sse_event(payload) + SSE_KEEPALIVE) == [payload]


# --- the error table ----------------------------------------------------------------------------


def test_protocol_codes_keep_their_status():
    # The protocol's codes, Privacy Pass's, and the node's own: a worker VM refused at join.
    assert {k.code: k.status for k in ERROR_TABLE if not k.routing and not k.gateway} == {
        **PROTOCOL_ERRORS, **PRIVACY_PASS_ERRORS, **IMAGE_ERRORS, "WORKER_REFUSED": 403,
    }
    # The Oblivious HTTP gateway's own answers (RFC 9458 section 5.3's 400 with a problem type).
    assert {k.code: (k.status, k.problem_type) for k in ERROR_TABLE if k.gateway} == {
        "OHTTP_DECAPSULATION_FAILED": (400, "about:blank"),
        "OHTTP_KEY_UNKNOWN": (400, "https://iana.org/assignments/http-problem-types#ohttp-key"),
        "UNSUPPORTED_MEDIA_TYPE": (415, None),
    }
    assert {k.code: k.status for k in ERROR_TABLE if k.routing} == {
        "NOT_FOUND": 404,
        "METHOD_NOT_ALLOWED": 405,
        "PLAINTEXT_DISABLED": 404,
    }


def test_both_sides_have_one_class_per_row():
    assert [cls.code for cls in NODE_ERRORS] == [kind.code for kind in ERROR_TABLE] == list(ERRORS_BY_CODE)
    for kind, server, client in zip(ERROR_TABLE, NODE_ERRORS, ERRORS_BY_CODE.values()):
        assert (server.status, server.code, server.message) == (kind.status, kind.code, kind.message)
        assert (client.status, client.code, client.message) == (kind.status, kind.code, kind.client_message)
        # What the node answers is what the client turns back into its exception.
        error = error_from_body(kind.status, {"error": {"code": kind.code, "message": kind.message}})
        assert type(error) is client and error.server_message == kind.message


def test_refinements_keep_their_row():
    assert (MalformedJson.status, MalformedJson.code) == (400, "INVALID_BODY") and MalformedJson.message != ERRORS["INVALID_BODY"].message
    assert (EngineBadRequest.status, EngineBadRequest.code) == (400, "INVALID_BODY")
    assert (EngineError.status, EngineError.code, EngineError().safe_message) == (500, "INTERNAL_ERROR", "internal error")


def test_openapi_error_responses_come_from_the_table():
    doc = openapi_document(load_config(None))
    responses = doc["paths"]["/v1/confidential/chat/completions"]["post"]["responses"]
    for kind in ERROR_TABLE:
        if kind.routing or kind.gateway or kind.code == "WORKER_REFUSED":  # answered by their own routes only
            continue
        description = responses[str(kind.status)]["description"]
        assert f"{kind.code}: {kind.when}" in description
    assert "Retry-After" in responses["429"]["headers"]
    gateway = doc["paths"]["/v1/ohttp"]["post"]["responses"]
    for kind in ERROR_TABLE:
        if kind.gateway:
            assert f"{kind.code}: {kind.when}" in gateway[str(kind.status)]["description"]
            media = "application/problem+json" if kind.problem_type else "application/json"
            assert media in gateway[str(kind.status)]["content"]
    assert set(responses) == {"200"} | {str(s) for s in PROTOCOL_ERRORS.values()}
    models = doc["paths"]["/v1/models"]["get"]
    assert models["security"] == [{"bearerAuth": []}] and set(models["responses"]) == {"200", "401"}
    plain_off = openapi_document(load_config(None), ["/v1/chat/completions"])["paths"]["/v1/chat/completions"]["post"]
    assert plain_off["responses"]["404"]["description"].startswith("PLAINTEXT_DISABLED: ")
    public = openapi_document(load_config(None, auth={"metrics_public": True}))["paths"]["/metrics"]["get"]
    assert "security" not in public and set(public["responses"]) == {"200"}
