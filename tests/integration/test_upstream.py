"""`tee-node serve --engine upstream` in front of vLLM's own api_server on loopback."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import BIN, CHAT_MODEL, QUESTION, Proc, clean_env, free_port, start_node  # type: ignore[import-not-found]
from tests.atoma import atoma_available, run_driver, run_driver_lines

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upstream(module_tmp: Path, chat_model_dir: Path) -> Iterator[str]:
    port = free_port()
    cmd = [
        str(BIN / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(chat_model_dir), "--served-model-name", CHAT_MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30),
    ]
    proc = Proc("vllm api_server", cmd, clean_env(), module_tmp / "vllm.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def upstream_node(module_tmp: Path, upstream: str) -> Iterator[str]:
    proc, url = start_node(module_tmp, "--engine", "upstream", "--upstream-url", upstream)
    try:
        proc.wait_http(url + "/ready", timeout=120)
        yield url
    finally:
        proc.stop()


def test_models_come_from_the_upstream(upstream_node: str) -> None:
    with urllib.request.urlopen(upstream_node + "/v1/models", timeout=5) as response:
        assert [m["id"] for m in json.loads(response.read())["data"]] == [CHAT_MODEL]


@pytest.mark.skipif(not atoma_available(), reason="atoma-sdk venv missing (make setup)")
@pytest.mark.parametrize("flags", [[], ["--stream"], ["--stream", "--async"]], ids=["unary", "stream", "stream-async"])
def test_sdk_chat_through_the_upstream(upstream_node: str, flags: list[str]) -> None:
    args = ["chat", "--url", upstream_node, "--model", CHAT_MODEL, "--prompt", QUESTION, "--max-tokens", "24", "--temperature", "0", *flags]
    if "--stream" in flags:
        result = run_driver_lines(args, timeout=180)[-1]
    else:
        result = run_driver(args, timeout=180)
        assert result["response"]["usage"]["prompt_tokens"] > 0
    assert result.get("ok") is True, result
    assert "Paris" in result["content"]
