"""node.ohttp: Binary HTTP (RFC 9292's examples byte for byte), Oblivious HTTP (RFC 9458
Appendix A byte for byte: request, exported secret, response), chunked OHTTP, tampering, and
fuzzing of both decoders (only their own error, never a hang)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyhpke import AEADId

from node.crypto import hpke_x25519_key_pair
from node.ohttp import bhttp
from node.ohttp.encapsulation import (
    ChunkedRequestDecapsulator,
    ChunkedResponseOpener,
    DecapsulationError,
    GatewayKey,
    KeyConfig,
    OhttpError,
    RequestEncapsulator,
    UnknownKeyConfig,
    decapsulate_request,
    decode_key_configs,
    encode_key_configs,
)

# RFC 9292 section 5: Figure 8 (known-length request), Figure 9 (the same, indeterminate-length,
# padded), Figure 11 (indeterminate-length response with 102 and 103), Figure 13 (known-length
# response with a trailer).
FIG8 = bytes.fromhex(
    "0003474554056874747073000a2f68656c6c6f2e747874406c0a757365722d6167656e74346375726c2f372e31362e33206c69"
    "626375726c2f372e31362e33204f70656e53534c2f302e392e376c207a6c69622f312e322e3304686f73740f7777772e657861"
    "6d706c652e636f6d0f6163636570742d6c616e677561676506656e2c206d690000"
)
FIG9 = bytes.fromhex(
    "0203474554056874747073000a2f68656c6c6f2e7478740a757365722d6167656e74346375726c2f372e31362e33206c6962"
    "6375726c2f372e31362e33204f70656e53534c2f302e392e376c207a6c69622f312e322e3304686f73740f7777772e6578616d"
    "706c652e636f6d0f6163636570742d6c616e677561676506656e2c206d6900000000000000000000000000"
)
FIG11 = bytes.fromhex(
    "0340660772756e6e696e670a22736c65657020313522004067046c696e6b233c2f7374796c652e6373733e3b2072656c3d7072"
    "656c6f61643b2061733d7374796c65046c696e6b243c2f7363726970742e6a733e3b2072656c3d7072656c6f61643b2061733d"
    "7363726970740040c804646174651d4d6f6e2c203237204a756c20323030392031323a32383a353320474d5406736572766572"
    "064170616368650d6c6173742d6d6f6469666965641d5765642c203232204a756c20323030392031393a31353a353620474d54"
    "04657461671422333461613338372d642d3135363865623030220d6163636570742d72616e6765730562797465730e636f6e74"
    "656e742d6c656e67746802353104766172790f4163636570742d456e636f64696e670c636f6e74656e742d747970650a746578"
    "742f706c61696e003348656c6c6f20576f726c6421204d7920636f6e74656e7420696e636c75646573206120747261696c696e"
    "672043524c462e0d0a0000"
)
FIG13 = bytes.fromhex("0140c8001d5468697320636f6e74656e7420636f6e7461696e732043524c462e0d0a0d07747261696c65720474657874")
HELLO_HEADERS = [
    (b"user-agent", b"curl/7.16.3 libcurl/7.16.3 OpenSSL/0.9.7l zlib/1.2.3"),
    (b"host", b"www.example.com"),
    (b"accept-language", b"en, mi"),
]

# RFC 9458 Appendix A.
A_SKR = bytes.fromhex("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a")
A_KEY_CONFIG = bytes.fromhex("01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500080001000100010003")
A_REQUEST = bytes.fromhex("00034745540568747470730b6578616d706c652e636f6d012f")
A_SKE = bytes.fromhex("bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73")
A_ENC_REQUEST = bytes.fromhex(
    "010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472"
    "6374e469135906992e1268c594d2a10c695d858c40a026e7965e7d86b83dd440b2c0185204b4d63525"
)
A_RESPONSE = bytes.fromhex("0140c8")
A_SECRET = bytes.fromhex("62d87a6ba569ee81014c2641f52bea36")
A_RESPONSE_NONCE = bytes.fromhex("c789e7151fcba46158ca84b04464910d")
A_ENC_RESPONSE = bytes.fromhex("c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd")


def test_rfc9292_figure8_decodes_and_encodes_byte_for_byte() -> None:
    request = bhttp.decode_request(FIG8)
    assert (request.method, request.scheme, request.authority, request.path) == ("GET", "https", "", "/hello.txt")
    assert request.headers == HELLO_HEADERS and request.content == b"" and request.trailers == []
    assert bhttp.encode_request(request) == FIG8


def test_rfc9292_figure9_indeterminate_padded_is_the_same_request() -> None:
    assert bhttp.decode_request(FIG9) == bhttp.decode_request(FIG8)
    for cut in (1, 5, 10, 11, 12):  # padding and the empty trailing sections may be cut off
        assert bhttp.decode_request(FIG9[:-cut]) == bhttp.decode_request(FIG8)


def test_rfc9292_figure11_informational_responses() -> None:
    response = bhttp.decode_response(FIG11)
    assert [i.status for i in response.informational] == [102, 103]
    assert response.informational[0].headers == [(b"running", b'"sleep 15"')]
    assert response.informational[1].headers == [
        (b"link", b"</style.css>; rel=preload; as=style"),
        (b"link", b"</script.js>; rel=preload; as=script"),
    ]
    assert response.status == 200
    assert (b"content-type", b"text/plain") in response.headers and (b"content-length", b"51") in response.headers
    assert response.content == b"Hello World! My content includes a trailing CRLF.\r\n"
    # The known-length encoding of the same message reads back the same.
    assert bhttp.decode_response(bhttp.encode_response(response)) == response


def test_rfc9292_figure13_trailers_byte_for_byte() -> None:
    response = bhttp.decode_response(FIG13)
    assert response.status == 200 and response.headers == [] and response.trailers == [(b"trailer", b"text")]
    assert response.content == b"This content contains CRLF.\r\n"
    assert bhttp.encode_response(response) == FIG13


def test_indeterminate_response_pieces_read_by_the_stream_reader() -> None:
    encoded = (
        bhttp.response_head(200, [(b"content-type", b"text/event-stream")])
        + bhttp.content_chunk(b"data: 1\n\n")
        + bhttp.content_chunk(b"data: 2\n\n")
        + bhttp.response_end([(b"x-end", b"yes")])
    )
    assert bhttp.decode_response(encoded).content == b"data: 1\n\ndata: 2\n\n"
    stream = bhttp.ResponseStream()
    content = b"".join(stream.feed(encoded[i : i + 1]) for i in range(len(encoded)))  # byte by byte
    stream.finish()
    assert stream.head is not None and stream.head.status == 200 and content == b"data: 1\n\ndata: 2\n\n"
    cut = bhttp.ResponseStream()
    cut.feed(encoded[:-8])
    with pytest.raises(bhttp.BhttpError):
        cut.finish()


@pytest.mark.parametrize(
    "message",
    [
        b"",
        bytes.fromhex("01") + FIG8[1:],  # a response's framing on a request
        FIG8[:40],  # cut inside the header section
        FIG8[:8],  # cut inside the control data
        FIG8 + b"\x01",  # padding that is not zero
        bytes.fromhex("000347455405687474707300012f3fffffff"),  # a length beyond the message
    ],
)
def test_broken_requests_are_refused(message: bytes) -> None:
    with pytest.raises(bhttp.BhttpError):
        bhttp.decode_request(message)


def test_field_names_and_values_are_checked() -> None:
    def request(name: bytes, value: bytes) -> bytes:
        return bhttp.encode_request(bhttp.Request("GET", "https", "", "/", [(name, value)]))

    assert bhttp.decode_request(request(b"accept", b"*/*")).headers == [(b"accept", b"*/*")]
    for name, value in ((b":method", b"POST"), (b"Accept", b"x"), (b"a b", b"x"), (b"x", b"a\r\nb: c"), (b"x", b" a")):
        with pytest.raises(bhttp.BhttpError):
            bhttp.decode_request(request(name, value))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.sampled_from([FIG8, FIG9, FIG11, FIG13, A_REQUEST]).flatmap(
    lambda seed: st.tuples(st.integers(0, len(seed)), st.binary(max_size=8)).map(lambda cut: seed[: cut[0]] + cut[1])
))
def test_fuzz_bhttp_decoders_raise_only_their_error(data: bytes) -> None:
    for decode in (bhttp.decode_request, bhttp.decode_response):
        try:
            decode(data)
        except bhttp.BhttpError:
            pass
    stream = bhttp.ResponseStream(limit=4096)
    try:
        stream.feed(data)
        stream.finish()
    except bhttp.BhttpError:
        pass


# --- RFC 9458 ---------------------------------------------------------------------------------------


def _a_gateway() -> GatewayKey:
    return GatewayKey.generate(1, A_SKR)


def test_rfc9458_key_configuration_byte_for_byte() -> None:
    key = _a_gateway()
    assert key.config.encode() == A_KEY_CONFIG
    assert KeyConfig.decode(A_KEY_CONFIG) == key.config
    listed = encode_key_configs([key.config, key.config])
    assert listed == b"\x00\x2d" + A_KEY_CONFIG + b"\x00\x2d" + A_KEY_CONFIG
    assert decode_key_configs(listed) == [key.config, key.config]
    for broken in (A_KEY_CONFIG[:-1], b"\x00\x2e" + A_KEY_CONFIG, b"\x00\x2d" + A_KEY_CONFIG + b"\x00", b""):
        with pytest.raises(OhttpError):
            decode_key_configs(broken if broken[:1] == b"\x00" else b"\x00\x2d" + broken)


def test_rfc9458_appendix_a_request_secret_and_response_byte_for_byte() -> None:
    key = _a_gateway()
    client = RequestEncapsulator(key.config, chunked=False, aead=AEADId.AES128_GCM, ephemeral=hpke_x25519_key_pair(A_SKE))
    assert client.encapsulate(A_REQUEST) == A_ENC_REQUEST
    plaintext, responder = decapsulate_request(A_ENC_REQUEST, {1: key}.get)
    assert plaintext == A_REQUEST
    assert bhttp.decode_request(plaintext).authority == "example.com"
    assert responder._context.export(b"message/bhttp response", 16) == A_SECRET
    assert responder.seal(A_RESPONSE, A_RESPONSE_NONCE) == A_ENC_RESPONSE
    assert client.open_response(A_ENC_RESPONSE) == A_RESPONSE


@pytest.mark.parametrize("aead", [AEADId.AES128_GCM, AEADId.CHACHA20_POLY1305])
def test_round_trip_both_aeads(aead: AEADId) -> None:
    key = GatewayKey.generate(7)
    client = RequestEncapsulator(key.config, chunked=False, aead=aead)
    plaintext, responder = decapsulate_request(client.encapsulate(b"hello"), {7: key}.get)
    assert plaintext == b"hello"
    assert client.open_response(responder.seal(b"world")) == b"world"


def test_every_tampered_byte_is_refused_without_saying_where() -> None:
    key = _a_gateway()
    for index in range(len(A_ENC_REQUEST)):
        tampered = bytearray(A_ENC_REQUEST)
        tampered[index] ^= 0x01
        with pytest.raises(OhttpError) as refused:
            decapsulate_request(bytes(tampered), {1: key}.get)
        # Header bytes name another key or suite (RFC 9458 section 5.3 allows saying so); the
        # encapsulated key and the ciphertext fail alike, with one message.
        expected = UnknownKeyConfig if index < 7 else DecapsulationError
        assert type(refused.value) is expected and str(refused.value) in ("message does not decapsulate", "unknown key configuration")
    client = RequestEncapsulator(key.config, chunked=False)
    _, responder = decapsulate_request(client.encapsulate(b"q"), {1: key}.get)
    answer = bytearray(responder.seal(b"answer"))
    answer[-1] ^= 1
    with pytest.raises(DecapsulationError):
        client.open_response(bytes(answer))


def test_chunked_round_trip_and_truncation() -> None:
    key = GatewayKey.generate(3)
    client = RequestEncapsulator(key.config, chunked=True)
    body = client.header() + client.chunk(b"part one, ") + client.chunk(b"part two") + client.final_chunk(b"!")
    gateway = ChunkedRequestDecapsulator({3: key}.get, max_body=1 << 20)
    received = b"".join(gateway.feed(body[i : i + 5]) for i in range(0, len(body), 5)) + gateway.end()
    assert received == b"part one, part two!"
    responder = gateway.encapsulator
    assert responder is not None
    answer = responder.chunked_start() + responder.chunk(b"event 1") + responder.chunk(b"event 2") + responder.final_chunk(b"")
    opener = ChunkedResponseOpener(client)
    assert b"".join(opener.feed(answer[i : i + 3]) for i in range(0, len(answer), 3)) == b"event 1event 2"
    assert opener.end() == b""
    # A response cut before its final chunk, or with the final chunk dropped, never passes as whole.
    final_at = len(answer) - 17
    for cut in (answer[:final_at], answer[:final_at] + b"\x00", answer[:-1]):
        opener = ChunkedResponseOpener(client)
        opener.feed(cut)
        with pytest.raises(DecapsulationError):
            opener.end()
    # Chunks in another order do not open, nor does a non-final chunk passed off as the final one.
    reordered = RequestEncapsulator(key.config, chunked=True)
    one, two = reordered.chunk(b"one"), reordered.chunk(b"two")
    with pytest.raises(DecapsulationError):
        ChunkedRequestDecapsulator({3: key}.get, max_body=1 << 20).feed(reordered.header() + two + one)
    early = RequestEncapsulator(key.config, chunked=True)
    gateway = ChunkedRequestDecapsulator({3: key}.get, max_body=1 << 20)
    gateway.feed(early.header() + b"\x00" + early.chunk(b"not final")[1:])
    with pytest.raises(DecapsulationError):
        gateway.end()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(0, 120))
def test_fuzz_decapsulation_raises_only_ohttp_errors(noise: bytes, keep: int) -> None:
    key = GatewayKey.generate(1, A_SKR)
    for data in (noise, A_ENC_REQUEST[:keep] + noise, b"\x01\x00\x20\x00\x01\x00\x01" + noise):
        try:
            decapsulate_request(data, {1: key}.get)
        except OhttpError:
            pass
        gateway = ChunkedRequestDecapsulator({1: key}.get, max_body=4096)
        try:
            gateway.feed(data)
            gateway.end()
        except OhttpError:
            pass


def test_fresh_keys_differ() -> None:
    assert GatewayKey.generate(1).config.public_key != GatewayKey.generate(1).config.public_key
