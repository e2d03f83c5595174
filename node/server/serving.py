"""Per-endpoint serving logic: confidential (envelope) and, when enabled, plain OpenAI routes.

Handlers parse, call, respond; everything cryptographic is `node.envelope`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from .. import envelope
from ..config import parse_image_size
from ..engine.base import Engine, ModelCard, Task
from ..errors import (
    BodyTooLarge,
    ComputeUnitsMismatch,
    InternalError,
    InvalidBody,
    InvalidPlaintext,
    ModelNotFound,
    NotReady,
    ReplayedRequest,
    StaleNodeKey,
    TokenSpent,
    TooManyImages,
    Unauthorized,
    UnsupportedImageSize,
)
from ..protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ImageGenerationRequest, Usage
from ..wire import SSE_DONE, SSE_KEEPALIVE, sse_event
from .coalesce import coalesce
from .middleware import CONTEXT, RequestContext
from .privacy_pass import authorization_token
from .state import NODE, NodeState, bearer_token

log = logging.getLogger("tee_node.serving")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Engine chunks buffered between the engine and a slow client (then the engine waits).
STREAM_QUEUE_DEPTH = 64
# Seconds between checks that the client of a long unary call (an image) is still connected.
CLIENT_GONE_POLL = 0.1
# OpenAI's default size, for an engine that takes any size (an upstream's image model).
DEFAULT_IMAGE_SIZE = "1024x1024"
ENGINE_FAILED_EVENT = sse_event(orjson.dumps({"error": {"code": InternalError.code, "message": "engine failed"}}))


@dataclass(frozen=True)
class Endpoint:
    task: Task
    schema: type[BaseModel]
    streamable: bool

    def call(self, engine: Engine, payload: dict[str, Any], engine_id: str):
        if self.task == "chat":
            return engine.chat(payload, engine_id)
        if self.task == "completions":
            return engine.complete(payload, engine_id)
        if self.task == "images":
            return engine.generate_images(payload, engine_id)
        return engine.embed(payload, engine_id)


CHAT = Endpoint("chat", ChatCompletionRequest, True)
COMPLETIONS = Endpoint("completions", CompletionRequest, True)
EMBEDDINGS = Endpoint("embeddings", EmbeddingRequest, False)
IMAGES = Endpoint("images", ImageGenerationRequest, False)


async def authorize(state: NodeState, request: web.Request) -> None:
    """A bearer token of an account, or (`auth.privacy_pass.enabled`) an unspent PrivateToken,
    which this spends. Open when the node has no accounts (simulated only)."""
    if state.privacy_pass is not None:
        token = authorization_token(request)
        if token is not None:
            try:
                await state.privacy_pass.redeem(token)
            except TokenSpent:
                state.metrics.refusals.labels("token_spent").inc()
                raise
            state.metrics.tokens_redeemed.inc()
            return
    if not state.token_allowed(bearer_token(request)):
        raise Unauthorized()


async def read_body(state: NodeState, request: web.Request, ctx: RequestContext) -> bytes:
    """The whole body within the size limit and the read timeout (a slow client holds no slot)."""
    limits = state.config.limits
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise BodyTooLarge()
    try:
        async with asyncio.timeout(limits.read_timeout):  # no task per request, as wait_for makes
            body = await request.read()
    except TimeoutError:
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
        state.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        state.metrics.completion_tokens.inc(usage["completion_tokens"])


def prepare_image_request(payload: dict[str, Any], card: ModelCard) -> int:
    """Fill in an image request's defaults (n 1, the model's first size, a data URL) and check
    it against the model's card; return its compute units (width x height x n)."""
    size = payload.get("size") or (card.image_sizes[0] if card.image_sizes else DEFAULT_IMAGE_SIZE)
    dimensions = parse_image_size(size)
    if dimensions is None or (card.image_sizes and size not in card.image_sizes):
        raise UnsupportedImageSize(card.image_sizes)
    n = payload.get("n") or 1
    if n > card.max_images:
        raise TooManyImages(card.max_images)
    payload.update(size=size, n=n, response_format=payload.get("response_format") or "url")
    payload.pop("stream", None)
    payload.pop("stream_options", None)
    return image_units(payload)


