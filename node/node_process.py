"""The node's own process under `tee-node serve`'s supervisor (`python -m node.node_process`).

On a CPU host vLLM starts its engine processes with multiprocessing's spawn method, which imports
the parent's main module in each child (as `__mp_main__`) before it unpickles anything. vLLM
logs while it is being imported there, before it reads its logging config in that process, and
Python prints those records bare ("Triton is installed, but doesn't include CPU backend", once
per engine process at every start). Imported first, this module applies vLLM's logging config
(`VLLM_LOGGING_CONFIG_PATH`, written by the engine before it starts vLLM) in every such process.
Nothing else is imported here: each engine process pays for what this module imports.
"""

from __future__ import annotations

import json
import logging.config
import os
import sys


def _apply_vllm_logging() -> None:
    path = os.environ.get("VLLM_LOGGING_CONFIG_PATH")
    if not path:
        return
    try:
        with open(path, encoding="utf-8") as file:
            logging.config.dictConfig(json.load(file))
    except (OSError, ValueError):
        return  # vLLM reads the same file itself later and reports what is wrong with it


if __name__ == "__mp_main__":
    _apply_vllm_logging()

if __name__ == "__main__":
    from node.cli import main

    sys.exit(main())
