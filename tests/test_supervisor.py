"""`tee-node serve`'s supervisor (node/supervisor.py): what the node's child processes write
reaches the terminal until the node closes its output gates before its last line, never after;
a signal to the supervisor stops the node and leaves no process of its group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
from server_support import spawn_node

REPO = Path(__file__).resolve().parents[1]


def test_a_child_writing_after_the_gates_close_reaches_nothing() -> None:
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        from node import supervisor
        supervisor.gate_child_output()
        child = subprocess.Popen(["sh", "-c", "echo child-before; sleep 1; echo child-after >&2; echo child-after"])
        time.sleep(0.5)
        for gate in supervisor._gates:
            gate.close()
        print("node: last line", file=sys.stderr, flush=True)
        child.wait()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "child-before\n"
    assert out.stderr == "node: last line\n"


def test_sigint_to_the_supervisor_stops_the_node_and_its_group() -> None:
    node = spawn_node()
    try:
        (child,) = psutil.Process(node.proc.pid).children()
        assert "node.node_process" in child.cmdline()
        pgid = os.getpgid(child.pid)
        assert pgid == child.pid != os.getpgid(node.proc.pid)  # the node leads a group of its own
        node.proc.send_signal(signal.SIGINT)
        assert node.proc.wait(30) == 0
        deadline = time.monotonic() + 3
        while any(_alive_in(p, pgid) for p in psutil.process_iter()):
            assert time.monotonic() < deadline, "a process of the node's group outlived the supervisor"
            time.sleep(0.05)
    finally:
        node.stop()
    assert node.log().splitlines()[-1].endswith("tee-node stopped")
    node.log_path.unlink(missing_ok=True)


def _alive_in(process: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ProcessLookupError):
        return False
