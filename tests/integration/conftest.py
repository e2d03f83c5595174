"""Integration fixtures: real processes (the node, vLLM's api_server) on free loopback ports.

Each module starts what it needs once (module scope) and stops it afterwards, so only one
vLLM engine holds the CPU at a time. Process output goes to a log file whose tail is shown
when a process fails to come up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
QUESTION = "What is the capital of France?"
START_TIMEOUT = 900.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without TEE_NODE_* overrides, offline, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if "TEE_NODE_CACHE_DIR" in os.environ:
        env["TEE_NODE_CACHE_DIR"] = os.environ["TEE_NODE_CACHE_DIR"]
    env.update(extra)
    return env


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self._log_file = log.open("wb")
        # Own process group: stopping it also stops vLLM's engine-core children.
        self.popen = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_http(self, url: str, timeout: float = START_TIMEOUT) -> float:
        """Seconds until `url` answers 200; fails with the log tail if the process dies first."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.popen.poll() is not None:
                pytest.fail(f"{self.name} exited {self.popen.returncode} while starting:\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{self.name} not ready at {url} after {timeout:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log_file.close()


def start_node(tmp: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("tee-node", [str(BIN / "tee-node"), "serve", "--port", str(port), *flags], env or clean_env(), tmp / "node.log")
    return proc, f"http://127.0.0.1:{port}"


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
