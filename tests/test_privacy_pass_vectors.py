"""Known answers: RFC 9497's VOPRF(P-384, SHA-384) vectors against the pinned `voprf` package,
RFC 9578's token type 0x0001 vectors against node.privacypass's message layouts; hypothesis
fuzzing of the token, header and token-request parsers (only their documented errors)."""

from __future__ import annotations

import hashlib
import json
import struct
from importlib.metadata import version
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from voprf import p384

from node import privacypass as pp
from node.errors import InvalidToken, InvalidTokenRequest, NodeError, TokenBatchTooLarge

DATA = Path(__file__).parent / "data" / "privacy-pass"
VOPRF = json.loads((DATA / "rfc9497-voprf-p384-sha384.json").read_text())
ISSUANCE = json.loads((DATA / "rfc9578-issuance-protocol-1.json").read_text())
P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973


def test_voprf_version_is_the_pinned_one():
    assert version("voprf") == "0.2.0"


def test_rfc9497_key_derivation():
    evaluator = p384.Evaluator.from_seed(bytes.fromhex(VOPRF["seed"]), bytes.fromhex(VOPRF["keyInfo"]))
    assert evaluator.public_key.serialize().hex() == VOPRF["pkSm"]
    assert VOPRF["mode"] == 1 and VOPRF["identifier"] == "P384-SHA384"


@pytest.mark.parametrize("vector", VOPRF["vectors"], ids=lambda v: f"batch{v['Batch']}-{v['Input'][:6]}")
def test_rfc9497_blind_evaluate_and_evaluate(vector):
    evaluator = p384.Evaluator.from_seed(bytes.fromhex(VOPRF["seed"]), bytes.fromhex(VOPRF["keyInfo"]))
    blinded = [p384.BlindedInput.deserialize(bytes.fromhex(b)) for b in vector["BlindedElement"].split(",")]
    expected = [bytes.fromhex(e) for e in vector["EvaluationElement"].split(",")]
    if vector["Batch"] == 1:
        output = evaluator.evaluate(blinded[0]).serialize()
    else:
        output = evaluator.evaluate_batch(blinded).serialize()
    # The proof takes a fresh random scalar (the vectors fix it), so only the elements are known answers.
    assert len(output) == pp.PROOF_SIZE + len(expected) * pp.ELEMENT_SIZE
    elements = output[pp.PROOF_SIZE:]
    assert [elements[i : i + pp.ELEMENT_SIZE] for i in range(0, len(elements), pp.ELEMENT_SIZE)] == expected
    for item, out in zip(vector["Input"].split(","), vector["Output"].split(",")):
        assert evaluator.evaluate_known_input(bytes.fromhex(item)).hex() == out


def _compressed(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def _x_of_product(scalar: int, point: bytes) -> bytes:
    """The x coordinate of scalar * point (ECDH gives exactly that)."""
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), point)
    return ec.derive_private_key(scalar, ec.SECP384R1()).exchange(ec.ECDH(), peer)


@pytest.mark.parametrize("vector", ISSUANCE, ids=[f"vector{i + 1}" for i in range(len(ISSUANCE))])
def test_rfc9578_issuance_protocol_1(vector):
    sk = int(vector["skS"], 16)
    pk = bytes.fromhex(vector["pkS"])
    assert _compressed(ec.derive_private_key(sk, ec.SECP384R1()).public_key()) == pk
    key_id = pp.token_key_id(pk)

    body = bytes.fromhex(vector["token_request"])
    request = pp.TokenRequest.from_bytes(body, max_batch=1)
    assert not request.batched and request.truncated_key_id == key_id[-1]
    assert request.to_bytes() == body

    evaluated, proof = pp.parse_token_response(bytes.fromhex(vector["token_response"]), 1, batched=False)
    assert len(proof) == pp.PROOF_SIZE
    assert evaluated[0][1:] == _x_of_product(sk, request.blinded[0])  # evaluate_msg = skS * blinded_msg
    assert pp.token_response(evaluated, proof, batched=False).hex() == vector["token_response"]

    token = pp.Token.from_bytes(bytes.fromhex(vector["token"]))
    assert token.nonce.hex() == vector["nonce"]
    assert token.challenge_digest == hashlib.sha256(bytes.fromhex(vector["token_challenge"])).digest()
    assert token.token_key_id == key_id
    assert token.to_bytes().hex() == vector["token"]
    # authenticator = Finalize(token_input) over blind^-1 * evaluate_msg, whose y parity the x
    # coordinate leaves open: one of the two encodings must give the authenticator.
    token_input = token.authenticator_input
    assert token_input == struct.pack("!H", 1) + token.nonce + token.challenge_digest + key_id
    x = _x_of_product(pow(int(vector["blind"], 16), -1, P384_ORDER), evaluated[0])
    finals = [
        hashlib.sha384(
            struct.pack("!H", len(token_input)) + token_input + struct.pack("!H", 49) + prefix + x + b"Finalize"
        ).digest()
        for prefix in (b"\x02", b"\x03")
    ]
    assert token.authenticator in finals


def test_rfc9578_token_challenges_encode_as_the_vectors():
    assert pp.TokenChallenge("issuer.example", origin_info="origin.example").to_bytes().hex() == ISSUANCE[1]["token_challenge"]
    assert pp.TokenChallenge("issuer.example").to_bytes().hex() == ISSUANCE[3]["token_challenge"]
    context = bytes.fromhex(ISSUANCE[4]["token_challenge"])[19:51]  # after type, name length, name and the context length
    assert pp.TokenChallenge("issuer.example", context).to_bytes().hex() == ISSUANCE[4]["token_challenge"]


# --- fuzzing: only documented errors, whatever the bytes ---------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_token_parser_raises_only_invalid_token(data):
    try:
        token = pp.Token.from_bytes(data)
    except InvalidToken:
        return
    assert token.to_bytes() == data


_HEADER_PIECES = st.sampled_from(['PrivateToken', 'privatetoken', 'Bearer', ' ', 'token=', '"', ',', '=', 'AAE', '-_', 'x', 'token="AAE"'])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(_HEADER_PIECES, max_size=12).map("".join)))
def test_authorization_parser_raises_only_invalid_token(value):
    try:
        pp.token_from_authorization(value)
    except InvalidToken:
        pass


def _request_bytes():
    element = st.one_of(st.binary(min_size=49, max_size=49), st.just(bytes.fromhex(ISSUANCE[0]["token_request"])[3:]))
    batched = st.lists(element, min_size=0, max_size=5).map(
        lambda els: struct.pack("!HBH", 1, 7, 49 * len(els)) + b"".join(els)
    )
    return st.one_of(st.binary(max_size=400), batched, element.map(lambda e: b"\x00\x01\x07" + e))


@settings(max_examples=300, deadline=None)
@given(_request_bytes())
def test_token_request_parsing_and_issuance_raise_only_documented_errors(data):
    key = _KEY
    try:
        request = pp.TokenRequest.from_bytes(data, max_batch=3)
        key.issue(request)
    except (InvalidTokenRequest, TokenBatchTooLarge) as exc:
        assert isinstance(exc, NodeError) and 400 <= exc.status < 500


_KEY = pp.IssuerKey(bytes(32), 0.0)
