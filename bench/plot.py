"""Benchmark ratios against their goals: docs/benchmarks/ratios.png and docs/benchmarks/README.md.

Reads whichever of docs/benchmarks/{envelope,server,e2e}.json exist (each written by its own
benchmark, with its own keys; anything missing or unexpected is skipped, never fatal) and
draws every ratio as "how far to the goal": 1.0 means exactly on the goal, more is better,
whatever the ratio's direction. Run:
    .venv/bin/python bench/plot.py
"""

from __future__ import annotations

import json
import statistics
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR  # noqa: E402


# Bars stop here: past a few times the goal, the length says nothing more.
MAX_ATTAINMENT = 3.0
# Node CPU the confidential route adds per request, at most this many times its primitives.
OVERHEAD_GOAL = 1.25


class Ratio:
    """One measured figure against its goal. `higher` tells the goal's direction."""

    def __init__(self, source: str, name: str, value: float, goal: float, higher: bool, unit: str = "ratio") -> None:
        self.source, self.name, self.value, self.goal, self.higher, self.unit = source, name, value, goal, higher, unit

    @property
    def attainment(self) -> float:
        if self.goal <= 0:
            return 0.0
        if self.higher:
            return min(self.value / self.goal, MAX_ATTAINMENT)
        # Lower is better: nothing added at all (zero or less) is as good as the plot shows.
        return min(self.goal / self.value, MAX_ATTAINMENT) if self.value > 0 else MAX_ATTAINMENT

    @property
    def met(self) -> bool:
        return self.value >= self.goal if self.higher else self.value <= self.goal

    def fmt(self, x: float) -> str:
        if self.unit == "ratio":
            return f"{x:.0%}" if self.higher else f"{x:.2f}x"
        if self.unit == "ms":
            return f"{x:+.1f} ms"
        return f"{x:,.0f} {self.unit}"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def envelope_ratios(data: dict[str, Any]) -> list[Ratio]:
    """envelope.json: each comparison's envelope/floor time, goal `goal_ratio` (lower is better)."""
    goal = _num(data.get("goal_ratio"))
    out = []
    for item in data.get("comparisons") or []:
        if not isinstance(item, dict):
            continue
        value, case = _num(item.get("ratio")), item.get("case") or item.get("envelope")
        item_goal = _num(item.get("goal")) or goal
        if value is not None and item_goal is not None and case:
            out.append(Ratio("envelope", f"{case} (cost / floor)", value, item_goal, higher=False))
    return out


def server_ratios(data: dict[str, Any]) -> list[Ratio]:
    """server.json: confidential/plain ratios (higher is better). With coalescing on, events per
    token differ by route, so the stream goal is judged on tokens/s; the sealed events/s goal
    comes from the one-event-per-chunk run (server-per-chunk.json) when it exists."""
    summary = data.get("summary") or {}
    out = []
    requests = summary.get("requests") or {}
    if _num(requests.get("ratio")) is not None and _num(requests.get("goal")) is not None:
        out.append(Ratio("server", "requests/s confidential / plain", requests["ratio"], requests["goal"], True))
    streams = summary.get("streams") or {}
    if _num(streams.get("tokens_ratio")) is not None and _num(streams.get("goal")) is not None:
        out.append(Ratio("server", "stream tokens/s confidential / plain", streams["tokens_ratio"], streams["goal"], True))
    # A coalesced event carries several tokens, so events/s of the coalesced run is not the figure.
    per_chunk = ((_load("server-per-chunk") or {}).get("summary") or {}).get("streams") or {}
    events, goal = _num(per_chunk.get("confidential_events_per_s")), _num(per_chunk.get("confidential_events_goal"))
    if events is not None and goal is not None:
        out.append(Ratio("server", "sealed events/s, one event per chunk", events, goal, True, unit="events/s"))
    # What the confidential path adds per request (node CPU, confidential - plain) over the
    # primitives it cannot skip (envelope.json's floor with the receipt, from the same make bench).
    cpu = requests.get("node_cpu_us_per_request") or {}
    floor_ns = _num(((_load("envelope") or {}).get("timings_ns") or {}).get("floor_open_seal_receipt"))
    plain, confidential = _num(cpu.get("plain")), _num(cpu.get("confidential"))
    if plain is not None and confidential is not None and floor_ns:
        added = (confidential - plain) / (floor_ns / 1000)
        out.append(Ratio("server", "confidential CPU added / floor+receipt", added, OVERHEAD_GOAL, False))
    upstream = summary.get("upstream") or {}
    if _num(upstream.get("ratio")) is not None and _num(upstream.get("goal")) is not None:
        out.append(Ratio("server", "UpstreamEngine node / upstream CPU per request", upstream["ratio"], upstream["goal"], False))
    # What length hiding costs (docs/protocol.md), on the same one-event-per-chunk run.
    padded, goal = _num(per_chunk.get("padded_events_ratio")), _num(per_chunk.get("padded_events_goal"))
    if padded is not None and goal is not None:
        out.append(Ratio("server", "sealed events/s padded / unpadded", padded, goal, True))
    return out


