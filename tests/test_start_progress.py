"""A starting node says what it is still loading every few seconds (node.engine.progress), from
its own stages and from vLLM's stage lines, which name their model; it says nothing of its start
once stopping. No vLLM here: a fake clock, a short interval, lines as vLLM's processes write them."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import os
import time

from aiohttp import web
from server_support import MODEL

from node import supervisor
from node.config import LOG_FORMAT, load_config
from node.engine.base import ModelCard
from node.engine.echo import EchoEngine
from node.engine.progress import PROGRESS_SECONDS, StartProgress, report
from node.engine.vllm import VllmEngine, quiet_vllm_logging
from node.engine.vllm_logging import STAGES, PlatformNoticeFilter, stage_of
from node.server import create_app

CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBED = "sentence-transformers/all-MiniLM-L6-v2"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_says_what_the_engine_then_each_model_is_doing_and_for_how_long() -> None:
    clock = FakeClock()
    progress = StartProgress(clock)
    assert progress.line() is None
    progress.engine_does("importing vLLM")
    clock.now += 4.2
    assert progress.line() == "still importing vLLM (4 s)"
    progress.load(CHAT, "engine core importing vLLM")
    clock.now += 1
    progress.load(EMBED, "engine core importing vLLM")
    clock.now += 5
    # The same stage: one part, timed from the model that entered it first.
    assert progress.line() == f"still loading {CHAT}, {EMBED}: engine core importing vLLM (6 s)"
    progress.advance(EMBED, 4, "warming up")
    clock.now += 3
    assert progress.line() == f"still loading {CHAT}: engine core importing vLLM (9 s); {EMBED}: warming up (3 s)"
    progress.advance(EMBED, 2, "loading weights")  # read late: EMBED is past it
    progress.advance("not/loading", 5, "KV cache")
    assert progress.line() == f"still loading {CHAT}: engine core importing vLLM (9 s); {EMBED}: warming up (3 s)"
    progress.loaded(CHAT)
    progress.advance(CHAT, 6, "engine core handshake")  # a line read after the load ended
    assert progress.line() == f"still loading {EMBED}: warming up (3 s)"
    progress.loaded(EMBED)
    assert progress.line() is None


def test_the_interval_keeps_the_log_under_3_s_of_silence() -> None:
    assert PROGRESS_SECONDS < 3.0


async def test_report_says_the_line_each_interval_and_nothing_once_its_owner_is_being_cancelled() -> None:
    progress = StartProgress()
    progress.engine_does("importing vLLM")
    said: list[str] = []
    owner = asyncio.create_task(asyncio.Event().wait())
    reporter = asyncio.create_task(report(progress, said.append, owner, interval=0.01))
    deadline = time.monotonic() + 5
    while len(said) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert len(said) >= 3 and all(line.startswith("still importing vLLM (") for line in said), said
    owner.cancel()  # a node stopping: its start is being cancelled
    count = len(said)
    await asyncio.sleep(0.1)
    assert len(said) == count and reporter.done()


async def test_report_says_nothing_while_nothing_is_under_way() -> None:
    said: list[str] = []
    reporter = asyncio.create_task(report(StartProgress(), said.append, asyncio.current_task(), interval=0.01))
    await asyncio.sleep(0.1)
    reporter.cancel()
    assert said == []


def _vllm_line(notice_filter: PlatformNoticeFilter, message: str, *args: object) -> str | None:
    """What a vLLM process writes for one INFO record through the node's filter, or None."""
    record = logging.LogRecord("vllm.v1.engine.core", logging.INFO, __file__, 1, message, args or None, None)
    return logging.Formatter(LOG_FORMAT).format(record) if notice_filter.filter(record) else None


def test_each_vllm_process_names_its_model_in_its_stage_lines_and_the_node_reads_them() -> None:
    models = {"/cache/models/minilm": EMBED, "/cache/models/minilm-large": "other/model"}
    names = [CHAT, EMBED, "other/model"]
    engine_core = PlatformNoticeFilter(models)
    started = _vllm_line(engine_core, "Initializing a V1 LLM engine (v%s) with config: model='%s', dtype=float32", "0.32", "/cache/models/minilm")
    assert started is not None and started.endswith(f" {EMBED}: engine core started (vLLM imported)"), started
    assert stage_of(started, names) == (EMBED, 0)
    finished = _vllm_line(engine_core, "init engine (profile, create kv cache, warmup model) took %.2f s", 8.63)
    assert finished is not None and finished.endswith(f" {EMBED}: init engine (profile, create kv cache, warmup model) took 8.63 s")
    assert stage_of(finished, names) == (EMBED, len(STAGES) - 1)
    worker = PlatformNoticeFilter(models)  # another process: its first line names the longer path
    loading = _vllm_line(worker, "Starting to load model %s...", "/cache/models/minilm-large")
    assert loading is not None and stage_of(loading, names) == ("other/model", 1)
    assert _vllm_line(worker, "Using max model len %d", 2048) is None
    warming = _vllm_line(worker, "Warming up model for the compilation...")
    assert warming is not None and stage_of(warming, names) == ("other/model", 3)
    # The node's own lines and unnamed vLLM lines move nothing.
    assert stage_of(f"2026-12-04 16:30:42,751 INFO tee_node.engine engine: loading {CHAT}", names) is None
    unnamed = _vllm_line(PlatformNoticeFilter(), "Warming up done.")
    assert unnamed is not None and unnamed.endswith(" Warming up done.") and stage_of(unnamed, names) is None


