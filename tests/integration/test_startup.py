"""Start-up and stop of a real `tee-node serve` with the vLLM engine: a signal at any moment of
the engine load ends every process of the node's (supervisor, node, engine cores, workers)
within 3 s, says nothing more of its start once stopping, and nothing is printed after the
node's last line; a warm start is never silent for over 3 s; a ready node stops with its own
last line and no vLLM warning."""

from __future__ import annotations

import datetime
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from integration_support import clean_env, start_node  # type: ignore[import-not-found]

pytestmark = pytest.mark.integration

STOP_WITHIN = 3.0
WORKER_TITLE = "VLLM::Worker"
LAST_LINE = "tee-node stopped"


def session_members(sid: int) -> list[psutil.Process]:
    """Live processes of the session `start_node` opened: the supervisor, the node in its own
    process group, and everything vLLM spawns (zombies have exited: not counted)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (psutil.Error, ProcessLookupError):
            continue
    return members


def _titles(processes: list[psutil.Process]) -> list[str]:
    titles = []
    for process in processes:
        try:
            titles.append(" ".join(process.cmdline())[:80])
        except psutil.Error:
            continue
    return titles


def wait_until(proc, sid: int, reached: Callable[[list[str]], bool], what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.popen.poll() is None, f"the node exited while starting:\n{proc.tail()}"
        assert " READY at " not in proc.log.read_text(), f"ready before {what}"
        if reached(_titles(session_members(sid))):
            return
        time.sleep(0.1)
    pytest.fail(f"never reached {what} within {timeout:.0f} s:\n{proc.tail()}")


def stop_seconds(proc, sid: int, send: Callable[[], None]) -> float:
    """Send the signal, then seconds until no process of the session is left."""
    started = time.monotonic()
    send()
    while time.monotonic() - started < 60:
        proc.popen.poll()  # reap the supervisor itself
        if not session_members(sid):
            return time.monotonic() - started
        time.sleep(0.05)
    pytest.fail(f"processes left 60 s after the signal: {_titles(session_members(sid))}")


def _log_has(text: str) -> Callable[[Path], Callable[[list[str]], bool]]:
    return lambda log: lambda _titles: text in log.read_text()


def _engine_core(log: Path) -> Callable[[list[str]], bool]:
    return lambda titles: any("EngineCore" in t or "multiprocessing.spawn" in t for t in titles)


def _workers(log: Path) -> Callable[[list[str]], bool]:
    return lambda titles: any(t.startswith(WORKER_TITLE) for t in titles)


def _workers_for(seconds: float) -> Callable[[Path], Callable[[list[str]], bool]]:
    def at(log: Path) -> Callable[[list[str]], bool]:
        first_seen: list[float] = []

        def reached(titles: list[str]) -> bool:
            if not any(t.startswith(WORKER_TITLE) for t in titles):
                return False
            first_seen[:1] = first_seen[:1] or [time.monotonic()]
            return time.monotonic() - first_seen[0] >= seconds

        return reached

    return at


# Moments of a start, from the model check to the weights' load and compilation in the workers.
MOMENTS = {
    "model check": _log_has("model check"),
    "engine loading": _log_has("engine: loading"),
    "engine cores spawned": _engine_core,
    "workers spawned": _workers,
    "workers loading for 8 s": _workers_for(8.0),
}


def _sigint_to_the_terminal_group(proc) -> Callable[[], None]:
    # start_node's session has one group, as a terminal's foreground job: Ctrl-C signals it.
    return lambda: os.killpg(proc.popen.pid, signal.SIGINT)


def _sigterm_to_the_supervisor(proc) -> Callable[[], None]:
    return lambda: proc.popen.send_signal(signal.SIGTERM)


@pytest.mark.parametrize(
    "moment, how",
    [
        ("model check", "SIGINT"),
        ("engine loading", "SIGTERM"),
        ("engine cores spawned", "SIGINT"),
        ("workers spawned", "SIGTERM"),
        ("workers loading for 8 s", "SIGINT"),
    ],
)
def test_a_signal_during_start_up_ends_every_process_within_3_s_and_silently(tmp_path: Path, moment: str, how: str) -> None:
    proc, _ = start_node(tmp_path, env=clean_env(TEE_NODE_LOG_LEVEL="INFO"))
    sid = proc.popen.pid  # start_node starts a new session: the supervisor leads it
    try:
        wait_until(proc, sid, MOMENTS[moment](proc.log), moment)
        send = _sigint_to_the_terminal_group(proc) if how == "SIGINT" else _sigterm_to_the_supervisor(proc)
        seconds = stop_seconds(proc, sid, send)
        time.sleep(1.0)  # anything still buffered somewhere would have reached the log by now
    finally:
        proc.stop()
    lines = proc.log.read_text().splitlines()
    assert seconds <= STOP_WITHIN, f"{how} at {moment}: {seconds:.1f} s until no process was left:\n{proc.tail()}"
    assert lines[-1].endswith(LAST_LINE), f"{how} at {moment}: printed after the node's last line:\n{proc.tail()}"
    assert not [line for line in lines if "Traceback" in line], f"{how} at {moment}:\n{proc.tail()}"
    stopping = next(i for i, line in enumerate(lines) if " stopping: " in line)
    assert not [line for line in lines[stopping:] if " engine: still " in line], f"{how} at {moment}:\n{proc.tail()}"
    print(f"{how} at {moment}: no process left after {seconds:.1f} s")


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR|CRITICAL|DEBUG) \S+ ")
# The longest a start may leave the log silent: a line says what is still loading before then.
SILENT_AT_MOST = 3.0


def longest_silence(lines: list[str]) -> tuple[float, str]:
    """Seconds of the longest stretch without a line, and the line that ended it. By time, not
    by order in the file: vLLM's processes and the node write through different pipes."""
    stamped = sorted((datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"), line) for line in lines)
    gaps = [((later - earlier).total_seconds(), line) for (earlier, _), (later, line) in zip(stamped, stamped[1:])]
    return max(gaps)


def test_a_warm_start_says_only_the_nodes_lines_then_stops_with_its_own_line(tmp_path: Path) -> None:
    """At the default level a start prints no vLLM warning or notice and nothing outside the
    node's log format (Python's bare last-resort output, torch's C++ notices), and is never
    silent for over 3 s (a line says what is still loading); a ready node says nothing more of
    its start and stops with its own last line."""
    proc, url = start_node(tmp_path, env=clean_env(TEE_NODE_LOG_LEVEL="INFO"))
    sid = proc.popen.pid
    try:
        proc.wait_http(url + "/ready")
        ready_at = len(proc.log.read_text().splitlines())
        seconds = stop_seconds(proc, sid, lambda: proc.popen.send_signal(signal.SIGTERM))
    finally:
        proc.stop()
    lines = proc.log.read_text().splitlines()
    before_ready, after_ready = lines[:ready_at], lines[ready_at:]
    assert all(LOG_LINE.match(line) for line in before_ready), "\n".join(before_ready)
    assert all(" INFO " in line for line in before_ready), "\n".join(before_ready)
    assert any(" engine: loading " in line for line in before_ready) and " READY at " in before_ready[-1]
    silence, ended_by = longest_silence(before_ready)
    assert silence <= SILENT_AT_MOST, f"{silence:.1f} s without a line, until: {ended_by}\n" + "\n".join(before_ready)
    assert any(" engine: still loading " in line for line in before_ready), "\n".join(before_ready)
    assert not [line for line in after_ready if " engine: still " in line], "\n".join(after_ready)
    assert after_ready[-1].endswith(LAST_LINE), "\n".join(after_ready)
    assert not [line for line in after_ready if "WARNING" in line or "Warning" in line], "\n".join(after_ready)
    print(f"longest silence before READY: {silence:.1f} s; ready node stopped in {seconds:.1f} s")