def image_units(payload: dict[str, Any]) -> int:
    """Compute units of a prepared image request: width x height x n."""
    width, height = parse_image_size(payload["size"])  # type: ignore[misc]
    return width * height * payload["n"]


async def _while_connected(request: web.Request, call: Any) -> Any:
    """Await `call`, cancelling it when the client hangs up (aiohttp does not cancel a unary
    handler then): an image in the making is dropped at its next step."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=CLIENT_GONE_POLL)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client went away")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _unary(
    request: web.Request, state: NodeState, endpoint: Endpoint, payload: dict[str, Any], engine_id: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A non-streamed engine call: its answer and usage, counted in the metrics (tokens, or
    images); an image call is dropped if the client leaves."""
    if endpoint.task != "images":
        result = await endpoint.call(state.engine, payload, engine_id)
        usage = usage_of(result)
        _count_tokens(state, usage)
        return result, usage
    started = time.perf_counter()
    try:
        result = await _while_connected(request, endpoint.call(state.engine, payload, engine_id))
    except ConnectionResetError:
        await state.engine.abort(engine_id)
        raise
    state.metrics.image_seconds.observe(time.perf_counter() - started)
    state.metrics.images.inc(payload["n"])
    # Usage counts compute units (pixels), as Atoma meters images: the node's count, whatever
    # an upstream server reports.
    units = image_units(payload)
    result["usage"] = {"prompt_tokens": 0, "completion_tokens": units, "total_tokens": units}
    return result, usage_of(result)


def _prepare_payload(payload: dict[str, Any], endpoint: Endpoint) -> bool:
    """Decide streaming from the plaintext; always ask the engine for usage on streams."""
    if endpoint.task == "images":
        return False  # prepare_image_request has set the request up
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
    await authorize(state, request)
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
        # Length hiding: the engine never sees the request's padding.
        opened.sealer.padding = envelope.take_obfuscation(payload)
        model = payload["model"]
        card = state.model_card(model, endpoint.task)
        if model != outer.model_name or card is None:
            raise ModelNotFound()
        ctx.model = model
        if endpoint.task == "images":
            units = prepare_image_request(payload, card)
            if outer.num_compute_units is not None and outer.num_compute_units != units:
                raise ComputeUnitsMismatch()
        stream = _prepare_payload(payload, endpoint)
        if not stream:
            result, usage = await _unary(request, state, endpoint, payload, ctx.engine_id)
            clear = envelope.usage_in_clear(usage, state.config.privacy.clear_usage)
            sealed = opened.sealer.seal_response(orjson.dumps(result), model, clear)
            return web.Response(body=orjson.dumps(sealed), content_type="application/json", headers={"X-Request-Id": ctx.request_id})
        result = await endpoint.call(state.engine, payload, ctx.engine_id)
        sealer = opened.sealer
        cadence_ms = state.config.limits.stream_cadence_ms
        return await _stream(
            request, state, ctx, result, _SealedEncoder(state, sealer, model), cadence_ms / 1000 if cadence_ms else None
        )


class _SealedEncoder:
    """Seals chunks into events. The chunk carrying usage is the engine's last; it is held
    until the engine ends so that it can take the receipt."""

    def __init__(self, state: NodeState, sealer: envelope.ResponseSealer, model: str) -> None:
        # Each event costs an encryption and a signature: merging queued chunks pays here.
        self.coalesce_max = state.config.limits.stream_coalesce_max
        self._state = state
        self._sealer = sealer
        self._model = model
        self._clear_usage = state.config.privacy.clear_usage
        self._usage: dict[str, Any] | None = None  # exact: counted in the metrics
        self._clear: dict[str, Any] | None = None  # what events and the receipt show
        self._held: dict[str, Any] | None = None
        self._last: dict[str, Any] = {}

    def encode(self, chunks: list[dict[str, Any]]) -> list[bytes]:
        events = []
        for chunk in chunks:
            self._last = chunk
            if self._held is not None:
                events.append(_sse(self._sealer.seal_event(orjson.dumps(self._held), self._clear)))
                self._held = None
            if isinstance(chunk.get("usage"), dict):
                self._usage = Usage.from_openai(chunk["usage"]).model_dump()
                self._clear = envelope.usage_in_clear(self._usage, self._clear_usage)
                self._held = chunk
                continue
            events.append(_sse(self._sealer.seal_event(orjson.dumps(chunk), self._clear)))
        return events

    def end(self) -> list[bytes]:
        # Without a usage chunk last from the engine, the receipt still needs a final event.
        held = self._held if self._held is not None else self._empty_chunk()
        _count_tokens(self._state, self._usage)
        return [_sse(self._sealer.seal_final_event(orjson.dumps(held), self._model, self._clear))]

    def filler(self) -> list[bytes]:
        """An event with no text, for a cadence tick with nothing ready (padded, it has the
        size of a one-token event)."""
        return [_sse(self._sealer.seal_event(orjson.dumps(self._empty_chunk()), self._clear))]

    def _empty_chunk(self) -> dict[str, Any]:
        """A chunk without choices, which clients skip (the shape of the usage chunk)."""
        chunk = {k: self._last[k] for k in ("id", "object", "created", "model") if k in self._last}
        chunk.setdefault("model", self._model)
        chunk["choices"] = []
        return chunk


