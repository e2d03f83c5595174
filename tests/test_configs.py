"""Every shipped config loads with the node's own loader and says what its comments promise."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from node.config import REPO_CONFIGS, load_config

CONFIGS = sorted(REPO_CONFIGS.glob("*.toml"))
PLACEHOLDER_DIGEST = hashlib.sha256(b"").hexdigest()


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    # The files alone must produce these values, whatever the developer's shell exports.
    for name in list(os.environ):
        if name.startswith("TEE_NODE_"):
            monkeypatch.delenv(name)


def load(name: str):
    return load_config(REPO_CONFIGS / name)


def test_the_expected_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"simulated.toml", "tdx-h100.toml", "sev-snp-h100.toml", "upstream-vllm.toml", "multi-gpu.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_has_a_stable_digest(path: Path) -> None:
    config = load_config(path)
    assert config.engine.models
    weights = {m.name: "ab" * 32 for m in config.engine.models}  # as the engine reports them once loaded
    assert len(config.digest(weights)) == 32
    assert config.digest(weights) == load_config(path).digest(weights)
    assert config.digest(weights) != config.digest({})  # the weights are measured


def test_simulated_default_serves_the_embedded_models_openly_on_loopback() -> None:
    config = load("simulated.toml")
    assert config.tee_mode == "simulated" and config.host == "127.0.0.1"
    assert config.engine.kind == "vllm" and not config.auth.api_token_sha256
    assert [(m.source, m.task, m.dtype) for m in config.engine.models] == [
        ("embedded:smollm2", "generate", "float32"),
        ("embedded:minilm", "embed", "float32"),
    ]


@pytest.mark.parametrize("name, mode", [("tdx-h100.toml", "tdx"), ("sev-snp-h100.toml", "sev-snp")])
def test_h100_configs_run_a_real_tee_with_gpu_attestation(name: str, mode: str) -> None:
    config = load(name)
    assert config.tee_mode == mode
    assert config.attestation.require_gpu is True
    assert config.auth.api_token_sha256 == [PLACEHOLDER_DIGEST]
    assert not config.allow_plaintext
    (model,) = config.engine.models
    assert model.name == "meta-llama/Llama-3.1-8B-Instruct"
    # A local path: a TEE must not fetch weights from a hub at run time.
    assert Path(model.source).is_absolute()
    assert model.dtype == "bfloat16" and model.gpu_memory_utilization == pytest.approx(0.9)
    assert model.tensor_parallel_size == 1


def test_the_two_h100_configs_differ_only_in_tee_mode_and_digest() -> None:
    tdx, snp = load("tdx-h100.toml"), load("sev-snp-h100.toml")
    assert tdx.model_copy(update={"tee_mode": "sev-snp"}) == snp
    assert tdx.digest({}) != snp.digest({})


def test_upstream_config_forwards_to_loopback() -> None:
    config = load("upstream-vllm.toml")
    assert config.engine.kind == "upstream"
    assert config.engine.upstream_url == "http://127.0.0.1:8000"
    assert config.tee_mode == "tdx" and config.attestation.require_gpu


def test_multi_gpu_config_splits_over_an_attested_worker_vm() -> None:
    config = load("multi-gpu.toml")
    (model,) = config.engine.models
    assert model.tensor_parallel_size in (4, 8)
    assert model.pipeline_parallel_size == 2
    assert model.distributed_executor_backend == "mp"  # vLLM's own multi-node over the node's link
    assert config.workers.count == 1 and config.workers.policy is None
    assert model.engine_args == {"enable_prefix_caching": True, "max_num_seqs": 64}
    assert config.attestation.require_gpu


def test_engine_args_reach_vllm_unchanged() -> None:
    from node.engine.vllm import engine_args_for

    (model,) = load("multi-gpu.toml").engine.models
    args = engine_args_for(model, model.source)
    assert args["served_model_name"] == ["meta-llama/Llama-3.1-405B-Instruct-FP8"]
    assert args["tensor_parallel_size"] == 8 and args["pipeline_parallel_size"] == 2
    assert args["distributed_executor_backend"] == "mp"
    assert args["gpu_memory_utilization"] == pytest.approx(0.92)
    assert args["enable_prefix_caching"] is True and args["max_num_seqs"] == 64
    assert "kv_cache_memory_bytes" not in args


def test_cpu_hosts_size_the_kv_cache_unless_configured() -> None:
    from node.engine.vllm import CPU_KV_CACHE_BYTES, engine_args_for

    chat, embed = load("simulated.toml").engine.models
    assert engine_args_for(chat, "/m", cpu=True)["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    assert engine_args_for(embed, "/m", cpu=True)["runner"] == "pooling"
    explicit = chat.model_copy(update={"gpu_memory_utilization": 0.3})
    assert "kv_cache_memory_bytes" not in engine_args_for(explicit, "/m", cpu=True)
    assert "kv_cache_memory_bytes" not in engine_args_for(chat, "/m", cpu=False)
