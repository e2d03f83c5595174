"""Start-up and stop of a real `tee-node serve` with the vLLM engine: a signal while the engines
load ends the whole process group (node, engine cores, workers) within 3 s; a ready node stops
with its own last line and no vLLM warning."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from integration_support import clean_env, start_node  # type: ignore[import-not-found]

pytestmark = pytest.mark.integration

STOP_WITHIN = 3.0


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of the group (zombies have exited: their parent just has not reaped them)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (psutil.Error, ProcessLookupError):
            continue
    return members


def wait_for_engine_processes(pgid: int, proc, timeout: float = 600.0) -> None:
    """Until vLLM's engine processes run beside the node (the load is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.popen.poll() is None, f"the node exited while starting:\n{proc.tail()}"
        if len(group_members(pgid)) >= 3:  # the node, an engine core and a worker at least
            return
        time.sleep(0.2)
    pytest.fail(f"no engine process after {timeout:.0f} s:\n{proc.tail()}")


def stop_seconds(proc, pgid: int, send) -> float:
    """Send the signal, then seconds until no process of the group is left."""
    started = time.monotonic()
    send()
    while time.monotonic() - started < 60:
        proc.popen.poll()  # reap the node itself
        if not group_members(pgid):
            return time.monotonic() - started
        time.sleep(0.05)
    pytest.fail(f"processes left 60 s after the signal: {[p.cmdline() for p in group_members(pgid)]}")


@pytest.mark.parametrize(
    "how",
    ["SIGINT to the group (Ctrl-C)", "SIGTERM to the node alone (a service manager)"],
)
def test_a_signal_during_start_up_ends_the_process_group_within_3_s(tmp_path: Path, how: str) -> None:
    proc, _ = start_node(tmp_path, env=clean_env(TEE_NODE_LOG_LEVEL="INFO"))
    pgid = proc.popen.pid  # start_node starts a new session: the node leads its group
    try:
        wait_for_engine_processes(pgid, proc)
        if how.startswith("SIGINT"):
            seconds = stop_seconds(proc, pgid, lambda: os.killpg(pgid, signal.SIGINT))
        else:
            seconds = stop_seconds(proc, pgid, lambda: proc.popen.send_signal(signal.SIGTERM))
    finally:
        proc.stop()
    assert seconds <= STOP_WITHIN, f"{how}: the process group took {seconds:.1f} s to end:\n{proc.tail()}"
    assert "tee-node stopped" in proc.log.read_text(), proc.tail()


def test_a_ready_node_stops_with_its_own_line_and_no_vllm_warning(tmp_path: Path) -> None:
    proc, url = start_node(tmp_path, env=clean_env(TEE_NODE_LOG_LEVEL="INFO"))
    pgid = proc.popen.pid
    try:
        proc.wait_http(url + "/ready")
        ready_at = len(proc.log.read_text().splitlines())
        seconds = stop_seconds(proc, pgid, lambda: proc.popen.send_signal(signal.SIGTERM))
    finally:
        proc.stop()
    after_ready = proc.log.read_text().splitlines()[ready_at:]
    assert after_ready[-1].endswith("tee-node stopped"), "\n".join(after_ready)
    assert not [line for line in after_ready if "WARNING" in line or "Warning" in line], "\n".join(after_ready)
    print(f"ready node stopped in {seconds:.1f} s")