def test_the_vllm_engine_follows_its_models_through_vllms_stage_lines(tmp_path) -> None:
    config = load_config(None, engine={"kind": "vllm", "models": [{"name": CHAT, "source": CHAT}, {"name": EMBED, "source": EMBED}]})
    engine = VllmEngine(config.engine, tmp_path)
    progress = StartProgress()
    progress.load(CHAT, "engine core importing vLLM")
    progress.load(EMBED, "engine core importing vLLM")
    worker = PlatformNoticeFilter({"/cache/smollm2": CHAT})
    for message in ("Starting to load model /cache/smollm2...", "Loading weights took 0.62 seconds", "Warming up model for the compilation..."):
        line = _vllm_line(worker, message)
        assert line is not None
        engine._follow(progress, line)
    engine._follow(progress, "Triton is installed, but doesn't include CPU backend")
    line = progress.line()
    assert line is not None and line.startswith(f"still loading {CHAT}: warming up (0 s); {EMBED}: engine core importing vLLM ("), line


def test_the_output_gate_hands_its_watchers_whole_lines(tmp_path) -> None:
    target = tmp_path / "stderr"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT)
    gate = supervisor.OutputGate(fd)  # fd now writes into the gate's pipe
    seen: list[str] = []
    gate.watchers.append(seen.append)
    gate.watchers.append(lambda line: 1 / 0)  # a failing watcher stops neither the others nor the forwarding
    os.write(fd, b"first line\nsecond ")
    os.write(fd, b"line\nno newline yet")
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.close()
    os.close(fd)  # the forwarding thread reads the end of the pipe and exits
    os.close(gate.real)
    assert seen == ["first line", "second line"]
    assert target.read_bytes() == b"first line\nsecond line\nno newline yet"


def test_an_unsupervised_node_has_no_child_output_to_watch() -> None:
    assert supervisor.watch_child_output(lambda line: None) is None


class _LoadingWithProgress(EchoEngine):
    """An engine whose load never ends and says so every few milliseconds, as the vLLM engine does."""

    async def start(self) -> None:
        progress = StartProgress()
        progress.engine_does("importing vLLM")
        await report(progress, lambda line: logging.getLogger("tee_node.engine").info("engine: %s", line), asyncio.current_task(), interval=0.005)


async def test_a_node_stopping_while_its_engine_loads_says_nothing_more_of_the_start(caplog) -> None:
    caplog.set_level(logging.INFO, logger="tee_node")
    engine = _LoadingWithProgress([ModelCard(MODEL, frozenset({"chat"}))])
    app = create_app(load_config(None, engine={"kind": "echo"}), engine)

    async def requests_finishing(_app: web.Application) -> None:
        await asyncio.sleep(0.05)  # the grace for requests in flight, after the stopping line

    app.on_shutdown.append(requests_finishing)
    runner = web.AppRunner(app)
    await runner.setup()
    await asyncio.sleep(0.05)
    await runner.cleanup()
    said = [record.getMessage() for record in caplog.records if record.name.startswith("tee_node")]
    stopping = said.index("stopping: no new connections; the engine had not finished loading")
    assert [line for line in said[:stopping] if line.startswith("engine: still importing vLLM (")], said
    assert not [line for line in said[stopping:] if "still" in line], said
    assert said[-1] == "tee-node stopped"


def test_vllms_logging_file_maps_each_model_path_to_its_served_name(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", str(tmp_path / "vllm-logging.json"))
    applied: list[dict] = []
    monkeypatch.setattr(logging.config, "dictConfig", applied.append)  # not this test process's logging
    quiet_vllm_logging(tmp_path, {"/cache/smollm2": CHAT})
    written = json.loads((tmp_path / "vllm-logging.json").read_text())
    assert written == applied[0]
    assert written["filters"]["platform_notices"]["models"] == {"/cache/smollm2": CHAT}
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", str(tmp_path / "the-operators.json"))
    quiet_vllm_logging(tmp_path / "elsewhere", {"/cache/smollm2": CHAT})  # the operator's choice stays
    assert not (tmp_path / "elsewhere").exists() and len(applied) == 1
