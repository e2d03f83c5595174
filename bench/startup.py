"""Start-up: seconds from launching `tee-node serve` (the default config: SmolLM2 and MiniLM) to
/ready answering 200, cold and warm, against plain vLLM's own start on the chat model, in the
same run.

- cold: empty caches (a fresh XDG_CACHE_HOME): the node converts the embedded GGUF model,
  compiles both models and fills its compile cache; plain vLLM compiles and fills its cache.
- warm: the same command again over the caches the cold start left.

Plain vLLM is `python -m vllm.entrypoints.openai.api_server` on the node's converted SmolLM2
with the node's engine settings (its /health answers once the engine is up), launched as a
user would, with vLLM's defaults otherwise. The starts run one at a time. Goals: warm node
ready in <= 45 s, and no slower than warm plain vLLM + 5 s. Writes docs/benchmarks/startup.json.

The warm node's start is also split into stages, from the timestamps of the lines its log has
at the default level (the node's own, and the stage lines of vLLM's that node.engine.vllm_logging
lets through). Both models load at once, so each stage ends when its last model leaves it: the
figures are the start's critical path, wall-clock. `--log FILE` splits a log already written
(a `make run` captured with `2>&1 | tee`) without starting anything.

    .venv/bin/python bench/startup.py [--rounds 1]
    .venv/bin/python bench/startup.py --log node.log
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import BIN, Server, free_port, print_table, write_results  # noqa: E402

from node.config import EMBEDDED_CHAT_MODEL, load_config  # noqa: E402
from node.engine.vllm import CPU_KV_CACHE_BYTES  # noqa: E402
from node.models import prepare_model  # noqa: E402

# (stage, whose, the log line that ends it): a stage ends at that line's last occurrence.
STAGES = [
    ("node start-up: attestation provider, keys", "tee-node", "tee_node.server keys: "),
    ("model check (hashes the cached weights)", "tee-node", " ok in "),
    ("vLLM import in the node", "vLLM", "engine: loading "),
    ("engine core processes: spawn, vLLM imported again", "vLLM", "engine core started"),
    ("worker processes: spawn, vLLM imported again", "vLLM", "worker started"),
    ("weights load", "vLLM", "Loading weights took"),
    ("compile-cache load and warm-up", "vLLM (torch inductor)", "Warming up done"),
    ("KV cache and profile run", "vLLM", "init engine (profile"),
    ("OpenAI serving layer set-up", "vLLM's layer, built by tee-node", " loaded in "),
    ("measured config, READY line", "tee-node", " READY at "),
]
WARM_GOAL_SECONDS = 45.0
BEYOND_VLLM_GOAL_SECONDS = 5.0


def _timestamp(line: str) -> float | None:
    try:
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def stages(log: str) -> list[dict[str, object]]:
    """Seconds per stage of one start (STAGES), from its log; the first starts at `starting`."""
    lines = [(t, line) for line in log.splitlines() if (t := _timestamp(line)) is not None]
    begun = next((t for t, line in lines if " starting tee-node " in line), None)
    if begun is None:
        raise SystemExit("no 'starting tee-node' line in the log")
    result, previous = [], begun
    for stage, whose, marker in STAGES:
        ends = [t for t, line in lines if marker in line]
        if not ends:
            raise SystemExit(f"no {marker!r} line in the log: was it a warm start at the default log level?")
        result.append({"stage": stage, "whose": whose, "seconds": round(ends[-1] - previous, 1)})
        previous = ends[-1]
    return result


def print_stages(split: list[dict[str, object]]) -> None:
    print_table(["stage", "whose", "seconds"], [[s["stage"], s["whose"], f"{s['seconds']:.1f}"] for s in split])
    total = sum(float(s["seconds"]) for s in split)  # type: ignore[arg-type]
    print(f"from the 'starting' line to READY: {total:.1f} s")


def start(name: str, cmd: list[str], ready_path: str, port: int, work: Path, cache: Path) -> float:
    server = Server(name, cmd, f"http://127.0.0.1:{port}", work / f"{name}.log", env={"XDG_CACHE_HOME": str(cache)})
    try:
        seconds = server.wait(ready_path)
    finally:
        server.stop()
    print(f"{name}: ready in {seconds:.1f} s (load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
    return seconds


def node_starts(work: Path, cache: Path) -> tuple[float, float]:
    """Cold, then warm, over one fresh cache directory."""
    port = free_port()
    cmd = [str(BIN / "tee-node"), "serve", "--port", str(port)]
    cold = start("node-cold", cmd, "/ready", port, work, cache)
    warm = start("node-warm", cmd, "/ready", port, work, cache)
    return cold, warm


def vllm_starts(work: Path, cache: Path, model_dir: Path) -> tuple[float, float]:
    port = free_port()
    chat = load_config(None).engine.models[0]
    cmd = [
        str(BIN / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", EMBEDDED_CHAT_MODEL, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", chat.dtype, "--max-model-len", str(chat.max_model_len),
        "--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES),
    ]
    cold = start("vllm-cold", cmd, "/health", port, work, cache)
    warm = start("vllm-warm", cmd, "/health", port, work, cache)
    return cold, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="cold+warm pairs per target (alternating)")
    parser.add_argument("--log", type=Path, help="only split this node log into stages")
    args = parser.parse_args()
    if args.log:
        print_stages(stages(args.log.read_text(errors="replace")))
        return

    # Plain vLLM loads the node's converted model (it cannot read the embedded GGUF).
    model_dir = prepare_model("embedded:smollm2", load_config(None).cache_dir)
    work = Path(tempfile.mkdtemp(prefix="tee-node-startup-"))
    load_before = os.getloadavg()[0]
    runs: dict[str, list[float]] = {"node_cold": [], "node_warm": [], "vllm_cold": [], "vllm_warm": []}
    try:
        for round_ in range(args.rounds):
            node_cache, vllm_cache = work / f"node-cache-{round_}", work / f"vllm-cache-{round_}"
            for target, cache, measure in (
                ("node", node_cache, lambda c: node_starts(work, c)),
                ("vllm", vllm_cache, lambda c: vllm_starts(work, c, model_dir)),
            ):
                cold, warm = measure(cache)
                runs[f"{target}_cold"].append(cold)
                runs[f"{target}_warm"].append(warm)
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        print(f"logs in {work}", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in runs.items()}
    goals = {
        "node_warm_ready_s": {"value": median["node_warm"], "goal": f"<= {WARM_GOAL_SECONDS:.0f}",
                              "met": median["node_warm"] <= WARM_GOAL_SECONDS},
        "node_warm_minus_vllm_warm_s": {"value": median["node_warm"] - median["vllm_warm"],
                                        "goal": f"<= {BEYOND_VLLM_GOAL_SECONDS:.0f}",
                                        "met": median["node_warm"] - median["vllm_warm"] <= BEYOND_VLLM_GOAL_SECONDS},
    }
    print_table(
        ["start", "seconds to ready (median)", "runs"],
        [[name, f"{median[name]:.1f}", ", ".join(f"{v:.1f}" for v in runs[name])] for name in runs],
    )
    warm_stages = stages((work / "node-warm.log").read_text(errors="replace"))
    print_stages(warm_stages)
    for name, goal in goals.items():
        print(f"{name}: {goal['value']:.1f} (goal {goal['goal']}: {'met' if goal['met'] else 'NOT met'})")
    path = write_results(
        "startup",
        {
            "what": "seconds from launch to ready: tee-node serve (SmolLM2 + MiniLM) and plain vLLM (SmolLM2)",
            "load_average": {"before": load_before, "after": os.getloadavg()[0]},
            "runs": runs,
            "median_s": median,
            "goals": goals,
            "warm_node_stages": warm_stages,
        },
    )
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
