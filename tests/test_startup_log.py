"""What a starting and stopping node says: one line per stage, one ready line, no probe access
lines, a last line of its own; and the environment the vLLM engine gets before vLLM loads."""

from __future__ import annotations

import asyncio
import logging
import logging.config
import re
import urllib.request

from aiohttp import web
from server_support import MODEL, http_get, spawn_node

from node.config import load_config
from node.engine.base import ModelCard
from node.engine.echo import EchoEngine
from node.engine.vllm import engine_environment
from node.engine.vllm_logging import PLATFORM_NOTICES, PlatformNoticeFilter, logging_config
from node.server import create_app


def test_a_node_says_each_stage_then_ready_then_stopped() -> None:
    node = spawn_node()
    try:
        for _ in range(5):
            assert http_get(node.url + "/ready")[0] == 200
            assert http_get(node.url + "/health")[0] == 200
        with urllib.request.urlopen(node.url + "/v1/models") as response:
            assert response.status == 200
    finally:
        node.stop()
    lines = node.log().splitlines()
    # What spawn_node runs: --engine echo --model MODEL, one event per chunk.
    served = load_config(None, engine={"kind": "echo", "models": [{"name": MODEL, "source": MODEL}]}, limits={"stream_coalesce_max": 1})
    digest = served.digest({}).hex()  # the echo engine has no weights
    ready = [line for line in lines if " READY at " in line]
    assert len(ready) == 1
    assert re.search(
        rf"READY at http://127\.0\.0\.1:{node.port} in \d+\.\d s \| tee_mode=simulated \(NOT a TEE: testing only\) \| "
        rf"models={MODEL} \| config_digest={digest}$",
        ready[0],
    ), ready[0]
    before_ready = lines[: lines.index(ready[0])]
    for stage in ("starting tee-node on http://127.0.0.1", "attestation: simulated TEE", "keys: X25519 key epoch 1"):
        assert sum(stage in line for line in before_ready) == 1, (stage, before_ready)
    # The probes polled above leave no access line; other routes do.
    access = [line for line in lines if "tee_node.access" in line]
    assert not [line for line in access if "route=/ready" in line or "route=/health" in line], access
    assert [line for line in access if "route=/v1/models" in line]
    assert "stopping: no new connections" in node.log()
    assert lines[-1].endswith("INFO tee_node.server tee-node stopped"), lines[-3:]


def test_the_engine_environment_fixes_the_compile_cache_and_quiets_vllm(tmp_path) -> None:
    env = engine_environment(tmp_path, "INFO", {})
    assert env["VLLM_USE_AOT_COMPILE"] == "0"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torchinductor")
    assert env["VLLM_LOGGING_CONFIG_PATH"] == str(tmp_path / "vllm-logging.json")
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert "ignore::FutureWarning:vllm.triton_utils.dispatcher" in env["PYTHONWARNINGS"].split(",")


def test_the_operator_keeps_settings_made_in_the_environment_but_not_hub_access(tmp_path) -> None:
    environ = {"VLLM_USE_AOT_COMPILE": "1", "PYTHONWARNINGS": "error", "HF_HUB_OFFLINE": "0"}
    env = engine_environment(tmp_path, "INFO", environ)
    assert "VLLM_USE_AOT_COMPILE" not in env
    assert env["PYTHONWARNINGS"].split(",")[0] == "error"
    assert env["HF_HUB_OFFLINE"] == "1"


def test_debug_leaves_vllm_logging_and_warnings_alone(tmp_path) -> None:
    env = engine_environment(tmp_path, "debug", {})
    assert not {"VLLM_LOGGING_CONFIG_PATH", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS"} & env.keys()
    assert env["VLLM_USE_AOT_COMPILE"] == "0"


def test_vllm_logging_keeps_real_warnings_and_stage_lines_and_drops_platform_notices() -> None:
    notice_filter = PlatformNoticeFilter()

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("vllm.x", logging.WARNING, __file__, 1, message, None, None)

    for notice in PLATFORM_NOTICES:
        assert not notice_filter.filter(record(f"prefix {notice} suffix"))
    assert notice_filter.filter(record("KV cache is too small for max_model_len"))
    info = record("Loading weights took 2.93 seconds")
    info.levelno = logging.INFO
    assert notice_filter.filter(info) and info.getMessage() == "Loading weights took 2.93 seconds"
    started = record("Initializing a V1 LLM engine (v0.32.0) with config: model='/m', tokenizer='/m'")
    started.levelno = logging.INFO
    assert notice_filter.filter(started) and started.getMessage() == "engine core started (vLLM imported)"
    chatter = record("Using max model len 2048")
    chatter.levelno = logging.INFO
    assert not notice_filter.filter(chatter)
    config = logging_config("%(message)s")
    assert config["loggers"]["vllm"] == {"handlers": ["vllm"], "level": "INFO", "propagate": False}
    logging.config.dictConfig({**config, "loggers": {}})  # the file vLLM reads is a valid dictConfig


class _StillLoading(EchoEngine):
    """An engine whose load never ends (a vLLM engine mid-load)."""

    async def start(self) -> None:
        await asyncio.Event().wait()


async def test_a_node_stopped_while_loading_says_so_and_promises_no_grace(caplog) -> None:
    caplog.set_level(logging.INFO, logger="tee_node")
    engine = _StillLoading([ModelCard(MODEL, frozenset({"chat"}))])
    runner = web.AppRunner(create_app(load_config(None, engine={"kind": "echo"}), engine))
    await runner.setup()
    await asyncio.sleep(0)  # the load is under way
    await runner.cleanup()
    said = [record.getMessage() for record in caplog.records if record.name.startswith("tee_node")]
    assert "stopping: no new connections; the engine had not finished loading" in said, said
    assert not [line for line in said if "in flight" in line], said
    assert said[-1] == "tee-node stopped"
