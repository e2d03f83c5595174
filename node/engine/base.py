"""The engine interface: what the server asks of vLLM, an upstream server or the echo engine.

Requests and responses are OpenAI-format dicts (the decrypted plaintext, parsed). A streamed
call yields `chat.completion.chunk` / `text_completion` chunk dicts; the last chunk carries
`usage` and empty `choices` (the node always asks for usage). Engines raise the node's error
types: ModelNotFound, EngineBadRequest (parameters the engine refuses), NotReady, EngineError.

`request_id` is the node's own id for the engine request, unique per request: never the
client's X-Request-Id, so that clients cannot collide in (or abort) each other's requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ..errors import EngineBadRequest, EngineError, ModelNotFound

Task = Literal["chat", "completions", "embeddings"]
Chunk = dict[str, Any]

ALL_TASKS: frozenset[Task] = frozenset({"chat", "completions", "embeddings"})
# What a configured model (`ModelConfig.task`) serves.
TASKS_OF: dict[str, frozenset[Task]] = {
    "generate": frozenset({"chat", "completions"}),
    "embed": frozenset({"embeddings"}),
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

    async def abort(self, request_id: str) -> None:
        """Free the engine slot of a request whose client went away (idempotent)."""
