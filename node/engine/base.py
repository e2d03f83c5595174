"""The engine interface: what the server asks of vLLM, an upstream server or the echo engine.

Requests and responses are OpenAI-format dicts (the decrypted plaintext, parsed). A streamed
call yields `chat.completion.chunk` / `text_completion` chunk dicts; the last chunk carries
`usage` and empty `choices` (the node always asks for usage). Engines raise the node's error
types: ModelNotFound, EngineBadRequest (parameters the engine refuses), NotReady, EngineError.

`request_id` is the node's own id for the engine request, unique per request: never the
client's X-Request-Id, so that clients cannot collide in (or abort) each other's requests.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ..config import ModelConfig
from ..errors import EngineBadRequest, EngineError, ModelNotFound

Task = Literal["chat", "completions", "embeddings", "images"]
Chunk = dict[str, Any]

# The text tasks: what a model serves when nothing says otherwise (echo, an upstream's unconfigured models).
ALL_TASKS: frozenset[Task] = frozenset({"chat", "completions", "embeddings"})
# What a configured model (`ModelConfig.task`) serves.
TASKS_OF: dict[str, frozenset[Task]] = {
    "generate": frozenset({"chat", "completions"}),
    "embed": frozenset({"embeddings"}),
    "image": frozenset({"images"}),
}


def raise_for_engine_status(status: int) -> None:
    """An engine's OpenAI error status as the node's error: the engine's message is dropped
    (it may quote the request)."""
    if status == 404:
        raise ModelNotFound()
    if 400 <= status < 500:
        raise EngineBadRequest()
    raise EngineError()


def raise_for_engine_error(event: dict[str, Any]) -> None:
    """An OpenAI error event inside a stream (`{"error": {"code": <status>, ...}}`) as the node's error."""
    error = event["error"]
    code = error.get("code") if isinstance(error, dict) else None
    raise_for_engine_status(code if isinstance(code, int) else 500)


@dataclass(frozen=True)
class ModelCard:
    """One served model, as listed by GET /v1/models."""

    id: str
    tasks: frozenset[Task] = field(default_factory=lambda: frozenset({"chat", "completions"}))
    owned_by: str = "tee-node"
    max_model_len: int | None = None
    # Image models: the sizes served, the first the default (empty: any size the engine takes),
    # and the most images one request may ask for.
    image_sizes: tuple[str, ...] = ()
    max_images: int = 1

    @classmethod
    def of(cls, cfg: ModelConfig, **fields: Any) -> ModelCard:
        """The card of a configured model; `fields` (owned_by, max_model_len, image_sizes) as known once loaded."""
        image = {"image_sizes": tuple(cfg.sizes), "max_images": cfg.max_images} if cfg.task == "image" else {}
        return cls(id=cfg.name, tasks=TASKS_OF[cfg.task], **{**image, **fields})

    def to_openai(self, created: int) -> dict[str, Any]:
        """OpenAI's model object, plus `tasks` (the endpoints that serve it), which OpenAI-shaped
        parsers ignore: a client learns which models can chat without trying."""
        return {"id": self.id, "object": "model", "created": created, "owned_by": self.owned_by, "tasks": sorted(self.tasks)}


@runtime_checkable
class Engine(Protocol):
    name: str
    # Whether the engine may serve in a real TEE (the echo engine may not).
    tee_capable: bool

    async def start(self) -> None:
        """Load models; may take minutes. `ready` turns True when done."""

    async def stop(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    def models(self) -> list[ModelCard]: ...

    def weights_sha256(self) -> dict[str, str]:
        """Weight-manifest SHA-256 (hex) of each served model whose weights this node holds,
        known once `ready` (node/models.py `weights_sha256`); the measured config carries it."""

    async def chat(self, request: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[Chunk]:
        """A chat completion; an async iterator of chunks when request["stream"] is true."""

    async def complete(self, request: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[Chunk]:
        """A text completion; an async iterator of chunks when request["stream"] is true."""

    async def embed(self, request: dict[str, Any], request_id: str) -> dict[str, Any]: ...

    async def generate_images(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        """An OpenAI images response (`created`, `data`) for a request the server has checked
        and completed (`serving.prepare_image_request`: size, n and response_format set, within
        the model's card); the server adds the usage."""

    async def abort(self, request_id: str) -> None:
        """Free the engine slot of a request whose client went away (idempotent)."""


async def in_daemon_thread(fn: Callable[..., Any], *args: Any, thread_name: str | None = None) -> Any:
    """`fn(*args)` off the event loop in a daemon thread.

    A load cannot be interrupted; a node stopped while loading abandons it, and interpreter
    exit must not wait for it as it would for `asyncio.to_thread`'s pool threads.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args), None)
        except BaseException as exc:
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            pass

    name = thread_name or f"tee-node-{getattr(fn, '__name__', 'call')}"
    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
