"""Forward decrypted requests to an OpenAI-compatible server inside the same confidential VM.

`engine.upstream_url` is that server's base URL (e.g. `http://127.0.0.1:8000`, a trailing `/v1`
is accepted) or its unix socket (`unix:/run/vllm.sock`): typically
`python -m vllm.entrypoints.openai.api_server` on loopback. Plaintext crosses only the
VM-internal loopback, never the host (real TEE modes refuse any other address). Bodies are
never logged.

A background poller keeps `ready` and the model list current (`/health`, then `/v1/models`),
so the node reports NOT_READY while the upstream loads or restarts.

One pooled keep-alive session holds up to `max_in_flight` connections
(the admission limit, so no admitted request waits for one), without a cookie jar. Answers
and stream chunks are parsed once with orjson: keeping their bytes to pass them on unparsed
cost more per chunk than orjson's parse and re-serialisation (callgrind, see docs/benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from node.config import UNIX_SOCKET_PREFIX, EngineConfig
from node.engine.base import ALL_TASKS, Chunk, ModelCard, Task, raise_for_engine_error, raise_for_engine_status
from node.errors import EngineError, ModelNotFound, NotReady
from node.wire import SSE_DONE, EventTooLarge, SSEDecoder

log = logging.getLogger(__name__)

POLL_INTERVAL = 2.0


class UpstreamEngine:
    name = "upstream"
    tee_capable = True

    def __init__(self, config: EngineConfig, max_connections: int = 64) -> None:
        self.config = config
        self._max_connections = max_connections
        url = (config.upstream_url or "").rstrip("/")
        self._socket_path: str | None = None
        if url.startswith(UNIX_SOCKET_PREFIX):
            # HTTP over the socket: the host name in the URL only fills the Host header.
            self._socket_path, url = url[len(UNIX_SOCKET_PREFIX):], "http://localhost"
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url
        self._headers = {"Content-Type": "application/json"}
        if config.upstream_api_key:
            self._headers["Authorization"] = f"Bearer {config.upstream_api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task | None = None
        self._ready = False
        self._models: list[ModelCard] = []
        self._responses: dict[str, aiohttp.ClientResponse] = {}
        self._aborted: set[str] = set()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.config.upstream_timeout)
        # Keep-alive connections up to the admission limit; the health poller shares them.
        limit = self._max_connections + 1
        if self._socket_path:
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=self._socket_path, limit=limit)
        else:
            connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
        # No cookie jar: the upstream sets none worth keeping, and the jar costs on every request.
        self._session = aiohttp.ClientSession(
            timeout=timeout, headers=self._headers, connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        )
        await self.poll()
        self._poller = asyncio.create_task(self._poll_forever(), name="upstream-health")

    async def stop(self) -> None:
        self._ready = False
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for response in list(self._responses.values()):
            response.close()
        self._responses.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            await self.poll()

    async def poll(self) -> bool:
        """One health check; updates `ready` and the model list. True when the upstream serves."""
        was_ready = self._ready
        try:
            healthy = await self._get_status("/health") == 200
            models = await self._get_models()
            self._ready = healthy and bool(models)
            if models:
                self._models = models
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self._ready = False
            if was_ready:
                log.warning("upstream unreachable: %s", type(exc).__name__)
        if self._ready != was_ready:
            log.info("upstream %s", "ready" if self._ready else "not ready")
        return self._ready

    async def _get_status(self, path: str) -> int:
        assert self._session is not None
        async with self._session.get(self.base_url + path, timeout=aiohttp.ClientTimeout(total=5)) as response:
            return response.status

    async def _get_models(self) -> list[ModelCard]:
        assert self._session is not None
        async with self._session.get(self.base_url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as response:
            if response.status != 200:
                return []
            listing = orjson.loads(await response.read())
        configured = {m.name: m for m in self.config.models}
        cards = []
        for entry in listing.get("data", []):
            if not (isinstance(entry, dict) and isinstance(entry.get("id"), str)):
                continue
            known = {"owned_by": entry.get("owned_by") or "upstream", "max_model_len": entry.get("max_model_len")}
            cfg = configured.get(entry["id"])
            cards.append(ModelCard.of(cfg, **known) if cfg else ModelCard(id=entry["id"], tasks=ALL_TASKS, **known))
        return cards

    @property
    def ready(self) -> bool:
        return self._ready

    def models(self) -> list[ModelCard]:
        return list(self._models)

    def weights_sha256(self) -> dict[str, str]:
        return {}  # the weights are the upstream's: this node holds none to digest

    # --- requests -----------------------------------------------------------------------------

    def _check(self, request: dict[str, Any], task: Task) -> None:
        if not self._ready or self._session is None:
            raise NotReady()
        card = next((m for m in self._models if m.id == request.get("model")), None)
        if card is None or task not in card.tasks:
            raise ModelNotFound()

    async def _post(self, path: str, body: dict[str, Any], request_id: str) -> aiohttp.ClientResponse:
        assert self._session is not None
        try:
            response = await self._session.post(
                self.base_url + path, data=orjson.dumps(body), headers={"X-Request-Id": request_id}
            )
        except (aiohttp.ClientError, asyncio.TimeoutError):
            raise EngineError() from None
        if response.status != 200:
            response.release()
            raise_for_engine_status(response.status)
        self._responses[request_id] = response
        return response

    async def _unary(self, path: str, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        try:
            response = await self._post(path, body, request_id)
            async with response:
                answer = orjson.loads(await response.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError):
            raise EngineError() from None
        finally:
            self._aborted.discard(request_id)
            self._responses.pop(request_id, None)
        if not isinstance(answer, dict):
            raise EngineError()  # not an OpenAI answer: the node's error, never a crash serving it
        return answer

    async def _forward(self, path: str, request: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[Chunk]:
        if not request.get("stream"):
            return await self._unary(path, request, request_id)
        options = request.get("stream_options")
        body = {**request, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
        try:
            response = await self._post(path, body, request_id)
        except BaseException:
            self._responses.pop(request_id, None)
            raise
        return self._stream(response, request_id)

    async def _stream(self, response: aiohttp.ClientResponse, request_id: str) -> AsyncIterator[Chunk]:
        """The upstream's server-sent events as chunk dicts; leaving early closes the upstream
        connection, which makes the upstream abort the request."""
        decoder = SSEDecoder()
        try:
            async for raw in response.content.iter_any():
                for data in decoder.feed(raw):
                    if data == SSE_DONE:
                        return
                    chunk = orjson.loads(data)
                    if "error" in chunk and "choices" not in chunk:
                        raise_for_engine_error(chunk)
                    yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError, EventTooLarge):
            if request_id in self._aborted:
                return  # abort() closed the connection: the stream just ends
            raise EngineError() from None
        finally:
            self._aborted.discard(request_id)
            self._responses.pop(request_id, None)
            response.close()

    async def chat(self, request: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[Chunk]:
        self._check(request, "chat")
        return await self._forward("/v1/chat/completions", request, request_id)

    async def complete(self, request: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[Chunk]:
        self._check(request, "completions")
        return await self._forward("/v1/completions", request, request_id)

    async def embed(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        self._check(request, "embeddings")
        return await self._unary("/v1/embeddings", request, request_id)

    async def generate_images(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        """Passed through to the upstream's OpenAI images API (vLLM-Omni serves diffusion models so)."""
        self._check(request, "images")
        return await self._unary("/v1/images/generations", request, request_id)

    async def abort(self, request_id: str) -> None:
        response = self._responses.pop(request_id, None)
        if response is not None:
            self._aborted.add(request_id)
            response.close()
