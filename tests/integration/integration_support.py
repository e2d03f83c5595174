"""Helpers of the integration tests: real processes (the node, vLLM's api_server) on free
loopback ports, their output in a log file whose tail is shown when one fails to come up.
(A module of its own, not conftest: `tests/conftest.py` is also imported as `conftest`.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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
