"""Per-endpoint serving logic: confidential (envelope) and, when enabled, plain OpenAI routes.

Handlers parse, call, respond; everything cryptographic is `node.envelope`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import types
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from .. import envelope
from ..engine.base import Engine, Task
from ..errors import (
    BodyTooLarge,
    InvalidBody,
    InvalidPlaintext,
    ModelNotFound,
    NodeError,
    NotReady,
    ReplayedRequest,
    StaleNodeKey,
    Unauthorized,
)
from ..protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, Usage
from .middleware import CONTEXT, RequestContext
from .state import NODE, NodeState

log = logging.getLogger("tee_node.serving")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE = b": keep-alive\n\n"
# Most stream events written at once when they are ready together (see `_stream`).
WRITE_BATCH = 16
ENGINE_FAILED_EVENT = b'data: {"error":{"code":"INTERNAL_ERROR","message":"engine failed"}}\n\n'


@dataclass(frozen=True)
class Endpoint:
    task: Task
    schema: type[BaseModel]
    streamable: bool

    def call(self, engine: Engine, payload: dict[str, Any], request_id: str):
        if self.task == "chat":
            return engine.chat(payload, request_id)
        if self.task == "completions":
            return engine.complete(payload, request_id)
        return engine.embed(payload, request_id)


CHAT = Endpoint("chat", ChatCompletionRequest, True)
COMPLETIONS = Endpoint("completions", CompletionRequest, True)
EMBEDDINGS = Endpoint("embeddings", EmbeddingRequest, False)


def check_auth(state: NodeState, request: web.Request) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not state.token_allowed(token.strip() if scheme.lower() == "bearer" else None):
        raise Unauthorized()


async def read_body(state: NodeState, request: web.Request, ctx: RequestContext) -> bytes:
    """The whole body within the size limit and the read timeout (a slow client holds no slot)."""
    limits = state.config.limits
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise BodyTooLarge()
    try:
        body = await asyncio.wait_for(request.read(), limits.read_timeout)
    except asyncio.TimeoutError:
        raise InvalidBody("request body not received in time") from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge() from None
    ctx.request_bytes = len(body)
    return body


def parse_plaintext(data: bytes, endpoint: Endpoint) -> dict[str, Any]:
    """The decrypted OpenAI request as a dict, checked against the endpoint's schema."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidPlaintext() from None
    if not isinstance(payload, dict):
        raise InvalidPlaintext()
    try:
        endpoint.schema.model_validate(payload)
    except ValidationError:
        raise InvalidPlaintext() from None
    if not isinstance(payload.get("stream_options"), (dict, type(None))):  # merged into on streams
        raise InvalidPlaintext()
    return payload


def usage_of(result: dict[str, Any]) -> dict[str, Any] | None:
    usage = result.get("usage")
    return Usage.from_openai(usage).model_dump() if isinstance(usage, dict) else None


def _count_tokens(state: NodeState, usage: dict[str, Any] | None) -> None:
    if usage:
        state.metrics.tokens.labels("prompt").inc(usage["prompt_tokens"])
        state.metrics.tokens.labels("completion").inc(usage["completion_tokens"])


def _prepare_payload(payload: dict[str, Any], endpoint: Endpoint) -> bool:
    """Decide streaming from the plaintext; always ask the engine for usage on streams."""
    stream = endpoint.streamable and payload.get("stream") is True
    if stream:
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    else:
        payload["stream"] = False
        payload.pop("stream_options", None)
    return stream