class _PlainEncoder:
    # A plain event costs less than merging chunks (bench/server.py): one event per chunk.
    coalesce_max = 1

    def __init__(self, state: NodeState) -> None:
        self._state = state

    def encode(self, chunks: list[dict[str, Any]]) -> list[bytes]:
        for chunk in chunks:
            if isinstance(chunk.get("usage"), dict):
                _count_tokens(self._state, usage_of(chunk))
        return [_sse(chunk) for chunk in chunks]

    def end(self) -> list[bytes]:
        return [sse_event(SSE_DONE)]


def _sse(event: dict[str, Any]) -> bytes:
    return sse_event(orjson.dumps(event))


class _EngineFailed:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


_END = object()


async def _produce(chunks: AsyncIterator[dict[str, Any]], queue: asyncio.Queue) -> None:
    """Own the engine's iterator: move its chunks into `queue`, then the end or the failure.

    Running the engine in its own task lets the writer see every chunk already made when it
    comes back from a write (so it can batch and coalesce them), and cancelling this task is
    all it takes to stop the engine's iterator cleanly."""
    try:
        async for chunk in chunks:
            await queue.put(chunk)
    except Exception as exc:  # handed to the writer, which ends the stream with the error event
        await queue.put(_EngineFailed(exc))
    else:
        await queue.put(_END)
    finally:
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]


async def _ready_items(queue: asyncio.Queue, keepalive: float, response: web.StreamResponse) -> list[Any]:
    """Everything the engine has made so far; waits for at least one item, writing a
    keep-alive comment after each `keepalive` seconds of silence."""
    while queue.empty():
        try:
            async with asyncio.timeout(keepalive):
                first = await queue.get()
        except TimeoutError:
            await response.write(SSE_KEEPALIVE)
            continue
        return [first, *_drain(queue)]
    return _drain(queue)


def _drain(queue: asyncio.Queue) -> list[Any]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def _as_ready(
    queue: asyncio.Queue, encoder: _SealedEncoder | _PlainEncoder, keepalive: float, response: web.StreamResponse
) -> AsyncIterator[list[bytes]]:
    """The events of every chunk the engine has made when the writer comes back, coalesced
    where that loses nothing (`coalesce`); a stream that keeps up is never delayed. An engine
    failure is raised after the events of the chunks made before it."""
    ended = False
    while not ended:
        batch = []
        failure: Exception | None = None
        for item in await _ready_items(queue, keepalive, response):
            if item is _END:
                ended = True
            elif isinstance(item, _EngineFailed):
                failure = item.error
            else:
                batch.append(item)
        events = encoder.encode(coalesce(batch, encoder.coalesce_max))
        if ended:
            events += encoder.end()
        if events:
            yield events
        if failure is not None:
            raise failure


