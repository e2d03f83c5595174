"""What a starting engine is still doing, said every PROGRESS_SECONDS while nothing else marks
its progress: vLLM's engine processes import vLLM, load weights and warm up for 10-20 s each
without a line, and a silent start looks hung.

`StartProgress` holds what each model (or the engine as a whole, before its models load) is
doing and since when; `report` says it until cancelled or until its owner task (the engine's
start) is being cancelled: a node that stops mid-start says nothing more of its start.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

# Under the 3 s a log may stay silent during a start, with room for a busy event loop.
PROGRESS_SECONDS = 2.5
_ENGINE = ""  # the subject of what the engine does before its models load


class StartProgress:
    """Per subject (a model's served name, or the engine as a whole): what it does, from which
    step of its start, since when. Updated from the event loop and from the thread that reads
    vLLM's output (`advance`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._doing: dict[str, tuple[str, int, float]] = {}

    def engine_does(self, what: str) -> None:
        """The engine as a whole now does `what` (checking the models, importing vLLM)."""
        with self._lock:
            self._doing[_ENGINE] = (what, 0, self._clock())

    def load(self, model: str, what: str) -> None:
        """`model` starts to load, with `what`; the engine as a whole no longer does anything."""
        with self._lock:
            self._doing.pop(_ENGINE, None)
            self._doing[model] = (what, 0, self._clock())

    def advance(self, model: str, step: int, what: str) -> None:
        """`model` reached `step` of its load and now does `what`. Ignored for a model that is
        not loading (a line read late) or that is already past `step`."""
        with self._lock:
            current = self._doing.get(model)
            if current is not None and step > current[1]:
                self._doing[model] = (what, step, self._clock())

    def loaded(self, model: str) -> None:
        with self._lock:
            self._doing.pop(model, None)

    def line(self) -> str | None:
        """What is still under way, with the seconds spent in it; None when nothing is."""
        now = self._clock()
        with self._lock:
            doing = dict(self._doing)
        engine = doing.pop(_ENGINE, None)
        if not doing:
            return None if engine is None else f"still {engine[0]} ({now - engine[2]:.0f} s)"
        # Models doing the same thing share one part of the line, timed by the earliest.
        groups: dict[str, tuple[list[str], float]] = {}
        for model, (what, _step, since) in doing.items():
            names, earliest = groups.get(what, ([], since))
            groups[what] = ([*names, model], min(earliest, since))
        parts = [f"{', '.join(names)}: {what} ({now - since:.0f} s)" for what, (names, since) in groups.items()]
        return "still loading " + "; ".join(parts)


async def report(
    progress: StartProgress, say: Callable[[str], None], owner: asyncio.Task, interval: float = PROGRESS_SECONDS
) -> None:
    """`say(progress.line())` every `interval` until cancelled, or until `owner` is."""
    while True:
        await asyncio.sleep(interval)
        if owner.cancelling():
            return
        line = progress.line()
        if line is not None:
            say(line)
