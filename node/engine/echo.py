"""The echo engine: streams back the prompt's words with real usage counts.

For protocol tests and benchmarks of the node's own overhead. It has no model, so the node
refuses it in a TEE mode (`tee_capable = False`).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from ..errors import EngineError, ModelNotFound, NotReady
from .base import Chunk, ModelCard, Task

DEFAULT_ECHO_MODEL = "echo"


def _words_of(content: Any) -> list[str]:
    if isinstance(content, str):
        return content.split()
    if isinstance(content, list):  # OpenAI content parts
        return [w for part in content if isinstance(part, dict) for w in str(part.get("text", "")).split()]
    return []


def _prompt_words(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [w for item in value for w in _prompt_words(item)] if value and not isinstance(value[0], int) else [
            str(t) for t in value
        ]
    return []


class EchoEngine:
    name = "echo"
    tee_capable = False

    def __init__(
        self,
        models: list[ModelCard] | None = None,
        token_delay: float = 0.0,
        fail_after_tokens: int | None = None,
    ) -> None:
        self._models = {m.id: m for m in (models or [ModelCard(DEFAULT_ECHO_MODEL, frozenset({"chat", "completions", "embeddings"}))])}
        self.token_delay = token_delay
        # Fault injection for reliability tests: raise EngineError after this many tokens.
        self.fail_after_tokens = fail_after_tokens
        self.running: set[str] = set()
        self._aborted: set[str] = set()
        self._ready = False
        self.failed = False

    async def start(self) -> None:
        self._ready = True

    async def stop(self) -> None:
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready and not self.failed

    def running_requests(self) -> int:
        return len(self.running)

    def weights_sha256(self) -> dict[str, str]:
        return {}  # no weights: the echo engine answers from the prompt

    def models(self) -> list[ModelCard]:
        return list(self._models.values())

    def _model(self, request: dict[str, Any], task: Task) -> str:
        if not self.ready:
            raise NotReady()
        model = request.get("model")
        card = self._models.get(model) if isinstance(model, str) else None
        if card is None or task not in card.tasks:
            raise ModelNotFound()
        return card.id

    async def chat(self, request: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[Chunk]:
        model = self._model(request, "chat")
        messages = request.get("messages") or []
        prompt_words = [w for m in messages if isinstance(m, dict) for w in _words_of(m.get("content"))]
        last_user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
        output = _words_of(last_user.get("content"))
        return self._respond(request, request_id, model, len(prompt_words), output, chat=True)

    async def complete(self, request: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[Chunk]:
        model = self._model(request, "completions")
        words = _prompt_words(request.get("prompt"))
        return self._respond(request, request_id, model, len(words), words, chat=False)

    async def embed(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        model = self._model(request, "embeddings")
        inputs = request.get("input")
        items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        data, tokens = [], 0
        for index, item in enumerate(items):
            words = _prompt_words(item)
            tokens += len(words)
            digest = hashlib.blake2b(" ".join(words).encode(), digest_size=32).digest()
            vector = [b - 127.5 for b in digest[:16]]
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            data.append({"object": "embedding", "index": index, "embedding": [v / norm for v in vector]})
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _respond(self, request, request_id, model, prompt_tokens, output, chat):
        max_tokens = request.get("max_tokens") or request.get("max_completion_tokens")
        finish = "stop"
        if isinstance(max_tokens, int) and len(output) > max_tokens:
            output, finish = output[:max_tokens], "length"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(output), "total_tokens": prompt_tokens + len(output)}
        if request.get("stream"):
            return self._stream(request_id, model, output, finish, usage, chat)
        text = " ".join(output)
        created = int(time.time())
        if chat:
            return {
                "id": f"chatcmpl-{request_id}",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": usage,
            }
        return {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": usage,
        }

    async def _stream(self, request_id, model, output, finish, usage, chat) -> AsyncIterator[Chunk]:
        created = int(time.time())
        chunk_id = f"chatcmpl-{request_id}" if chat else f"cmpl-{request_id}"
        kind = "chat.completion.chunk" if chat else "text_completion"
        self.running.add(request_id)
        try:
            for index, word in enumerate(output):
                if request_id in self._aborted:
                    return
                if self.fail_after_tokens is not None and index >= self.fail_after_tokens:
                    self.failed = True
                    raise EngineError("echo engine failure injected")
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                text = word if index == 0 else " " + word
                last = index == len(output) - 1
                choice: dict[str, Any] = {"index": 0, "finish_reason": finish if last else None}
                if chat:
                    choice["delta"] = {"role": "assistant", "content": text} if index == 0 else {"content": text}
                else:
                    choice["text"] = text
                yield {"id": chunk_id, "object": kind, "created": created, "model": model, "choices": [choice]}
            yield {"id": chunk_id, "object": kind, "created": created, "model": model, "choices": [], "usage": usage}
        finally:
            self.running.discard(request_id)
            self._aborted.discard(request_id)

    async def abort(self, request_id: str) -> None:
        # The request leaves the engine now: its stream may never be iterated again (the
        # server's aclose() of it can fail), so the generator's finally cannot be relied on.
        if request_id in self.running:
            self._aborted.add(request_id)
            self.running.discard(request_id)