def e2e_ratios(data: dict[str, Any]) -> list[Ratio]:
    """e2e.json: node / plain vLLM output tokens/s, and the p50 TTFT the node adds (one request
    at a time)."""
    goals = data.get("goals") or {}
    out = []
    throughput, goal = _num(data.get("throughput_ratio")), _num(goals.get("throughput_ratio_min"))
    if throughput is not None and goal is not None:
        out.append(Ratio("e2e", "output tokens/s node / plain vLLM", throughput, goal, True))
    added, goal = _num(data.get("added_ttft_p50_ms")), _num(goals.get("added_ttft_p50_ms_max"))
    if added is not None and goal is not None:
        out.append(Ratio("e2e", "added p50 time to first token", added, goal, False, unit="ms"))
    return out


def collect() -> list[Ratio]:
    ratios: list[Ratio] = []
    for name, reader in (("envelope", envelope_ratios), ("server", server_ratios), ("e2e", e2e_ratios)):
        data = _load(name)
        if data is None:
            continue
        try:
            ratios.extend(reader(data))
        except Exception as exc:  # noqa: BLE001 - another benchmark's layout changed: skip it, say so
            print(f"skipped {name}.json: {type(exc).__name__}: {exc}", file=sys.stderr)
    return ratios


def plot(ratios: list[Ratio], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.45 * len(ratios) + 1.6))
    labels = [f"{r.source}: {r.name}" for r in ratios]
    values = [r.attainment for r in ratios]
    colors = ["#2e8b57" if r.met else "#c0392b" for r in ratios]
    y = range(len(ratios))
    ax.barh(list(y), values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    for i, r in enumerate(ratios):
        ax.text(values[i] + 0.01, i, f"{r.fmt(r.value)} (goal {'≥' if r.higher else '≤'} {r.fmt(r.goal)})", va="center", fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([1.3, *values]) * 1.5)
    ax.set_xlabel("attainment of the goal (1.0 = on the goal, higher is better)")
    ax.set_title("tee-node benchmarks: ratios vs goals")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(ratios: list[Ratio]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/plot.py` from the JSON files beside this one (re-run the benchmarks,",
        "then the plot). Attainment 1.0 means exactly on the goal; more is better.",
        "",
        "![ratios vs goals](ratios.png)",
        "",
        "| source | figure | value | goal | attainment | met |",
        "| --- | --- | ---: | ---: | ---: | :---: |",
    ]
    for r in ratios:
        lines.append(
            f"| {r.source} | {r.name} | {r.fmt(r.value)} | {'≥' if r.higher else '≤'} {r.fmt(r.goal)} | {r.attainment:.2f} | {'yes' if r.met else 'no'} |"
        )
    server = _load("server")
    summary = (server or {}).get("summary") or {}
    if summary:
        lines += ["", "## Server (bench/server.py)", "", "| figure | plain | confidential | ratio |", "| --- | ---: | ---: | ---: |"]
        req = summary.get("requests") or {}
        if req:
            lines.append(f"| requests/s, {server.get('request_connections', 64)} connections | {req.get('plain_per_s', 0):,.0f} | {req.get('confidential_per_s', 0):,.0f} | {req.get('ratio', 0):.0%} |")
            if "confidential_unpadded_per_s" in req:
                lines.append(f"| requests/s, padding off (confidential: padded / unpadded) | | {req['confidential_unpadded_per_s']:,.0f} | {req.get('padded_ratio', 0):.0%} |")
            cpu = req.get("node_cpu_us_per_request") or {}
            if cpu:
                lines.append(f"| node CPU µs per request | {cpu.get('plain', 0):.0f} | {cpu.get('confidential', 0):.0f} | {req.get('cpu_ratio', 0):.0%} |")
        st = summary.get("streams") or {}
        if st:
            lines.append(f"| stream events/s, {server.get('streams', 256)} streams | {st.get('plain_events_per_s', 0):,.0f} | {st.get('confidential_events_per_s', 0):,.0f} | {st.get('ratio', 0):.0%} |")
            if "confidential_unpadded_events_per_s" in st:
                lines.append(f"| stream events/s, padding off (confidential: padded / unpadded) | | {st['confidential_unpadded_events_per_s']:,.0f} | {st.get('padded_events_ratio', 0):.0%} |")
            lines.append(f"| stream tokens/s, {server.get('streams', 256)} streams | {st.get('plain_tokens_per_s', 0):,.0f} | {st.get('confidential_tokens_per_s', 0):,.0f} | {st.get('tokens_ratio', 0):.0%} |")
            cpu = st.get("node_cpu_us_per_event") or {}
            if cpu:
                lines.append(f"| node CPU µs per event | {cpu.get('plain', 0):.1f} | {cpu.get('confidential', 0):.1f} | {st.get('cpu_ratio', 0):.0%} |")
        up = summary.get("upstream") or {}
        if up:
            rps = up.get("requests_per_s") or {}
            conf = up.get("confidential") or {}
            lines.append(f"| through the UpstreamEngine: requests/s | {rps.get('plain', 0):,.0f} | {rps.get('confidential', 0):,.0f} | |")
            lines.append(f"| through the UpstreamEngine: node CPU µs per request | {up.get('node_cpu_us_per_request', 0):.0f} | {conf.get('node_cpu_us_per_request', 0):.0f} | |")
            lines.append(f"| the echo upstream's own CPU µs per request | {up.get('upstream_cpu_us_per_request', 0):.0f} | {conf.get('upstream_cpu_us_per_request', 0):.0f} | node / upstream {up.get('ratio', 0):.2f}x |")
        pin = server.get("pinning") or {}
        lines += [
            "",
            f"Node pinned to CPUs {pin.get('node_cpus')}, load generator to {pin.get('client_cpus')} "
            f"({server.get('environment', {}).get('cpus')} CPUs in all, shared with whatever else ran); "
            f"{server.get('rounds')} windows of {server.get('seconds')} s per figure, median. Run {server.get('time')}.",
        ]
        if server.get("notes"):
            lines += ["", str(server["notes"])]
    lines += _ohttp_section(server)
    lines += _privacy_pass_section()
    return "\n".join(lines) + "\n"


def _ohttp_section(server: dict[str, Any] | None) -> list[str]:
    """The OHTTP load: from server.json's summary, else from `bench/server.py --only ohttp --name server-ohttp`."""
    source = server if (server or {}).get("summary", {}).get("ohttp") else _load("server-ohttp")
    ohttp = ((source or {}).get("summary") or {}).get("ohttp")
    if not ohttp:
        return []
    rps, cpu, ratio = ohttp["requests_per_s"], ohttp["node_cpu_us_per_request"], ohttp["node_cpu_ratio_vs_direct"]
    pin = source.get("pinning") or {}
    return [
        "",
        "## Oblivious HTTP (bench/server.py, kind ohttp)",
        "",
        "The same sealed confidential chat requests (64 connections), sent directly, wrapped in Oblivious HTTP to the",
        "node's gateway, and through `tee-node relay` (on the generator's CPU). Node CPU per request against the",
        "direct confidential route in the same run.",
        "",
        "| figure | direct confidential | OHTTP to the node | OHTTP through the relay |",
        "| --- | ---: | ---: | ---: |",
        f"| requests/s | {rps['confidential']:,.0f} | {rps['ohttp']:,.0f} | {rps['ohttp_relay']:,.0f} |",
        f"| node CPU µs per request | {cpu['confidential']:.0f} | {cpu['ohttp']:.0f} | {cpu['ohttp_relay']:.0f} |",
        f"| node CPU vs direct | 1.00x | {ratio['ohttp']:.2f}x | {ratio['ohttp_relay']:.2f}x |",
        "",
        f"Node pinned to CPUs {pin.get('node_cpus')}, generator and relay to {pin.get('client_cpus')}; "
        f"{source.get('rounds')} windows of {source.get('seconds')} s per figure, median. Run {source.get('time')}.",
    ]


def _privacy_pass_section() -> list[str]:
    """privacy-pass.json (bench/server.py --only privacy-pass): issuance and redemption costs,
    redemption against the same requests with a bearer token in the same run."""
    data = _load("privacy-pass")
    summary = (data or {}).get("summary") or {}
    if not summary:
        return []
    rate, cpu = summary["issuance_tokens_per_s"], summary["issuance_node_cpu_us_per_token"]
    rounds = data.get("redemption") or []
    bearer = statistics.median(r["bearer"]["node_cpu_us_per_request"] for r in rounds)
    token = statistics.median(r["token"]["node_cpu_us_per_request"] for r in rounds)
    lines = [
        "", "## Privacy Pass (bench/server.py --only privacy-pass)", "",
        "| figure | value |", "| --- | ---: |",
    ]
    for batch in rate:
        size = batch.removeprefix("batch_")
        lines.append(f"| tokens issued/s, batches of {size} | {rate[batch]:,.0f} |")
        lines.append(f"| node CPU µs per token issued, batches of {size} | {cpu[batch]:,.0f} |")
    lines += [
        f"| node CPU µs per confidential request, bearer token (baseline) | {bearer:,.0f} |",
        f"| node CPU µs per confidential request, PrivateToken | {token:,.0f} |",
        f"| redemption CPU per request (token − bearer) | {summary['redemption_cpu_us_per_request']:,.0f} µs |",
        f"| PrivateToken / bearer node CPU per request | {summary['redemption_token_over_bearer_cpu']:.2f}x |",
        "",
        f"{data.get('requests_per_round')} requests per credential and round, {data.get('rounds')} rounds (median), "
        f"{data.get('connections')} connections; node pinned to CPUs {(data.get('pinning') or {}).get('node_cpus')}. "
        f"Run {data.get('time')}.",
    ]
    if data.get("notes"):
        lines += ["", str(data["notes"])]
    return lines


# docs/benchmarks/README.md is the generated part above this line and the discussion of the
# figures, written by hand, below it: a new plot replaces the first and keeps the second.
HAND_WRITTEN = "<!-- Written by hand from here on: bench/plot.py keeps it. -->"


def with_discussion(generated: str, path: Path) -> str:
    previous = path.read_text(encoding="utf-8") if path.exists() else ""
    _, marker, discussion = previous.partition(HAND_WRITTEN)
    return generated.rstrip("\n") + "\n\n" + HAND_WRITTEN + discussion if marker else generated


def main() -> int:
    ratios = collect()
    if not ratios:
        print("no benchmark results in docs/benchmarks/")
        return 1
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(ratios, RESULTS_DIR / "ratios.png")
    readme = RESULTS_DIR / "README.md"
    readme.write_text(with_discussion(markdown(ratios), readme), encoding="utf-8")
    for r in ratios:
        print(f"{r.source:9s} {r.name:45s} {r.fmt(r.value):>14s}  goal {r.fmt(r.goal):>14s}  {'met' if r.met else 'NOT met'}")
    print(f"wrote {RESULTS_DIR / 'ratios.png'} and {RESULTS_DIR / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
