"""Image generation in-process on diffusers: any `DiffusionPipeline` a model directory holds.

Each model gets one worker thread of its own (torch releases the GIL while it computes, so the
event loop keeps serving): requests for a model run one at a time in arrival order, the node's
admission queue in front decides how many may wait. A GPU host runs the pipeline in half
precision; a CPU host in float32 (`dtype` in the model's config overrides both).

Cancellation: a request whose client has gone away (its coroutine cancelled, or `abort`) is
skipped if it has not started, and stopped at the next denoising step if it has (the
pipeline's `callback_on_step_end` raises), so the worker is free for the next one.

Prompts never reach a log: diffusers' and transformers' loggers are set to errors only, and
the progress bars are off.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import ModelConfig, parse_image_size
from node.crypto import b64e
from node.engine.base import ModelCard, in_daemon_thread
from node.errors import EngineError, ModelNotFound, NotReady, PromptTooLong
from node.models import weights_sha256

log = logging.getLogger("tee_node.engine")

# A tokenizer's model_max_length above this is transformers' "no limit" sentinel.
_NO_TOKEN_LIMIT = 1 << 40
_TOKENIZER_ATTRIBUTES = ("tokenizer", "tokenizer_2", "tokenizer_3")


class _Cancelled(Exception):
    """Raised inside the pipeline (at a step's end) to stop a request nobody waits for."""


@dataclass
class _Job:
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Loaded:
    cfg: ModelConfig
    pipeline: Any  # diffusers.DiffusionPipeline
    worker: ThreadPoolExecutor
    card: ModelCard
    max_prompt_tokens: int | None
    stops_between_steps: bool  # the pipeline takes callback_on_step_end


def torch_placement(dtype: str) -> tuple[str, Any]:
    """(device, torch dtype): CUDA in float16 when a GPU is there, else the CPU in float32;
    a configured dtype other than "auto" wins."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype != "auto":
        return device, getattr(torch, dtype)
    return device, torch.float16 if device == "cuda" else torch.float32


def _quiet_libraries() -> None:
    """diffusers and transformers log warnings that can quote inputs, and draw progress bars."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _default_size(pipeline: Any) -> str | None:
    """The pipeline's own default image size: its `default_sample_size` (SD3, FLUX) or its
    UNet's sample size (Stable Diffusion, SDXL), in latents, times the VAE's scale factor."""
    latent = getattr(pipeline, "default_sample_size", None)
    unet = getattr(pipeline, "unet", None)
    if latent is None and unet is not None:
        latent = getattr(unet.config, "sample_size", None)
    scale = getattr(pipeline, "vae_scale_factor", None)
    if not isinstance(latent, int) or not isinstance(scale, int):
        return None
    return f"{latent * scale}x{latent * scale}"


def _tokenizers(pipeline: Any) -> list[Any]:
    """The pipeline's tokenizers that have a window (`model_max_length`)."""
    found = (getattr(pipeline, name, None) for name in _TOKENIZER_ATTRIBUTES)
    return [t for t in found if t is not None and 0 < getattr(t, "model_max_length", 0) < _NO_TOKEN_LIMIT]


def _prompt_limit(pipeline: Any) -> int | None:
    """The longest window among the pipeline's tokenizers (what PROMPT_TOO_LONG reports)."""
    return max((t.model_max_length for t in _tokenizers(pipeline)), default=None)


def _prompt_fits(pipeline: Any, prompt: str) -> bool:
    """Whether some text encoder sees the whole prompt: one over every window would be cut
    (diffusers truncates silently), so it is refused instead."""
    tokenizers = _tokenizers(pipeline)
    return not tokenizers or any(len(t(prompt, truncation=False)["input_ids"]) <= t.model_max_length for t in tokenizers)


def load_model(cfg: ModelConfig) -> _Loaded:
    """Load one pipeline from its directory onto the device (blocking: run it in a thread)."""
    from diffusers import DiffusionPipeline

    _quiet_libraries()
    device, dtype = torch_placement(cfg.dtype)
    pipeline = DiffusionPipeline.from_pretrained(cfg.source, dtype=dtype, local_files_only=True)
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    native = _default_size(pipeline)
    sizes = tuple(cfg.sizes) or ((native,) if native else ())
    if not sizes:
        raise ValueError(f"model {cfg.name}: the pipeline has no default size; list the sizes it serves in `sizes`")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tee-node-image-{cfg.name}")
    stops = "callback_on_step_end" in inspect.signature(pipeline.__call__).parameters
    card = ModelCard.of(cfg, image_sizes=sizes)
    log.info("image model %s: %s on %s (%s), sizes %s", cfg.name, type(pipeline).__name__, device, str(dtype).removeprefix("torch."), ", ".join(sizes))
    return _Loaded(cfg, pipeline, worker, card, _prompt_limit(pipeline), stops)


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _generate(loaded: _Loaded, job: _Job, request: dict[str, Any]) -> dict[str, Any]:
    """One request, on the model's worker thread: the checks that need the tokenizers, the
    pipeline, the PNGs."""
    if job.cancelled.is_set():
        raise _Cancelled()
    pipeline = loaded.pipeline
    prompt = request["prompt"]
    if loaded.max_prompt_tokens is not None and not _prompt_fits(pipeline, prompt):
        raise PromptTooLong(loaded.max_prompt_tokens)
    size = parse_image_size(request["size"])
    assert size is not None  # checked before the engine (serving.prepare_image_request)
    width, height = size
    n = request["n"]
    arguments = {**loaded.cfg.engine_args}
    if loaded.stops_between_steps:

        def stop_if_cancelled(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if job.cancelled.is_set():
                raise _Cancelled()
            return tensors

        arguments["callback_on_step_end"] = stop_if_cancelled
    output = pipeline(prompt=prompt, width=width, height=height, num_images_per_prompt=n, output_type="pil", **arguments)
    images = output.images
    if len(images) != n or any(image.size != (width, height) for image in images):
        raise EngineError()  # a pipeline that ignores the asked size or count answers nothing
    encoded = [b64e(png_bytes(image)) for image in images]
    as_url = request["response_format"] == "url"
    return {
        "created": int(time.time()),
        "data": [{"url": "data:image/png;base64," + b64} if as_url else {"b64_json": b64} for b64 in encoded],
    }


class ImageEngine:
    name = "diffusers"
    tee_capable = True

    def __init__(self, models: list[ModelConfig]) -> None:
        self._configs = models
        self._loaded: dict[str, _Loaded] = {}
        self._weights: dict[str, str] = {}
        self._running: dict[str, _Job] = {}
        self._ready = False

    async def start(self) -> None:
        for cfg in self._configs:
            started = time.monotonic()
            if not (Path(cfg.source) / "model_index.json").is_file():
                raise ValueError(f"image model {cfg.name}: {cfg.source} is not a diffusers pipeline directory")
            self._weights[cfg.name] = await in_daemon_thread(weights_sha256, cfg.source, Path(cfg.source))
            self._loaded[cfg.name] = await in_daemon_thread(load_model, cfg, thread_name="tee-node-image-load")
            log.info("model check: %s ok in %.1f s", cfg.name, time.monotonic() - started)
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        for job in self._running.values():
            job.cancelled.set()
        for loaded in self._loaded.values():
            loaded.worker.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self._ready

    def models(self) -> list[ModelCard]:
        return [loaded.card for loaded in self._loaded.values()]

    def weights_sha256(self) -> dict[str, str]:
        return dict(self._weights)

    def running_requests(self) -> int:
        return len(self._running)

    async def generate_images(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        if not self._ready:
            raise NotReady()
        loaded = self._loaded.get(request.get("model"))  # type: ignore[arg-type]
        if loaded is None:
            raise ModelNotFound()
        job = self._running[request_id] = _Job()
        future: Future = loaded.worker.submit(_generate, loaded, job, request)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            job.cancelled.set()  # the client went away: the worker stops at the next step
            future.cancel()
            raise
        except (PromptTooLong, EngineError):
            raise
        except _Cancelled:
            raise EngineError() from None
        except Exception as exc:  # the library's message can quote the prompt: its type only
            log.warning("image generation failed: %s", type(exc).__name__)
            raise EngineError() from None
        finally:
            self._running.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        job = self._running.get(request_id)
        if job is not None:
            job.cancelled.set()