async def _on_cadence(queue: asyncio.Queue, encoder: _SealedEncoder, period: float) -> AsyncIterator[list[bytes]]:
    """Exactly one event per `period` (`limits.stream_cadence_ms`): all the text ready by then
    merged into one chunk, or a filler when none is, so that event timing follows the clock
    and not the tokens. Chunks that cannot be merged (a role or finish change, logprobs) go
    out one per tick; at most a queue's depth of them is taken from the engine ahead, so a
    fast engine waits on the bounded queue. The final event goes on the tick after the last
    chunk; an engine failure is raised on the tick that sees it."""
    loop = asyncio.get_running_loop()
    pending: list[dict[str, Any]] = []
    ended = False
    tick = loop.time()
    while True:
        # A writer held up by a slow client resumes from now rather than bursting to catch up.
        tick = max(tick + period, loop.time())
        await asyncio.sleep(tick - loop.time())
        failure: Exception | None = None
        while not ended and len(pending) < STREAM_QUEUE_DEPTH and not queue.empty():
            item = queue.get_nowait()
            if item is _END:
                ended = True
            elif isinstance(item, _EngineFailed):
                failure = item.error
                break
            else:
                pending.append(item)
        if failure is not None:
            raise failure
        pending = coalesce(pending, len(pending))
        events: list[bytes] = []
        while pending and not events:  # the usage chunk makes no event: it waits for the end
            events = encoder.encode([pending.pop(0)])
        if not events and ended:
            yield encoder.end()
            return
        yield events or encoder.filler()


async def _stream(
    request: web.Request,
    state: NodeState,
    ctx: RequestContext,
    chunks: AsyncIterator[dict[str, Any]],
    encoder: _SealedEncoder | _PlainEncoder,
    cadence: float | None = None,
) -> web.StreamResponse:
    """Send the engine's `chunks` as server-sent events made by `encoder`: as they are ready
    (`_as_ready`), or one per `cadence` seconds on confidential streams (`_on_cadence`).

    A client that goes away, or an engine that fails, aborts the engine request; an engine
    failure ends the stream with a content-free error event (the headers are already sent).
    """
    response = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": ctx.request_id})
    await response.prepare(request)
    queue: asyncio.Queue = asyncio.Queue(STREAM_QUEUE_DEPTH)
    producer = asyncio.create_task(_produce(chunks, queue))
    if cadence is not None:
        batches = _on_cadence(queue, encoder, cadence)  # only confidential streams have a cadence
    else:
        batches = _as_ready(queue, encoder, state.config.limits.keepalive_interval, response)
    completed = False
    try:
        async with contextlib.aclosing(batches):
            async for events in batches:
                if ctx.first_event_at is None:
                    ctx.first_event_at = time.perf_counter()
                    state.metrics.ttft.labels(ctx.route).observe(ctx.first_event_at - ctx.started)
                ctx.events += len(events)
                data = b"".join(events)
                ctx.response_bytes += len(data)
                await response.write(data)
        completed = True
    except ConnectionResetError:
        ctx.client_gone = True  # nobody to tell: the access line and the metrics count it
    except Exception as exc:  # NodeError or unexpected: the headers are out, end with the error event
        log.warning("stream %s ended by engine error %s", ctx.request_id, type(exc).__name__)
        with contextlib.suppress(ConnectionError):
            await response.write(ENGINE_FAILED_EVENT)
    finally:
        state.metrics.stream_events.inc(ctx.events)
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        if not completed:
            await state.engine.abort(ctx.engine_id)
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


# --- plain OpenAI routes (only with allow_plaintext) ---------------------------------------


async def serve_plain(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[NODE]
    ctx = request[CONTEXT]
    await authorize(state, request)
    payload = parse_plaintext(await read_body(state, request, ctx), endpoint)
    if not state.engine.ready:
        raise NotReady()
    async with state.admission.slot():
        model = payload["model"]
        card = state.model_card(model, endpoint.task)
        if card is None:
            raise ModelNotFound()
        ctx.model = model
        if endpoint.task == "images":
            prepare_image_request(payload, card)
        stream = _prepare_payload(payload, endpoint)
        if not stream:
            result, _ = await _unary(request, state, endpoint, payload, ctx.engine_id)
            return web.Response(body=orjson.dumps(result), content_type="application/json", headers={"X-Request-Id": ctx.request_id})
        result = await endpoint.call(state.engine, payload, ctx.engine_id)
        return await _stream(request, state, ctx, result, _PlainEncoder(state))
