"""`tee-node serve` as two processes, so that a stop leaves no process behind.

This small one stays where it was started (a terminal's foreground group, a service manager's
unit) and runs the node in a process group of its own, which every process vLLM spawns joins:

- a terminal's Ctrl-C reaches this process and the node, never vLLM's engine processes directly
  (signalled mid-load, they printed tracebacks for seconds); the node ends them itself;
- once the node has exited, whatever is left of its group (a worker whose engine core died while
  spawning it, an engine core a load thread spawned as the node exited) is killed at once, so
  nothing of the node's runs or prints after its last line.

Linux only (`prctl`); elsewhere `tee-node serve` runs the node in this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Any

# Names the supervisor's pid in the node's environment: the node checks that this parent is
# alive after asking to be signalled when it dies.
SUPERVISOR_ENV = "TEE_NODE_SUPERVISOR_PID"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# multiprocessing's resource tracker exits by itself once its last user has, and unlinks the
# shared memory vLLM's killed processes left: it gets this long before it is killed too.
RESOURCE_TRACKER_SECONDS = 2.0
# How long the node's last sweep of its group may take (a SIGKILLed process exits in milliseconds).
SWEEP_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def supported() -> bool:
    return sys.platform == "linux"


def supervised() -> bool:
    """Whether this process is the node run by a supervisor."""
    return SUPERVISOR_ENV in os.environ


def supervise(argv: list[str]) -> int:
    """Run `python -m node.node_process *argv` in a new process group; forward stop signals to it; when it
    exits, end what is left of its group. Returns the node's exit status."""
    env = {**os.environ, SUPERVISOR_ENV: str(os.getpid())}
    node = subprocess.Popen([sys.executable, "-m", "node.node_process", *argv], env=env, process_group=0)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            node.send_signal(signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    status = node.wait()
    end_group(node.pid)
    return status if status >= 0 else 128 - status


_leading_group = False


def leads_group() -> bool:
    """Whether this process is a node its supervisor runs in a process group of its own."""
    return _leading_group


def end_group(pgid: int) -> None:
    """SIGKILL every live process of the group but the resource tracker, which gets
    RESOURCE_TRACKER_SECONDS to finish its clean-up before it is killed as well."""
    deadline = time.monotonic() + RESOURCE_TRACKER_SECONDS
    while True:
        members = _group_members(pgid)
        if not members:
            return
        for process, is_tracker in members:
            if not is_tracker or time.monotonic() >= deadline:
                with contextlib.suppress(Exception):
                    process.kill()
        time.sleep(0.02)


def _group_members(pgid: int) -> list[tuple[Any, bool]]:
    import psutil

    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) != pgid or process.status() == psutil.STATUS_ZOMBIE:
                continue
            is_tracker = any("resource_tracker" in part for part in process.cmdline())
        except (psutil.Error, ProcessLookupError):
            continue
        members.append((process, is_tracker))
    return members


def bind_to_supervisor() -> None:
    """In the node: stop (SIGTERM) if the supervisor dies, and adopt the engine processes that
    lose their parent (a worker whose engine core was killed while starting it), so that the
    engine's stop still finds them among this process's descendants."""
    global _leading_group
    _leading_group = True
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    supervisor = int(os.environ.pop(SUPERVISOR_ENV))
    if os.getppid() != supervisor:  # it died before the request above
        os.kill(os.getpid(), signal.SIGTERM)


def sweep_own_group() -> None:
    """In a supervised node whose engine has stopped: SIGKILL whatever else is left of its
    process group but the resource tracker, before the node's last line. The engine's stop
    ends the processes it finds among the node's descendants; this also ends one that got
    away (a worker seen running past the engine's stop once in six signalled starts)."""
    if not _leading_group:
        return
    pgid, me = os.getpgid(0), os.getpid()
    deadline = time.monotonic() + SWEEP_SECONDS
    while time.monotonic() < deadline:
        others = [process for process, is_tracker in _group_members(pgid) if not is_tracker and process.pid != me]
        if not others:
            return
        for process in others:
            with contextlib.suppress(Exception):
                process.kill()
        time.sleep(0.02)
