"""Binary HTTP messages (RFC 9292): pure functions over bytes.

Encoding writes the known-length form (framing 0 for requests, 1 for responses), plus an
indeterminate-length response written piece by piece (`response_head`, `content_chunk`,
`response_end`) for answers that stream. Decoding reads both forms, informational (1xx)
responses, trailers, the truncation RFC 9292 section 3.8 allows and zero padding; anything
else raises `BhttpError`, and no length field is trusted before the bytes are there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Fields = list[tuple[bytes, bytes]]

KNOWN_LENGTH_REQUEST = 0
KNOWN_LENGTH_RESPONSE = 1
INDETERMINATE_REQUEST = 2
INDETERMINATE_RESPONSE = 3

# Bounds on what one decoded message may hold: a peer's length fields allocate nothing beyond them.
MAX_FIELDS = 256
MAX_FIELD_BYTES = 64 * 1024
MAX_INFORMATIONAL = 16

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_METHOD_CHARS = _TCHAR | frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_FORBIDDEN_IN_VALUE = frozenset(b"\r\n\x00")


class BhttpError(ValueError):
    """The bytes are not a Binary HTTP message this decoder accepts."""


@dataclass
class Request:
    method: str
    scheme: str
    authority: str
    path: str
    headers: Fields = field(default_factory=list)
    content: bytes = b""
    trailers: Fields = field(default_factory=list)


@dataclass
class Informational:
    status: int
    headers: Fields = field(default_factory=list)


@dataclass
class Response:
    status: int
    headers: Fields = field(default_factory=list)
    content: bytes = b""
    trailers: Fields = field(default_factory=list)
    informational: list[Informational] = field(default_factory=list)


# --- variable-length integers (RFC 9000 section 16) -----------------------------------------------


def encode_varint(value: int) -> bytes:
    if value < 0x40:
        return value.to_bytes(1, "big")
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    if value < 0x4000_0000_0000_0000:
        return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
    raise ValueError("varint out of range")


def read_varint(data: bytes | memoryview, offset: int) -> tuple[int, int]:
    """(value, offset after it); BhttpError when the bytes end inside it."""
    if offset >= len(data):
        raise _Truncated()
    size = 1 << (data[offset] >> 6)
    if offset + size > len(data):
        raise _Truncated()
    value = int.from_bytes(data[offset : offset + size], "big") & ((1 << (8 * size - 2)) - 1)
    return value, offset + size


class _Truncated(BhttpError):
    """The message ends early (what streaming decoders wait on, and whole-message ones refuse)."""

    def __init__(self) -> None:
        super().__init__("message truncated")


# --- encoding --------------------------------------------------------------------------------------


def _lp(data: bytes) -> bytes:
    return encode_varint(len(data)) + data


def _field_section(fields: Fields) -> bytes:
    body = b"".join(_lp(name) + _lp(value) for name, value in fields)
    return _lp(body)


def encode_request(request: Request) -> bytes:
    """The known-length form."""
    return b"".join(
        (
            encode_varint(KNOWN_LENGTH_REQUEST),
            _lp(request.method.encode("ascii")),
            _lp(request.scheme.encode("ascii")),
            _lp(request.authority.encode("ascii")),
            _lp(request.path.encode("ascii")),
            _field_section(request.headers),
            _lp(request.content),
            _field_section(request.trailers),
        )
    )


def encode_response(response: Response) -> bytes:
    """The known-length form, informational responses first."""
    parts = [encode_varint(KNOWN_LENGTH_RESPONSE)]
    for info in response.informational:
        parts += (encode_varint(info.status), _field_section(info.headers))
    parts += (
        encode_varint(response.status),
        _field_section(response.headers),
        _lp(response.content),
        _field_section(response.trailers),
    )
    return b"".join(parts)


def response_head(status: int, headers: Fields) -> bytes:
    """The start of an indeterminate-length response: framing, status, header section."""
    fields = b"".join(_lp(name) + _lp(value) for name, value in headers)
    return encode_varint(INDETERMINATE_RESPONSE) + encode_varint(status) + fields + b"\x00"


def content_chunk(data: bytes) -> bytes:
    """One piece of an indeterminate-length content (never empty: an empty one ends it)."""
    return _lp(data) if data else b""


def response_end(trailers: Fields = ()) -> bytes:
    """The content's end, then the trailer section, of an indeterminate-length response."""
    return b"\x00" + b"".join(_lp(name) + _lp(value) for name, value in trailers) + b"\x00"


