"""Integration fixtures. Each module starts what it needs once (module scope) and stops it
afterwards, so only one vLLM engine holds the CPU at a time."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration_support import clean_env, start_node


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def chat_model_dir() -> Path:
    """The converted SmolLM2 directory (prepared once, then only verified)."""
    from node.config import load_config
    from node.models import prepare_model

    return prepare_model("embedded:smollm2", load_config(None).cache_dir)


@pytest.fixture(scope="module")
def node(module_tmp: Path) -> Iterator[str]:
    """`tee-node serve` with the default config (vLLM engine, both embedded models)."""
    proc, url = start_node(module_tmp, env=clean_env(TEE_NODE_LOG_LEVEL="INFO"))
    try:
        seconds = proc.wait_http(url + "/ready")
        print(f"\nnode ready in {seconds:.1f} s", file=sys.stderr)
        yield url
    finally:
        proc.stop()
