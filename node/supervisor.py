"""`tee-node serve` as two processes, so that a stop leaves no process behind.

This small one stays where it was started (a terminal's foreground group, a service manager's
unit) and runs the node in a process group of its own, which every process vLLM spawns joins:

- a terminal's Ctrl-C reaches this process and the node, never vLLM's engine processes directly
  (signalled mid-load, they printed tracebacks for seconds); the node ends them itself;
- once the node has exited, whatever is left of its group (a worker whose engine core died while
  spawning it, an engine core a load thread spawned as the node exited) is killed at once;
- the node's child processes write to pipes the node forwards (`OutputGate`), closed before the
  node's last line: whatever a dying vLLM process still writes then reaches no terminal.

Linux only (`prctl`); elsewhere `tee-node serve` runs the node in this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
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
_gates: list["OutputGate"] = []
# How long closing a gate waits for output already written to be forwarded.
GATE_DRAIN_SECONDS = 0.2
# A line the gate's watchers get is cut to this many bytes (output without newlines stays bounded).
WATCHED_LINE_BYTES = 1 << 16


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


class OutputGate:
    """File descriptor `fd` (1 or 2) of this process becomes a pipe that every child inherits; a
    thread forwards what arrives to the original file, which this process itself keeps writing
    to (`real`), and hands each line forwarded to the `watchers`. Once closed, what children
    still write is read and dropped."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.watchers: list[Callable[[str], None]] = []
        self._partial = b""
        self.real = os.dup(fd)
        self._read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self._open = True
        self._lock = threading.Lock()
        threading.Thread(target=self._forward, name=f"tee-node-output-{fd}", daemon=True).start()

    def _forward(self) -> None:
        while data := os.read(self._read, 1 << 16):
            with self._lock:
                if self._open:
                    with contextlib.suppress(OSError):
                        _write_all(self.real, data)
                    if self.watchers:
                        self._watch(data)

    def _watch(self, data: bytes) -> None:
        *lines, partial = (self._partial + data).split(b"\n")
        self._partial = partial[-WATCHED_LINE_BYTES:]
        for line in lines:
            text = line[:WATCHED_LINE_BYTES].decode("utf-8", "replace")
            for watcher in list(self.watchers):
                # A failing watcher must not end the forwarding: children would block on a full pipe.
                with contextlib.suppress(Exception):
                    watcher(text)

    def close(self) -> None:
        deadline = time.monotonic() + GATE_DRAIN_SECONDS
        while _unread(self._read) and time.monotonic() < deadline:
            time.sleep(0.005)
        with self._lock:  # a chunk being forwarded is finished first
            self._open = False


def _unread(fd: int) -> int:
    pending = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, pending)
    return int.from_bytes(pending, sys.byteorder)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def gate_child_output() -> None:
    """In the node, before anything is logged or spawned: stdout and stderr of every child go
    through OutputGates; the node's own `sys.stdout` and `sys.stderr` write to the originals."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        gate = OutputGate(fd)
        _gates.append(gate)
        setattr(sys, name, open(gate.real, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False))


def watch_child_output(watcher: Callable[[str], None]) -> Callable[[], None] | None:
    """Hand `watcher` each line this node's children write to stderr (vLLM's logging), in the
    gate's thread. Returns the call that stops it, or None when there is no gate (the node is
    not supervised) and so nothing to watch."""
    gate = next((gate for gate in _gates if gate.fd == 2), None)
    if gate is None:
        return None
    gate.watchers.append(watcher)
    return lambda: gate.watchers.remove(watcher)


def end_leftovers() -> None:
    """In a supervised node whose engine has stopped, before its last line: SIGKILL whatever else
    is left of its process group but the resource tracker, and close the output gates. The
    engine's stop ends the processes it finds among the node's descendants; this also ends one
    that got away, and silences one that would still write while dying."""
    if not _leading_group:
        return
    _sweep_group()
    for gate in _gates:
        gate.close()


def _sweep_group() -> None:
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