# --- decoding --------------------------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "offset")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    @property
    def at_end(self) -> bool:
        return self.offset >= len(self.data)

    def varint(self) -> int:
        value, self.offset = read_varint(self.data, self.offset)
        return value

    def take(self, size: int) -> bytes:
        if size > len(self.data) - self.offset:
            raise _Truncated()
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def lp(self, limit: int) -> bytes:
        size = self.varint()
        if size > limit:
            raise BhttpError("field too long")
        return self.take(size)


def _check_field(name: bytes, value: bytes) -> None:
    if not name or not set(name) <= _TCHAR:
        raise BhttpError("invalid field name")  # also refuses pseudo-fields and upper case
    if _FORBIDDEN_IN_VALUE.intersection(value) or value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
        raise BhttpError("invalid field value")


def _known_fields(reader: _Reader) -> Fields:
    section = reader.lp(MAX_FIELDS * MAX_FIELD_BYTES)
    inner = _Reader(section)
    fields: Fields = []
    while not inner.at_end:
        if len(fields) >= MAX_FIELDS:
            raise BhttpError("too many fields")
        name, value = inner.lp(MAX_FIELD_BYTES), inner.lp(MAX_FIELD_BYTES)
        _check_field(name, value)
        fields.append((name, value))
    return fields


def _indeterminate_fields(reader: _Reader) -> Fields:
    fields: Fields = []
    while True:
        name = reader.lp(MAX_FIELD_BYTES)
        if not name:
            return fields
        if len(fields) >= MAX_FIELDS:
            raise BhttpError("too many fields")
        value = reader.lp(MAX_FIELD_BYTES)
        _check_field(name, value)
        fields.append((name, value))


def _indeterminate_content(reader: _Reader, limit: int) -> bytes:
    pieces = []
    total = 0
    while True:
        piece = reader.lp(limit)
        if not piece:
            return b"".join(pieces)
        total += len(piece)
        if total > limit:
            raise BhttpError("content too long")
        pieces.append(piece)


def _sections(reader: _Reader, indeterminate: bool, max_content: int) -> tuple[Fields, bytes, Fields]:
    """Headers, content and trailers: a message may end before any of them (RFC 9292 section
    3.8; RFC 9458's example request ends after its path), never inside one."""
    headers: Fields = []
    content, trailers = b"", []
    try:
        if not reader.at_end:
            headers = _indeterminate_fields(reader) if indeterminate else _known_fields(reader)
        if not reader.at_end:
            content = _indeterminate_content(reader, max_content) if indeterminate else reader.lp(max_content)
        if not reader.at_end:
            trailers = _indeterminate_fields(reader) if indeterminate else _known_fields(reader)
    except _Truncated:
        raise BhttpError("message truncated inside a section") from None
    if any(reader.data[reader.offset :]):
        raise BhttpError("padding is not zero")
    return headers, content, trailers


def _text(data: bytes, what: str, allowed: frozenset[int] | None = None) -> str:
    if allowed is not None and not set(data) <= allowed:
        raise BhttpError(f"invalid {what}")
    if not data.isascii() or any(b <= 0x20 or b == 0x7F for b in data):
        raise BhttpError(f"invalid {what}")
    return data.decode("ascii")