async def serve_confidential(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[NODE]
    ctx = request[CONTEXT]
    check_auth(state, request)
    body = await read_body(state, request, ctx)
    outer = envelope.parse_request(body)
    decoded = envelope.decode_request(outer)
    if state.trusted_proxy_keys:
        envelope.verify_proxy_signature(decoded, request.headers.get("X-Signature"), state.trusted_proxy_keys)
    if not state.engine.ready:
        raise NotReady()
    async with state.admission.slot():
        try:
            opened = envelope.open_request(decoded, state.keyring, state.signer)
            state.keyring.claim(opened.key, opened.replay_identity)
        except StaleNodeKey:
            state.metrics.refusals.labels("stale_key").inc()
            raise
        except ReplayedRequest:
            state.metrics.refusals.labels("replay").inc()
            raise
        payload = parse_plaintext(opened.plaintext, endpoint)
        model = payload["model"]
        if model != outer.model_name or state.model_card(model, endpoint.task) is None:
            raise ModelNotFound()
        ctx.model = model
        stream = _prepare_payload(payload, endpoint)
        result = await endpoint.call(state.engine, payload, ctx.request_id)
        if not stream:
            usage = usage_of(result)
            _count_tokens(state, usage)
            sealed = opened.sealer.seal_response(orjson.dumps(result), model, usage)
            return web.Response(body=orjson.dumps(sealed), content_type="application/json", headers={"X-Request-Id": ctx.request_id})
        sealer = opened.sealer
        return await _stream(request, state, ctx, result, lambda chunks: _sealed_events(chunks, state, sealer, model))


async def _sealed_events(
    chunks: AsyncIterator[dict[str, Any]], state: NodeState, sealer: envelope.ResponseSealer, model: str
) -> AsyncIterator[bytes]:
    """Seal each chunk as it comes. The chunk carrying usage is the engine's last; it is held
    until the engine ends so that it can take the receipt."""
    usage: dict[str, Any] | None = None
    held: dict[str, Any] | None = None
    last: dict[str, Any] = {}
    async for chunk in chunks:
        last = chunk
        if held is not None:
            yield _sse(sealer.seal_event(orjson.dumps(held), usage))
            held = None
        if isinstance(chunk.get("usage"), dict):
            usage = Usage.from_openai(chunk["usage"]).model_dump()
            held = chunk
            continue
        yield _sse(sealer.seal_event(orjson.dumps(chunk), usage))
    if held is None:
        # The engine ended without a usage chunk last: a stream must still end with the receipt,
        # so it goes on an empty final chunk (clients skip chunks without choices).
        held = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
        held["choices"] = []
    _count_tokens(state, usage)
    yield _sse(sealer.seal_final_event(orjson.dumps(held), model, usage))


async def _plain_events(chunks: AsyncIterator[dict[str, Any]], state: NodeState) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if isinstance(chunk.get("usage"), dict):
            _count_tokens(state, usage_of(chunk))
        yield _sse(chunk)
    yield b"data: [DONE]\n\n"


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def _stream(
    request: web.Request,
    state: NodeState,
    ctx: RequestContext,
    chunks: AsyncIterator[dict[str, Any]],
    make_events: Callable[[AsyncIterator[dict[str, Any]]], AsyncIterator[bytes]],
) -> web.StreamResponse:
    """Send the events `make_events` makes of the engine's `chunks` as server-sent events.

    A client that goes away, or an engine that fails, aborts the engine request; an engine
    failure ends the stream with a content-free error event (the headers are already sent).
    """
    response = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": ctx.request_id})
    await response.prepare(request)
    events = make_events(_with_keepalive(chunks, state.config.limits.keepalive_interval, response))
    finished = False
    # Events that are ready one after the other go out in one write (up to WRITE_BATCH): the
    # same bytes, fewer syscalls. An event is never held back to wait for a later one.
    batch: list[bytes] = []
    try:
        while True:
            step = events.__anext__()
            try:
                blocked_on = step.send(None)
            except StopIteration as ready:
                data = ready.value
            except StopAsyncIteration:
                break
            else:
                if batch:
                    try:
                        await response.write(b"".join(batch))
                    except BaseException:
                        await _cancel_step(step, blocked_on)  # else the generators stay running
                        raise
                    batch.clear()
                try:
                    data = await _resume(step, blocked_on)
                except StopAsyncIteration:
                    break
            if ctx.first_event_at is None:
                ctx.first_event_at = time.perf_counter()
                state.metrics.ttft.labels(ctx.route).observe(ctx.first_event_at - ctx.started)
            ctx.events += 1
            ctx.response_bytes += len(data)
            batch.append(data)
            if len(batch) >= WRITE_BATCH:
                await response.write(b"".join(batch))
                batch.clear()
        if batch:
            await response.write(b"".join(batch))
        finished = True
    except ConnectionResetError:
        raise  # the client went away: nobody to tell
    except Exception as exc:  # NodeError or unexpected: the headers are out, end with the error event
        log.warning("stream %s ended by engine error %s", ctx.request_id, type(exc).__name__)
        with contextlib.suppress(ConnectionError):
            await response.write(b"".join(batch) + ENGINE_FAILED_EVENT)
    finally:
        state.metrics.stream_events.inc(ctx.events)
        if not finished:
            await state.engine.abort(ctx.request_id)
        for generator in (events, chunks):
            with contextlib.suppress(Exception):
                await generator.aclose()  # type: ignore[attr-defined]
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


async def _with_keepalive(
    chunks: AsyncIterator[dict[str, Any]], interval: float, response: web.StreamResponse
) -> AsyncIterator[dict[str, Any]]:
    """Yield the engine's chunks; write a keep-alive comment after each `interval` of silence.

    The next chunk is first asked for in place: an engine that has it ready answers without
    suspending, and no task or timer is made. Only an engine that has to wait gets the rest
    of that step in a task, watched with the keep-alive timeout (`_resume`).
    """
    iterator = chunks.__aiter__()
    while True:
        step = iterator.__anext__()
        try:
            blocked_on = step.send(None)
        except StopIteration as ready:
            yield ready.value
            continue
        except StopAsyncIteration:
            return
        next_chunk = asyncio.ensure_future(_resume(step, blocked_on))
        try:
            while True:
                done, _ = await asyncio.wait((next_chunk,), timeout=interval)
                if done:
                    break
                await response.write(KEEPALIVE)
        except BaseException:  # a failed keep-alive, or this generator cancelled or closed
            next_chunk.cancel()  # the engine step must not go on alone
            raise
        try:
            yield next_chunk.result()
        except StopAsyncIteration:
            return


async def _cancel_step(step: Any, blocked_on: Any) -> None:
    """Cancel a step started in place but not finished, so that the generators under it (and
    the engine's) run their cleanup instead of staying suspended for good."""
    task = asyncio.ensure_future(_resume(step, blocked_on))
    await asyncio.sleep(0)  # the task takes over the wait; a task cancelled unstarted never would
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


@types.coroutine
def _resume(step: Any, blocked_on: Any) -> Any:
    """Finish a coroutine `step` that has already run up to its first suspension, where it
    yielded `blocked_on` (what `yield from step` would do had it started it)."""
    while True:
        try:
            sent = yield blocked_on
        except BaseException as exc:  # cancellation and the like go on to the step
            try:
                blocked_on = step.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                blocked_on = step.send(sent)
            except StopIteration as done:
                return done.value


# --- plain OpenAI routes (only with allow_plaintext) ---------------------------------------


async def serve_plain(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[NODE]
    ctx = request[CONTEXT]
    check_auth(state, request)
    payload = parse_plaintext(await read_body(state, request, ctx), endpoint)
    if not state.engine.ready:
        raise NotReady()
    async with state.admission.slot():
        model = payload["model"]
        if state.model_card(model, endpoint.task) is None:
            raise ModelNotFound()
        ctx.model = model
        stream = _prepare_payload(payload, endpoint)
        result = await endpoint.call(state.engine, payload, ctx.request_id)
        if not stream:
            _count_tokens(state, usage_of(result))
            return web.Response(body=orjson.dumps(result), content_type="application/json", headers={"X-Request-Id": ctx.request_id})
        return await _stream(request, state, ctx, result, lambda chunks: _plain_events(chunks, state))
