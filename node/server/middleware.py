"""One error middleware: request ids, our exception types to the error table, access logs.

Logs carry request id, route, model, sizes, status and timings only. Unexpected exceptions are
logged by type and code location, never by message: messages of parsers and libraries can
quote the input.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import traceback
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from ..errors import BodyTooLarge, InternalError, InvalidBody, MethodNotAllowed, NodeError, NotFound
from .state import NODE

log = logging.getLogger("tee_node.access")
error_log = logging.getLogger("tee_node.errors")

# A client's X-Request-Id is echoed and logged only: a bounded, log-safe alphabet.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Probes polled every second or so: counted in the metrics, not written to the access log.
UNLOGGED_ROUTES = frozenset({"/health", "/ready"})


@dataclass
class RequestContext:
    request_id: str  # echoed in X-Request-Id and logged: the client's when valid
    route: str
    started: float
    # The engine's key for this request, always the node's own: two clients sending the same
    # X-Request-Id must never share (or abort) each other's engine request.
    engine_id: str = field(default_factory=lambda: secrets.token_hex(16))
    model: str | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    first_event_at: float | None = None
    events: int = 0
    client_gone: bool = False  # the client hung up before the answer was complete


# The status logged and counted for a request whose client hung up (nginx's "client closed request").
CLIENT_GONE = 499

CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("tee_node.context", RequestContext)


def error_response(exc: NodeError, request_id: str) -> web.Response:
    error = {"code": exc.code, "message": exc.safe_message, **exc.extra()}
    headers = {"X-Request-Id": request_id}
    if exc.kind.retry_after:
        headers["Retry-After"] = str(getattr(exc, "retry_after", 1))
    if exc.kind.problem_type is not None:  # RFC 9457, with our code kept in `error` for clients that read it
        problem = {"type": exc.kind.problem_type, "title": exc.safe_message, "status": exc.status, "error": error}
        return web.Response(status=exc.status, body=orjson.dumps(problem), content_type="application/problem+json", headers=headers)
    return web.Response(status=exc.status, body=orjson.dumps({"error": error}), content_type="application/json", headers=headers)


# aiohttp's own refusals (no such route, method or a broken request line) by status.
_HTTP_ERRORS = {cls.status: cls for cls in (NotFound, MethodNotAllowed)}


def _http_error(exc: web.HTTPException, request_id: str) -> web.Response:
    return error_response(_HTTP_ERRORS.get(exc.status, InvalidBody)(), request_id)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID.match(given) else secrets.token_hex(16)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    ctx = RequestContext(request_id, route, time.perf_counter())
    request[CONTEXT] = ctx
    try:
        response = await handler(request)
    except NodeError as exc:
        response = error_response(exc, request_id)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(BodyTooLarge(), request_id)
    except web.HTTPException as exc:
        response = _http_error(exc, request_id)
    except asyncio.CancelledError:
        _account(request, ctx, CLIENT_GONE)
        raise
    except ConnectionResetError:
        # The client hung up: normal traffic, counted and logged below as one access line. Raised
        # on, aiohttp would log it as an ERROR with its traceback.
        ctx.client_gone = True
        response = web.Response(status=CLIENT_GONE)  # never sent: the connection is closed
    except Exception as exc:
        error_log.error("request %s failed: %s at %s", request_id, type(exc).__name__, _where(exc))
        response = error_response(InternalError(), request_id)
    if not response.prepared:
        response.headers.setdefault("X-Request-Id", request_id)
        issuer = request.app[NODE].privacy_pass
        if response.status == 401 and issuer is not None:  # RFC 9577: say how to get in anonymously
            response.headers["WWW-Authenticate"] = issuer.www_authenticate()
        if response.body is not None and hasattr(response.body, "__len__"):
            ctx.response_bytes = len(response.body)
    _account(request, ctx, CLIENT_GONE if ctx.client_gone else response.status)
    return response


def _account(request: web.Request, ctx: RequestContext, status: int) -> None:
    elapsed = time.perf_counter() - ctx.started
    request.app[NODE].metrics.answered(ctx.route, status, elapsed)
    if ctx.route not in UNLOGGED_ROUTES and log.isEnabledFor(logging.INFO):
        ttft = f"{(ctx.first_event_at - ctx.started) * 1000:.1f}" if ctx.first_event_at else "-"
        log.info(
            "id=%s route=%s model=%s status=%d req_bytes=%d resp_bytes=%d events=%d ms=%.1f ttft_ms=%s",
            ctx.request_id,
            ctx.route,
            ctx.model or "-",
            status,
            ctx.request_bytes,
            ctx.response_bytes,
            ctx.events,
            elapsed * 1000,
            ttft,
        )