def decode_request(data: bytes, max_content: int = 16 * 1024 * 1024) -> Request:
    reader = _Reader(bytes(data))
    framing = reader.varint()
    if framing not in (KNOWN_LENGTH_REQUEST, INDETERMINATE_REQUEST):
        raise BhttpError("not a binary HTTP request")
    method = _text(reader.lp(MAX_FIELD_BYTES), "method", _METHOD_CHARS)
    scheme = _text(reader.lp(MAX_FIELD_BYTES), "scheme")
    authority = reader.lp(MAX_FIELD_BYTES)
    path = reader.lp(MAX_FIELD_BYTES)
    if not method:
        raise BhttpError("invalid method")
    authority_text = _text(authority, "authority") if authority else ""
    path_text = _text(path, "path")
    headers, content, trailers = _sections(reader, framing == INDETERMINATE_REQUEST, max_content)
    return Request(method, scheme, authority_text, path_text, headers, content, trailers)


def decode_response(data: bytes, max_content: int = 16 * 1024 * 1024) -> Response:
    reader = _Reader(bytes(data))
    framing = reader.varint()
    if framing not in (KNOWN_LENGTH_RESPONSE, INDETERMINATE_RESPONSE):
        raise BhttpError("not a binary HTTP response")
    indeterminate = framing == INDETERMINATE_RESPONSE
    informational = []
    while True:
        status = reader.varint()
        if not 100 <= status <= 599:
            raise BhttpError("invalid status")
        if status >= 200:
            break
        if len(informational) >= MAX_INFORMATIONAL:
            raise BhttpError("too many informational responses")
        informational.append(Informational(status, _indeterminate_fields(reader) if indeterminate else _known_fields(reader)))
    headers, content, trailers = _sections(reader, indeterminate, max_content)
    return Response(status, headers, content, trailers, informational)


class ResponseStream:
    """An indeterminate-length (or known-length) response read as its bytes arrive: `feed`
    returns the content that is complete so far; `head` is set once the final status and its
    header section are in, `complete` once the content has ended (trailers are read and
    dropped). BhttpError for anything broken; bytes held are bounded by `limit`."""

    def __init__(self, limit: int = 16 * 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._limit = limit
        self.head: Response | None = None
        self.complete = False
        self._indeterminate = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        if len(self._buffer) > self._limit:
            raise BhttpError("response too long")
        out = []
        while not self.complete:
            try:
                step = self._step()
            except _Truncated:
                break
            if step:
                out.append(step)
        return b"".join(out)

    def _step(self) -> bytes:
        reader = _Reader(bytes(self._buffer))
        if self.head is None:
            framing = reader.varint()
            if framing not in (KNOWN_LENGTH_RESPONSE, INDETERMINATE_RESPONSE):
                raise BhttpError("not a binary HTTP response")
            self._indeterminate = framing == INDETERMINATE_RESPONSE
            while True:
                status = reader.varint()
                if not 100 <= status <= 599:
                    raise BhttpError("invalid status")
                fields = _indeterminate_fields(reader) if self._indeterminate else _known_fields(reader)
                if status >= 200:
                    break
            self.head = Response(status, fields)
            del self._buffer[: reader.offset]
            return b""
        if not self._indeterminate:  # known length: the content arrives whole
            content = reader.lp(self._limit)
            self._end(reader)
            return content
        piece = reader.lp(self._limit)
        del self._buffer[: reader.offset]
        if not piece:
            self._end(_Reader(bytes(self._buffer)))
        return piece

    def _end(self, reader: _Reader) -> None:
        """The content has ended; what follows (trailers, padding) is checked by `finish`."""
        self.complete = True
        self._buffer = bytearray(reader.data[reader.offset :])

    def finish(self) -> None:
        """The bytes have ended: the content must be complete, the rest trailers or padding."""
        if not self.complete:
            raise BhttpError("response ended before its content did")
        reader = _Reader(bytes(self._buffer))
        try:
            if not reader.at_end:
                _indeterminate_fields(reader) if self._indeterminate else _known_fields(reader)
        except _Truncated:
            raise BhttpError("message truncated inside a section") from None
        if any(reader.data[reader.offset :]):
            raise BhttpError("padding is not zero")
