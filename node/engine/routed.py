"""Several engines behind one: each request goes to the engine that serves its model.

A config with text and image models runs vLLM for the text models and diffusers for the image
models; the node sees one engine, ready when every part is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ..errors import ModelNotFound, NotReady
from .base import Chunk, Engine, ModelCard


class RoutedEngine:
    def __init__(self, engines: list[Engine]) -> None:
        self.engines = engines
        self.name = "+".join(engine.name for engine in engines)
        self.tee_capable = all(engine.tee_capable for engine in engines)

    async def start(self) -> None:
        await asyncio.gather(*(engine.start() for engine in self.engines))

    async def stop(self) -> None:
        await asyncio.gather(*(engine.stop() for engine in self.engines))

    @property
    def ready(self) -> bool:
        return all(engine.ready for engine in self.engines)

    def models(self) -> list[ModelCard]:
        return [card for engine in self.engines for card in engine.models()]

    def weights_sha256(self) -> dict[str, str]:
        return {name: digest for engine in self.engines for name, digest in engine.weights_sha256().items()}

    def running_requests(self) -> int:
        return sum(getattr(engine, "running_requests", lambda: 0)() for engine in self.engines)

    def _engine_of(self, request: dict[str, Any]) -> Engine:
        if not self.ready:
            raise NotReady()
        model = request.get("model")
        for engine in self.engines:
            if any(card.id == model for card in engine.models()):
                return engine
        raise ModelNotFound()

    async def chat(self, request: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[Chunk]:
        return await self._engine_of(request).chat(request, request_id)

    async def complete(self, request: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[Chunk]:
        return await self._engine_of(request).complete(request, request_id)

    async def embed(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        return await self._engine_of(request).embed(request, request_id)

    async def generate_images(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        return await self._engine_of(request).generate_images(request, request_id)

    async def abort(self, request_id: str) -> None:
        await asyncio.gather(*(engine.abort(request_id) for engine in self.engines))
