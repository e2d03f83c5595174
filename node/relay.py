"""`tee-node relay`: an Oblivious HTTP relay (RFC 9458 section 6.2) in front of one gateway.

It takes `POST` with an OHTTP media type at any path, forwards the body to its one configured
gateway with `Content-Type` alone (no `Forwarded`, `X-Forwarded-For`, `User-Agent`, cookie or
authorization: nothing of the client's), and passes the answer back, a chunked one piece by
piece as it arrives. It logs no address, and limits body size and requests per address (the
address is used for that bucket and nothing else). A relay only separates who from what when
someone other than the node's operator runs it (docs/ohttp.md).

`GET /v1/ohttp/keys` answers the gateway's key configurations (fetched from `<gateway>/keys`,
kept a minute), so that a client never contacts the node directly; the client still takes them
only once the attestation it fetches through them binds the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from .errors import Overloaded
from .ohttp.encapsulation import (
    MEDIA_CHUNKED_REQUEST,
    MEDIA_CHUNKED_RESPONSE,
    MEDIA_KEYS,
    MEDIA_REQUEST,
    MEDIA_RESPONSE,
)
from .server.admission import RateLimiter

log = logging.getLogger("tee_node.relay")

_FORWARDED_MEDIA = {MEDIA_REQUEST: MEDIA_RESPONSE, MEDIA_CHUNKED_REQUEST: MEDIA_CHUNKED_RESPONSE}
# The gateway's answer types the relay passes back (its refusals are problem+json or JSON).
_ANSWER_MEDIA = frozenset({MEDIA_RESPONSE, MEDIA_CHUNKED_RESPONSE, "application/problem+json", "application/json"})


@dataclass(frozen=True)
class RelaySettings:
    gateway: str
    # The SHA-256 of the certificate an https:// gateway presents, when it serves attested TLS
    # (self-signed, trusted through its attestation: `tee-node attest` prints it); None: CA-validated.
    gateway_cert_sha256: bytes | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    per_address_per_minute: int = 120
    per_minute: int = 6000
    timeout: float = 600.0  # a whole streamed answer


# How long the gateway's key configurations are served from memory.
KEYS_TTL = 60.0
MAX_KEYS_BYTES = 64 * 1024


@dataclass
class _Relay:
    settings: RelaySettings
    limiter: RateLimiter
    session: aiohttp.ClientSession | None = None
    keys: bytes | None = None
    keys_until: float = 0.0


RELAY: web.AppKey[_Relay] = web.AppKey("relay", _Relay)


def _problem(status: int, title: str, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"type": "about:blank", "title": title, "status": status})
    return web.Response(status=status, body=body, content_type="application/problem+json", headers=headers)


async def forward(request: web.Request) -> web.StreamResponse:
    relay = request.app[RELAY]
    started = time.perf_counter()
    media = request.content_type
    if media not in _FORWARDED_MEDIA:
        return _finish(_problem(415, "send message/ohttp-req or message/ohttp-chunked-req"), started, 0)
    try:
        relay.limiter.admit(request.remote or "", time.monotonic())
    except Overloaded as exc:
        return _finish(_problem(429, "too many requests from this address", {"Retry-After": str(exc.retry_after)}), started, 0)
    if request.content_length is not None and request.content_length > relay.settings.max_body_bytes:
        return _finish(_problem(413, "request body too large"), started, 0)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _finish(_problem(413, "request body too large"), started, 0)
    assert relay.session is not None
    try:
        async with relay.session.post(relay.settings.gateway, data=body, headers={"Content-Type": media}) as upstream:
            answer_media = upstream.content_type
            if answer_media not in _ANSWER_MEDIA:
                return _finish(_problem(502, "the gateway answered something that is not Oblivious HTTP"), started, len(body))
            headers = {"Cache-Control": "no-store"}
            if answer_media != MEDIA_CHUNKED_RESPONSE:
                whole = web.Response(status=upstream.status, body=await upstream.read(), content_type=answer_media, headers=headers)
                return _finish(whole, started, len(body))
            response = web.StreamResponse(status=upstream.status, headers={**headers, "Content-Type": answer_media, "Incremental": "?1"})
            await response.prepare(request)
            async for piece in upstream.content.iter_any():  # each piece as the gateway sends it
                await response.write(piece)
            await response.write_eof()
            return _finish(response, started, len(body))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        log.warning("gateway unreachable: %s", type(exc).__name__)
        return _finish(_problem(502, "the gateway could not be reached"), started, len(body))


def _finish(response: web.StreamResponse, started: float, request_bytes: int) -> web.StreamResponse:
    log.info("relayed status=%d req_bytes=%d ms=%.1f", response.status, request_bytes, (time.perf_counter() - started) * 1000)
    return response


async def gateway_keys(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    started = time.perf_counter()
    try:
        relay.limiter.admit(request.remote or "", time.monotonic())
    except Overloaded as exc:
        return _finish(_problem(429, "too many requests from this address", {"Retry-After": str(exc.retry_after)}), started, 0)
    if relay.keys is None or time.monotonic() >= relay.keys_until:
        assert relay.session is not None
        try:
            async with relay.session.get(relay.settings.gateway.rstrip("/") + "/keys") as upstream:
                body = await upstream.content.read(MAX_KEYS_BYTES + 1)
                if upstream.status != 200 or upstream.content_type != MEDIA_KEYS or len(body) > MAX_KEYS_BYTES:
                    return _finish(_problem(502, "the gateway did not answer its keys"), started, 0)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("gateway unreachable: %s", type(exc).__name__)
            return _finish(_problem(502, "the gateway could not be reached"), started, 0)
        relay.keys, relay.keys_until = body, time.monotonic() + KEYS_TTL
    return _finish(web.Response(body=relay.keys, content_type=MEDIA_KEYS), started, 0)


async def not_allowed(request: web.Request) -> web.Response:
    return _problem(405, "the relay takes POST (and GET /v1/ohttp/keys) only")


async def _session(app: web.Application) -> AsyncIterator[None]:
    relay = app[RELAY]
    # No User-Agent, Accept or Accept-Encoding of aiohttp's own: the gateway sees the same few
    # headers from every client (Host, Content-Type, Content-Length).
    pin = relay.settings.gateway_cert_sha256
    relay.session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=relay.settings.timeout),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        auto_decompress=False,
        connector=aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(pin) if pin else True),
    )
    yield
    with contextlib.suppress(Exception):
        await relay.session.close()


def create_relay_app(settings: RelaySettings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[RELAY] = _Relay(settings, RateLimiter(settings.per_minute, settings.per_address_per_minute))
    app.router.add_get("/v1/ohttp/keys", gateway_keys)
    app.router.add_post("/{path:.*}", forward)
    app.router.add_route("*", "/{path:.*}", not_allowed)
    app.cleanup_ctx.append(_session)
    return app
