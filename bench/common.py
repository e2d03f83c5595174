"""Small helpers shared by the benchmarks: median timing and result files."""

from __future__ import annotations

import gc
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "docs" / "benchmarks"
BIN = Path(sys.executable).parent


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, rounds: int = 5, repeat: int = 600) -> dict[str, float]:
    """Median wall time of one call of each function, in ns, over `rounds * repeat` calls each.

    The functions take turns call by call, so that the machine's speed, which drifts on this VM
    by up to 1.8x within seconds (the same X25519 measured 36 to 64 us in one process, no steal
    time), is the same for all of them: a case and its floor are timed microseconds apart, and
    their ratio holds where timings taken one function after another did not (a case once
    measured below a floor it contains). Each call is timed on its own (the median shrugs off
    scheduler noise); the GC is paused while timing so that a collection lands on no sample.
    """
    calls = list(fns.items())
    for _, fn in calls:
        for _ in range(max(50, repeat // 10)):
            fn()
    samples: dict[str, list[int]] = {name: [] for name in fns}
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_ in range(rounds):
            # Each round reverses the turn order: no function always follows the same one.
            order = calls if round_ % 2 == 0 else calls[::-1]
            for _ in range(repeat):
                for name, fn in order:
                    start = clock()
                    fn()
                    samples[name].append(clock() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: float(statistics.median(values)) for name, values in samples.items()}


def us(ns: float) -> str:
    return f"{ns / 1000:.1f} µs"


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def environment() -> dict[str, Any]:
    import cryptography
    import nacl

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cryptography": cryptography.__version__,
        "pynacl": nacl.__version__,
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write `docs/benchmarks/<name>.json` (with the environment and a UTC timestamp)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_pid(launched: int) -> int:
    """The node's own process under `tee-node serve`'s supervisor (node/supervisor.py), whose pid
    `launched` is: CPU time and profiles are the node's, not the supervisor's."""
    import psutil

    for child in psutil.Process(launched).children():
        try:
            if "node.node_process" in child.cmdline():
                return child.pid
        except psutil.Error:
            continue
    return launched  # no supervisor (not Linux): the node itself


def _signal_session(sid: int, signum: int) -> None:
    """Every process of the session `sid` (a server started with start_new_session): the
    supervised node runs in a process group of its own within it."""
    import psutil

    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                process.send_signal(signum)
        except (psutil.Error, ProcessLookupError):
            continue


class Server:
    """A server process in its own process group, its output in `log`; offline, no TEE_NODE_*
    settings from this shell, plus `env`."""

    def __init__(self, name: str, cmd: list[str], url: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.url, self.log = name, url, log
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")}
        environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
        self._log = log.open("wb")
        self.proc = subprocess.Popen(cmd, env=environ, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, path: str, timeout: float = 900) -> float:
        """Seconds from now until `path` answers 200."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} not ready after {timeout:.0f}s; see {self.log}")

    def freeze(self) -> None:
        _signal_session(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        _signal_session(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()  # a frozen process group cannot act on SIGTERM
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
