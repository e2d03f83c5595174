"""The node's own serving cost: confidential routes versus plain routes on one process.

One `tee-node serve --engine echo` subprocess with the plain OpenAI routes enabled
(TEE_NODE_ALLOW_PLAINTEXT=true), admission limits far above the load, logging at WARNING.
The same load goes to three routes: plain, confidential (as our client sends it: the request
padded to its 512 * 2^k bucket, the answer and every event padded, docs/protocol.md's
length hiding), and confidential with padding off (unpadded request asking
`stream_options.include_obfuscation: false`), so that what padding costs is measured in the
same run:

  requests   non-streaming chat, 64 concurrent keep-alive connections: requests/s
  streams    streaming chat, 256 concurrent streams of a 200-word prompt (the echo engine
             streams the words back, one engine chunk per word): SSE events/s and tokens/s
  upstream   the requests load, plain and confidential, on a second node whose engine is the
             UpstreamEngine in front of bench/echo_upstream.py (an instant OpenAI echo server
             on the generator's CPU): the CPU per request of the node and of the upstream
  ohttp      the requests load, confidential, three ways in one run: direct (the baseline),
             wrapped in Oblivious HTTP to the node's gateway (client -> node), and the same
             through `tee-node relay` on the generator's CPU (client -> relay -> node): the
             node's CPU per request of each (`--only ohttp`)

Fairness of the load generator:
  * it runs in separate processes (`--clients`, default 1) speaking raw HTTP/1.1 over
    asyncio (uvloop when present): one write of pre-built request bytes per request, one
    Content-Length read or a chunked stream in which it only counts SSE events (`\\n\\n`);
    the client work is identical for both kinds of route.
  * confidential requests are sealed before the timed window (sealing is the client's cost);
    each carries a fresh client key, salt and nonce, so none is a replay.
  * a sample of responses (the first ones of each client connection) is kept raw and fully
    verified after the window: confidential ones with `ResponseOpener` (decrypt, hash,
    signature, receipt, padding where it was asked for, every event one
    `chat.completion.chunk`), plain ones parsed.
  * on this 2-core machine the node and the generator share the CPUs. By default the node is
    pinned to CPU 0 and the generator to CPU 1 (taskset / sched_setaffinity), so each owns
    a core; `--no-pin` lets the kernel schedule. The CPU time of node and generator over each
    window is recorded: a node near 100% of its core is the bottleneck, not the generator.

Tokens/s counts the prompt words of streams finished in the window plus the events of the
unfinished ones at the end (one token per event unless the node coalesced chunks).

Goals: confidential >= 70% of plain requests/s, >= 60% of plain events/s, >= 15,000
encrypted+signed events/s, padding costs at most 10% of sealed events/s, the node's CPU per
plain request through the UpstreamEngine at most 2x the upstream's. Writes
docs/benchmarks/server.json. Run:
    .venv/bin/python bench/server.py [--quick] [--seconds S] [--no-pin] [--clients N]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import REPO, node_pid, print_table, write_results  # noqa: E402

GOALS = {
    "requests_ratio": 0.70,
    "events_ratio": 0.60,
    "confidential_events_per_s": 15_000,
    "padded_events_ratio": 0.90,
    # Node CPU per plain request through the UpstreamEngine / the upstream's own, at most.
    "upstream_hop_ratio": 2.0,
}
REQUEST_CONNECTIONS = 64
STREAMS = 256
PROMPT_WORDS = 200
TEE_NODE = Path(sys.executable).with_name("tee-node")
PY_SPY = Path(sys.executable).with_name("py-spy")  # the dev extra installs it beside the interpreter
CONFIDENTIAL_PATH = "/v1/confidential/chat/completions"
PLAIN_PATH = "/v1/chat/completions"
# Route -> whether its requests and answers are padded (docs/protocol.md).
ROUTES = {"plain": False, "confidential": True, "confidential_unpadded": False}
# Through the UpstreamEngine: the hop's cost shows on plain requests; confidential ones for the record.
UPSTREAM_ROUTES = {"plain": False, "confidential": True}
# The OHTTP load: the confidential request as is, then the same wrapped in OHTTP (padded, as above).
OHTTP_ROUTES = {"confidential": True, "ohttp": True, "ohttp_relay": True}
OHTTP_PATH = "/v1/ohttp"


def _prompt(words: int) -> str:
    return " ".join(f"w{i % 97}x" for i in range(words))


def _plaintext(model: str, stream: bool, words: int, route: str) -> bytes:
    body: dict[str, Any] = {"messages": [{"content": _prompt(words), "role": "user"}], "model": model, "stream": stream}
    if route == "confidential_unpadded":
        body["stream_options"] = {"include_obfuscation": False}
    return json.dumps(body, separators=(",", ":")).encode()


def _http_request(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# --- node process ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, body: dict | None = None, headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as response:
        return json.loads(response.read())


def start_node(
    port: int, cpus: str | None, state_dir: str, engine: tuple[str, ...] = ("--engine", "echo"), extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    env = {
        **os.environ,
        "TEE_NODE_ALLOW_PLAINTEXT": "true",
        "TEE_NODE_LIMITS__MAX_IN_FLIGHT": "4096",
        "TEE_NODE_LIMITS__MAX_QUEUE": "4096",
        "TEE_NODE_LOG_LEVEL": "WARNING",
        "TEE_NODE_HOST": "127.0.0.1",
        "TEE_NODE_PORT": str(port),
        "TEE_NODE_ATTESTATION__STATE_DIR": state_dir,
        **(extra_env or {}),
    }
    return _start([str(TEE_NODE), "serve", *engine], cpus, env, port, "/ready")


def start_relay(port: int, gateway_port: int, cpus: str | None) -> subprocess.Popen:
    """`tee-node relay` in front of the node's gateway, its per-address limit above the load."""
    cmd = [str(TEE_NODE), "relay", "--gateway", f"http://127.0.0.1:{gateway_port}{OHTTP_PATH}", "--port", str(port),
           "--per-address-per-minute", "100000000", "--log-level", "WARNING"]  # fmt: skip
    return _start(cmd, cpus, dict(os.environ), port, None)


def start_upstream(port: int, cpus: str | None) -> subprocess.Popen:
    """bench/echo_upstream.py: the instant OpenAI server behind the node's UpstreamEngine."""
    cmd = [sys.executable, str(Path(__file__).with_name("echo_upstream.py")), "--port", str(port)]
    return _start(cmd, cpus, dict(os.environ), port, "/health")


def _start(cmd: list[str], cpus: str | None, env: dict[str, str], port: int, ready_path: str | None) -> subprocess.Popen:
    """Start `cmd`; ready once `ready_path` answers (without one: once the port takes connections)."""
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    process = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {process.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            if ready_path is None:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            else:
                _get(port, ready_path)
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{cmd[0]} did not become ready")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- load generator (runs in its own process) -------------------------------------------------


class _Conn:
    """One keep-alive HTTP/1.1 connection: send bytes, read a Content-Length or chunked answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def request(self, data: bytes) -> tuple[int, bytes]:
        self.writer.write(data)
        status, headers = await self.head()
        body = await self.reader.readexactly(int(headers[b"content-length"]))
        return status, body

    async def stream(self, data: bytes, deadline: float, keep: list[bytes] | None) -> tuple[int, int, bool]:
        """Send a streaming request; count SSE events (those before `deadline`) until the
        chunked body ends. Returns (status, events counted, finished before deadline)."""
        self.writer.write(data)
        status, headers = await self.head()
        if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
            if keep is not None:
                keep.append(body)
            return status, 0, False
        events = 0
        tail = b""
        clock = time.time
        read = self.reader.read
        while True:
            block = await read(262144)
            if not block:
                raise ConnectionError("stream closed early")
            if keep is not None:
                keep.append(block)
            if clock() < deadline:
                # An event's "\n\n" may straddle two reads.
                events += block.count(b"\n\n") + (tail[-1:] == b"\n" and block[:1] == b"\n")
            tail = (tail + block)[-7:]
            if tail == b"\r\n0\r\n\r\n":
                return status, events, clock() < deadline


def _seal_pool(
    plaintext: bytes, count: int, node_key: bytes, model: str, stream: bool, signing_key: bytes | None, padding: bool
):
    from node import envelope

    pool = []
    for _ in range(count):
        outer, opener = envelope.seal_request(
            plaintext, node_key, model, padding=padding, stream=stream, signing_key=signing_key
        )
        pool.append((_http_request(CONFIDENTIAL_PATH, json.dumps(outer, separators=(",", ":")).encode()), opener))
    return pool


class _Ohttp:
    """What a sampled OHTTP answer is opened with: the exchange, then the envelope's opener."""

    def __init__(self, exchange: Any, opener: Any) -> None:
        self.exchange, self.opener = exchange, opener


def _ohttp_pool(pool: list[tuple[bytes, Any]], key_configs: bytes, path: str) -> list[tuple[bytes, Any]]:
    """Each sealed confidential request wrapped in Oblivious HTTP (a fresh HPKE context each)."""
    from node.ohttp import bhttp
    from node.ohttp.encapsulation import MEDIA_REQUEST, RequestEncapsulator, decode_key_configs

    config = decode_key_configs(key_configs)[0]
    wrapped = []
    for data, opener in pool:
        body = data.split(b"\r\n\r\n", 1)[1]
        inner = bhttp.encode_request(
            bhttp.Request("POST", "https", "", CONFIDENTIAL_PATH, [(b"content-type", b"application/json")], body)
        )
        exchange = RequestEncapsulator(config, chunked=False)
        wrapped.append((_http_request(path, exchange.encapsulate(inner), MEDIA_REQUEST), _Ohttp(exchange, opener)))
    return wrapped


async def _run_client(job: dict[str, Any], start_at: float) -> dict[str, Any]:
    connections, seconds, kind, route = job["connections"], job["seconds"], job["kind"], job["route"]
    pool: list[tuple[bytes, Any]] = job["pool"]
    plain_request = job.get("plain_request")
    conns = []
    for _ in range(connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", job["port"], limit=1 << 20)
        conns.append(_Conn(reader, writer))
    counters = {"requests": 0, "events": 0, "streams": 0, "stream_words": 0, "errors": 0, "exhausted": 0}
    samples: list[dict[str, Any]] = []
    next_item = 0

    def take() -> tuple[bytes, Any] | None:
        nonlocal next_item
        if route == "plain":
            return plain_request, None
        if next_item >= len(pool):
            return None
        item = pool[next_item]
        next_item += 1
        return item

    await asyncio.sleep(max(0.0, start_at - time.time()))
    deadline = start_at + seconds

    async def worker(index: int, conn: _Conn) -> None:
        sampled = 0
        while time.time() < deadline:
            item = take()
            if item is None:
                counters["exhausted"] += 1
                return
            data, opener = item
            keep = [] if index < 16 and sampled < job["samples_per_conn"] else None
            if kind == "requests":
                status, body = await conn.request(data)
                if time.time() >= deadline:
                    break
                if status != 200:
                    counters["errors"] += 1
                    continue
                counters["requests"] += 1
                if keep is not None:
                    samples.append({"body": body, "opener": opener})
                    sampled += 1
            else:
                status, events, finished = await conn.stream(data, deadline, keep)
                if status != 200:
                    counters["errors"] += 1
                    continue
                # Plain streams end with `data: [DONE]`, which is not a chunk of the answer.
                if finished and route == "plain":
                    events -= 1
                counters["events"] += events
                if finished:
                    counters["streams"] += 1
                    counters["stream_words"] += job["words"]
                else:
                    # The unfinished stream's events, one token each at most (an upper bound
                    # when the node coalesces; the window holds many finished streams).
                    counters["stream_words"] += events
                if keep is not None and finished:
                    samples.append({"raw": b"".join(keep), "opener": opener})
                    sampled += 1

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    for conn in conns:
        conn.writer.close()
    return {"counters": counters, "samples": samples, "used": next_item}


def _client_main(job: dict[str, Any], conn) -> None:
    if job.get("cpus") is not None:
        os.sched_setaffinity(0, job["cpus"])
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    job = dict(job)
    job["pool"] = []
    if job["route"] != "plain":
        job["pool"] = _seal_pool(
            job["plaintext"], job["pool_size"], job["node_key"], job["model"], job["kind"] == "streams",
            job["signing_key"], job["padding"],
        )  # fmt: skip
        if job["route"].startswith("ohttp"):
            job["pool"] = _ohttp_pool(job["pool"], job["key_configs"], "/" if job["route"] == "ohttp_relay" else OHTTP_PATH)
    else:
        job["plain_request"] = _http_request(PLAIN_PATH, job["plaintext"])
    conn.send(("ready", None))
    start_at = conn.recv()
    started_cpu = time.process_time()
    result = asyncio.run(_run_client(job, start_at))
    result["cpu_seconds"] = time.process_time() - started_cpu
    result["samples"] = _verify(job, result["samples"])
    conn.send(("done", result))


# --- verification of the kept samples (outside the timed window) -----------------------------


def _dechunk(raw: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end], 16)
        if size == 0:
            return b"".join(out)
        out.append(raw[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2


def _verify(job: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Check every kept sample fully; return counts (the raw samples stay in this process)."""
    expected = _prompt(job["words"])
    checked = failures = events = tokens = 0
    for sample in samples:
        try:
            if "body" in sample and isinstance(sample["opener"], _Ohttp):
                from node.ohttp import bhttp

                inner = bhttp.decode_response(sample["opener"].exchange.open_response(sample["body"]))
                assert inner.status == 200
                text = json.loads(sample["opener"].opener.open_response(json.loads(inner.content)))
                assert text["choices"][0]["message"]["content"] == expected
            elif "body" in sample:
                body = json.loads(sample["body"])
                text = json.loads(sample["opener"].open_response(body)) if sample["opener"] else body
                assert text["object"] == "chat.completion"
                assert text["choices"][0]["message"]["content"] == expected
            else:
                content = []
                for event in _dechunk(sample["raw"]).split(b"\n\n"):
                    if not event:
                        continue
                    assert event.startswith(b"data: ")
                    data = event[6:]
                    if data == b"[DONE]":
                        continue
                    message = json.loads(data)
                    chunk = json.loads(sample["opener"].open_event(message)) if sample["opener"] else message
                    assert chunk["object"] == "chat.completion.chunk"
                    assert len(chunk["choices"]) <= 1
                    events += 1
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content"):
                            content.append(choice["delta"]["content"])
                            tokens += len(choice["delta"]["content"].split())
                if sample["opener"]:
                    sample["opener"].finish()
                assert "".join(content) == expected
            checked += 1
        except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
            failures += 1
            print(f"  sample verification failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return {"checked": checked, "failures": failures, "events": events, "tokens": tokens}


# --- orchestration ----------------------------------------------------------------------------


def run_window(
    ctx,
    node: subprocess.Popen,
    base_job: dict[str, Any],
    clients: int,
    client_cpus: set[int] | None,
    profile_dir: str | None = None,
    upstream: subprocess.Popen | None = None,
) -> dict[str, Any]:
    """One timed window of one kind on one route, `clients` generator processes; the CPU time
    of the node and, given one, of its upstream."""
    total = base_job["connections"]
    pipes, procs = [], []
    for i in range(clients):
        job = dict(base_job)
        job["connections"] = total // clients + (1 if i < total % clients else 0)
        job["pool_size"] = int(base_job["pool_size"] * job["connections"] / total) + 8
        job["cpus"] = client_cpus
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_client_main, args=(job, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for pipe in pipes:
        tag, _ = pipe.recv()
        assert tag == "ready"
    start_at = time.time() + 0.5
    for pipe in pipes:
        pipe.send(start_at)
    time.sleep(max(0.0, start_at - time.time()))
    node_process = node_pid(node.pid)
    node_cpu0 = cpu_seconds(node_process)
    upstream_cpu0 = cpu_seconds(upstream.pid) if upstream is not None else 0.0
    spy = None
    if profile_dir:
        out = Path(profile_dir) / f"{base_job['kind']}-{base_job['route']}.txt"
        spy = subprocess.Popen(
            [str(PY_SPY), "record", "--pid", str(node_process), "--duration", str(max(1, int(base_job["seconds"]) - 1)),
             "--format", "raw", "--nonblocking", "--rate", "200", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    time.sleep(base_job["seconds"])
    node_cpu = cpu_seconds(node_process) - node_cpu0
    upstream_cpu = cpu_seconds(upstream.pid) - upstream_cpu0 if upstream is not None else None
    if spy is not None:
        spy.wait(timeout=30)
    results = [pipe.recv()[1] for pipe in pipes]
    for proc in procs:
        proc.join(timeout=30)
    seconds = base_job["seconds"]
    counters = {k: sum(r["counters"][k] for r in results) for k in results[0]["counters"]}
    samples = {k: sum(r["samples"][k] for r in results) for k in results[0]["samples"]}
    return {
        "route": base_job["route"],
        "kind": base_job["kind"],
        "seconds": seconds,
        "requests_per_s": counters["requests"] / seconds,
        "events_per_s": counters["events"] / seconds,
        "tokens_per_s": counters["stream_words"] / seconds,
        "streams_per_s": counters["streams"] / seconds,
        "errors": counters["errors"],
        "pool_exhausted": counters["exhausted"],
        "node_cpu": node_cpu / seconds,
        # Node CPU time per unit of work: robust to neighbours stealing the node's core.
        "node_cpu_us_per_request": node_cpu / counters["requests"] * 1e6 if counters["requests"] else None,
        "node_cpu_us_per_event": node_cpu / counters["events"] * 1e6 if counters["events"] else None,
        "upstream_cpu_us_per_request": (
            upstream_cpu / counters["requests"] * 1e6 if upstream_cpu is not None and counters["requests"] else None
        ),
        "client_cpu": sum(r["cpu_seconds"] for r in results) / seconds,
        "samples": samples,
    }


def routes_first(routes: dict[str, bool]) -> str:
    return next(iter(routes))


def _measure(
    node: subprocess.Popen,
    port: int,
    kinds: list[str],
    routes: dict[str, bool],
    *,
    ctx,
    seconds: float,
    rounds: int,
    args: argparse.Namespace,
    client_cpus: set[int] | None,
    windows: list[dict[str, Any]],
    upstream: subprocess.Popen | None = None,
    route_ports: dict[str, int] | None = None,
) -> None:
    """`rounds` windows of each kind on each route against `node`, appended to `windows`.
    Kind "upstream" is the requests load on a node whose engine is `upstream`; a route of
    `route_ports` is sent to that port (the relay) instead of the node's."""
    model = _get(port, "/v1/models")["data"][0]["id"]
    node_key = base64.b64decode(_get(port, "/v1/nodes/lock", {"model": model})["public_key"])
    nonce = os.urandom(32).hex()
    document = _get(port, f"/v1/attestation?nonce={nonce}")
    signing_key = base64.b64decode(document["signing_public_key"])
    key_configs = base64.b64decode(document["public_keys"]["ohttp"])
    pool_rate = {"requests": 8000.0, "streams": 600.0}
    for kind in kinds:
        load = "streams" if kind == "streams" else "requests"
        connections = REQUEST_CONNECTIONS if load == "requests" else STREAMS
        for round_ in range(rounds):
            for route in routes:
                job = {
                    "port": (route_ports or {}).get(route, port),
                    "kind": load,
                    "route": route,
                    "padding": routes[route],
                    "key_configs": key_configs,
                    "seconds": seconds,
                    "connections": connections,
                    "words": PROMPT_WORDS,
                    "model": model,
                    "plaintext": _plaintext(model, load == "streams", PROMPT_WORDS, route),
                    "node_key": node_key,
                    "signing_key": signing_key,
                    "pool_size": int(pool_rate[load] * seconds * 1.3) + connections,
                    "samples_per_conn": 1 if round_ == 0 else 0,
                }
                window = run_window(ctx, node, job, args.clients, client_cpus, args.profile, upstream)
                window["kind"] = kind
                if route == routes_first(routes):  # the others are at most this fast: size their pools by it
                    rate = window["requests_per_s"] if load == "requests" else window["streams_per_s"]
                    pool_rate[load] = max(rate * 1.2, 50.0)
                windows.append(window)
                upstream_cpu = window["upstream_cpu_us_per_request"]
                print(
                    f"  {kind:8s} {route:21s} round {round_ + 1}: "
                    f"{window['requests_per_s'] if load == 'requests' else window['events_per_s']:9.0f}/s "
                    f"tokens/s {window['tokens_per_s']:8.0f} node cpu {window['node_cpu']:.2f} "
                    f"client cpu {window['client_cpu']:.2f} "
                    f"node cpu/unit {window['node_cpu_us_per_request' if load == 'requests' else 'node_cpu_us_per_event'] or 0:.0f} us "
                    + (f"upstream cpu/unit {upstream_cpu:.0f} us " if upstream_cpu is not None else "")
                    + f"errors {window['errors']} "
                    f"samples {window['samples']['checked']}/{window['samples']['checked'] + window['samples']['failures']}",
                    flush=True,
                )


# --- privacy pass: issuance and redemption -----------------------------------------------------

PP_API_KEY = "bench-account-key"
PP_BATCHES = (1, 32)
PP_CONNECTIONS = 16


def _pp_env() -> dict[str, str]:
    import hashlib

    return {
        "TEE_NODE_AUTH__API_TOKEN_SHA256": json.dumps([hashlib.sha256(PP_API_KEY.encode()).hexdigest()]),
        "TEE_NODE_AUTH__PRIVACY_PASS__ENABLED": "true",
        "TEE_NODE_AUTH__PRIVACY_PASS__TOKENS_PER_HOUR": str(10**9),
        "TEE_NODE_AUTH__PRIVACY_PASS__MAX_BATCH": str(max(PP_BATCHES)),
    }


def _raw_post(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (head + "\r\n").encode() + body


async def _send_all(port: int, requests: list[bytes], connections: int) -> list[tuple[int, bytes]]:
    """Send every request over `connections` keep-alive connections; the answers in order."""
    conns = []
    for _ in range(connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        conns.append(_Conn(reader, writer))
    answers: list[tuple[int, bytes] | None] = [None] * len(requests)
    next_index = 0

    async def worker(conn: _Conn) -> None:
        nonlocal next_index
        while next_index < len(requests):
            index = next_index
            next_index += 1
            answers[index] = await conn.request(requests[index])

    await asyncio.gather(*(worker(c) for c in conns))
    for conn in conns:
        conn.writer.close()
    return answers  # type: ignore[return-value]


def _timed(node: subprocess.Popen, port: int, requests: list[bytes], connections: int) -> tuple[float, float, list[tuple[int, bytes]]]:
    """(wall seconds, node CPU seconds, answers) of sending `requests`."""
    cpu0, wall0 = cpu_seconds(node.pid), time.perf_counter()
    answers = asyncio.run(_send_all(port, requests, connections))
    return time.perf_counter() - wall0, cpu_seconds(node.pid) - cpu0, answers


def measure_privacy_pass(node_cpus: str | None, client_cpus: set[int] | None, count: int, rounds: int) -> dict[str, Any]:
    """Issuance: tokens/s and node CPU per token, in batches of 1 and 32. Redemption: node CPU
    per confidential request with a PrivateToken against the same requests with a bearer token
    (the baseline), `count` requests each, `PP_CONNECTIONS` connections."""
    from node import envelope
    from node import privacypass as pp
    from node.crypto import b64url_d

    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    bearer = {"Authorization": f"Bearer {PP_API_KEY}"}
    results: dict[str, Any] = {"issuance": {}, "redemption": []}
    with tempfile.TemporaryDirectory() as state_dir:
        port = _free_port()
        node = start_node(port, node_cpus, state_dir, extra_env=_pp_env())
        try:
            model = _get(port, "/v1/models", headers=bearer)["data"][0]["id"]
            node_key = base64.b64decode(_get(port, "/v1/nodes/lock", {"model": model}, headers=bearer)["public_key"])
            directory = _get(port, "/v1/privacy-pass/token-keys")
            token_key = b64url_d(directory["token-keys"][0]["token-key"])
            challenge = pp.TokenChallenge("tee-node").to_bytes()
            issue_headers = {**bearer, "Content-Type": pp.REQUEST_MEDIA_TYPE}
            tokens: list[bytes] = []
            for batch in PP_BATCHES:
                # Blinding is the client's work: done before the timed part, finalised after.
                # The batched run also makes the tokens the redemption rounds spend.
                wanted = count // 2 if batch == 1 else count * rounds
                pending = [pp.PendingIssuance(token_key, challenge, batch, batched=batch > 1) for _ in range(max(4, -(-wanted // batch)))]
                requests = [_raw_post("/v1/privacy-pass/token-request", p.request.to_bytes(), issue_headers) for p in pending]
                wall, cpu, answers = _timed(node, port, requests, 2)
                issued = batch * len(pending)
                assert all(status == 200 for status, _ in answers), "token request refused"
                for p, (_, body) in zip(pending, answers):
                    tokens += p.finalize(body)  # every issuance verified (its DLEQ proof)
                results["issuance"][f"batch_{batch}"] = {
                    "tokens": issued,
                    "tokens_per_s": round(issued / wall, 1),
                    "node_cpu_us_per_token": round(cpu / issued * 1e6, 1),
                }
                print(f"  issuance batch {batch:3d}: {issued / wall:7.0f} tokens/s, node cpu {cpu / issued * 1e6:6.0f} us/token", flush=True)
            plaintext = _plaintext(model, False, 16, "confidential")
            for round_ in range(rounds):
                row = {}
                for credential in ("bearer", "token"):
                    requests = []
                    for _ in range(count):
                        outer, _ = envelope.seal_request(plaintext, node_key, model, padding=True)
                        auth = bearer if credential == "bearer" else {"Authorization": pp.authorization(tokens.pop())}
                        body = json.dumps(outer, separators=(",", ":")).encode()
                        requests.append(_raw_post(CONFIDENTIAL_PATH, body, {**auth, "Content-Type": "application/json"}))
                    wall, cpu, answers = _timed(node, port, requests, PP_CONNECTIONS)
                    assert all(status == 200 for status, _ in answers), f"{credential} request refused"
                    row[credential] = {"requests_per_s": round(count / wall, 1), "node_cpu_us_per_request": round(cpu / count * 1e6, 1)}
                row["token_over_bearer_cpu"] = round(row["token"]["node_cpu_us_per_request"] / row["bearer"]["node_cpu_us_per_request"], 3)
                row["redemption_cpu_us"] = round(row["token"]["node_cpu_us_per_request"] - row["bearer"]["node_cpu_us_per_request"], 1)
                results["redemption"].append(row)
                print(
                    f"  redemption round {round_ + 1}: bearer {row['bearer']['node_cpu_us_per_request']:.0f} us/request, "
                    f"token {row['token']['node_cpu_us_per_request']:.0f} us/request ({row['token_over_bearer_cpu']:.2f}x, "
                    f"+{row['redemption_cpu_us']:.0f} us)",
                    flush=True,
                )
        finally:
            stop(node)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter windows, one round")
    parser.add_argument("--seconds", type=float, default=None, help="length of each timed window")
    parser.add_argument("--rounds", type=int, default=None, help="windows per route and kind (median kept)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin node and generator to separate CPUs")
    parser.add_argument("--clients", type=int, default=1, help="load generator processes")
    parser.add_argument("--only", choices=["requests", "streams", "upstream", "ohttp", "privacy-pass"], default=None)
    parser.add_argument("--no-write", action="store_true", help="print only, do not write server.json")
    parser.add_argument("--profile", metavar="DIR", default=None, help="py-spy the node in each window (raw stacks)")
    parser.add_argument("--label", default=None, help="a note stored with the results")
    parser.add_argument("--name", default="server", help="results file docs/benchmarks/<name>.json")
    args = parser.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 6.0)
    rounds = args.rounds or (1 if args.quick else 3)

    cpus = os.cpu_count() or 1
    pin = not args.no_pin and cpus >= 2 and len(os.sched_getaffinity(0)) >= 2
    node_cpus = "0" if pin else None
    client_cpus = set(range(1, cpus)) if pin else None
    started = time.perf_counter()
    ctx = mp.get_context("spawn")
    port = _free_port()
    kinds = [args.only] if args.only else ["requests", "streams", "upstream", "ohttp"]
    if args.only == "privacy-pass":
        return _privacy_pass_main(args, node_cpus, client_cpus, rounds, started)
    windows: list[dict[str, Any]] = []
    measure = dict(ctx=ctx, seconds=seconds, rounds=rounds, args=args, client_cpus=client_cpus, windows=windows)
    with tempfile.TemporaryDirectory() as state_dir:
        echo_kinds = [kind for kind in kinds if kind in ("requests", "streams")]
        if echo_kinds:
            node = start_node(port, node_cpus, state_dir)
            try:
                _measure(node, port, echo_kinds, ROUTES, **measure)
            finally:
                stop(node)
        if "upstream" in kinds:
            # The upstream shares the generator's CPU: the node keeps its own core, as above.
            upstream_port = _free_port()
            upstream = start_upstream(upstream_port, ",".join(map(str, sorted(client_cpus))) if pin else None)
            try:
                engine = ("--engine", "upstream", "--upstream-url", f"http://127.0.0.1:{upstream_port}")
                node = start_node(port, node_cpus, state_dir, engine)
                try:
                    _measure(node, port, ["upstream"], UPSTREAM_ROUTES, upstream=upstream, **measure)
                finally:
                    stop(node)
            finally:
                stop(upstream)

        if "ohttp" in kinds:
            # The relay is someone else's machine: it runs on the generator's CPU, not the node's.
            relay_port = _free_port()
            node = start_node(port, node_cpus, state_dir)
            try:
                relay = start_relay(relay_port, port, ",".join(map(str, sorted(client_cpus))) if pin else None)
                try:
                    _measure(node, port, ["ohttp"], OHTTP_ROUTES, route_ports={"ohttp_relay": relay_port}, **measure)
                finally:
                    stop(relay)
            finally:
                stop(node)

    def med(kind: str, route: str, key: str) -> float:
        values = [w[key] for w in windows if w["kind"] == kind and w["route"] == route and w[key] is not None]
        return float(statistics.median(values)) if values else float("nan")

    summary: dict[str, Any] = {}
    rows = []
    def by_route(kind: str, key: str, digits: int = 1) -> dict[str, float]:
        return {route: round(med(kind, route, key), digits) for route in ROUTES}

    if "requests" in kinds:
        plain, conf = med("requests", "plain", "requests_per_s"), med("requests", "confidential", "requests_per_s")
        unpadded = med("requests", "confidential_unpadded", "requests_per_s")
        cpu = by_route("requests", "node_cpu_us_per_request")
        cu_p, cu_c = cpu["plain"], cpu["confidential"]
        summary["requests"] = {
            "plain_per_s": round(plain, 1),
            "confidential_per_s": round(conf, 1),
            "confidential_unpadded_per_s": round(unpadded, 1),
            "ratio": round(conf / plain, 3),
            "padded_ratio": round(conf / unpadded, 3),
            "goal": GOALS["requests_ratio"],
            "node_cpu_us_per_request": cpu,
            "cpu_ratio": round(cu_p / cu_c, 3),
            "node_cpu": by_route("requests", "node_cpu", 2),
            "client_cpu": by_route("requests", "client_cpu", 2),
        }
        rows.append([f"requests/s ({REQUEST_CONNECTIONS} conns)", f"{plain:.0f}", f"{conf:.0f}", f"{unpadded:.0f}", f"{conf / plain:.0%}", f">= {GOALS['requests_ratio']:.0%}", "yes" if conf / plain >= GOALS["requests_ratio"] else "NO"])
        rows.append(["  node CPU µs/request", f"{cu_p:.0f}", f"{cu_c:.0f}", f"{cpu['confidential_unpadded']:.0f}", f"{cu_p / cu_c:.0%}", "", ""])
        rows.append(["  padded / unpadded requests/s", "", "", "", f"{conf / unpadded:.0%}", "", ""])
    if "streams" in kinds:
        plain, conf = med("streams", "plain", "events_per_s"), med("streams", "confidential", "events_per_s")
        unpadded = med("streams", "confidential_unpadded", "events_per_s")
        tplain, tconf = med("streams", "plain", "tokens_per_s"), med("streams", "confidential", "tokens_per_s")
        tunpadded = med("streams", "confidential_unpadded", "tokens_per_s")
        cpu = by_route("streams", "node_cpu_us_per_event")
        eu_p, eu_c = cpu["plain"], cpu["confidential"]
        summary["streams"] = {
            "plain_events_per_s": round(plain, 1),
            "confidential_events_per_s": round(conf, 1),
            "confidential_unpadded_events_per_s": round(unpadded, 1),
            "ratio": round(conf / plain, 3),
            "goal": GOALS["events_ratio"],
            "padded_events_ratio": round(conf / unpadded, 3),
            "padded_events_goal": GOALS["padded_events_ratio"],
            "node_cpu_us_per_event": cpu,
            "cpu_ratio": round(eu_p / eu_c, 3),
            "plain_tokens_per_s": round(tplain, 1),
            "confidential_tokens_per_s": round(tconf, 1),
            "confidential_unpadded_tokens_per_s": round(tunpadded, 1),
            "tokens_ratio": round(tconf / tplain, 3),
            "confidential_events_goal": GOALS["confidential_events_per_s"],
            "node_cpu": by_route("streams", "node_cpu", 2),
            "client_cpu": by_route("streams", "client_cpu", 2),
        }
        rows.append([f"stream events/s ({STREAMS} streams)", f"{plain:.0f}", f"{conf:.0f}", f"{unpadded:.0f}", f"{conf / plain:.0%}", f">= {GOALS['events_ratio']:.0%}", "yes" if conf / plain >= GOALS["events_ratio"] else "NO"])
        rows.append(["  node CPU µs/event", f"{eu_p:.0f}", f"{eu_c:.0f}", f"{cpu['confidential_unpadded']:.0f}", f"{eu_p / eu_c:.0%}", "", ""])
        rows.append(["stream tokens/s", f"{tplain:.0f}", f"{tconf:.0f}", f"{tunpadded:.0f}", f"{tconf / tplain:.0%}", "", ""])
        rows.append(["sealed events/s (total)", "", f"{conf:.0f}", f"{unpadded:.0f}", "", f">= {GOALS['confidential_events_per_s']:,}", "yes" if conf >= GOALS["confidential_events_per_s"] else "NO"])
        rows.append(["  padded / unpadded sealed events/s", "", "", "", f"{conf / unpadded:.0%}", f">= {GOALS['padded_events_ratio']:.0%}", "yes" if conf / unpadded >= GOALS["padded_events_ratio"] else "NO"])
    if "upstream" in kinds:
        node_plain, upstream_plain = med("upstream", "plain", "node_cpu_us_per_request"), med("upstream", "plain", "upstream_cpu_us_per_request")
        node_conf, upstream_conf = med("upstream", "confidential", "node_cpu_us_per_request"), med("upstream", "confidential", "upstream_cpu_us_per_request")
        hop = node_plain / upstream_plain
        summary["upstream"] = {
            "node_cpu_us_per_request": round(node_plain, 1),
            "upstream_cpu_us_per_request": round(upstream_plain, 1),
            "ratio": round(hop, 3),
            "goal": GOALS["upstream_hop_ratio"],
            "requests_per_s": {route: round(med("upstream", route, "requests_per_s"), 1) for route in UPSTREAM_ROUTES},
            "confidential": {
                "node_cpu_us_per_request": round(node_conf, 1),
                "upstream_cpu_us_per_request": round(upstream_conf, 1),
            },
        }
        met = "yes" if hop <= GOALS["upstream_hop_ratio"] else "NO"
        rows.append(["through the UpstreamEngine: requests/s", f"{med('upstream', 'plain', 'requests_per_s'):.0f}", f"{med('upstream', 'confidential', 'requests_per_s'):.0f}", "", "", "", ""])
        rows.append(["  node CPU µs/request", f"{node_plain:.0f}", f"{node_conf:.0f}", "", "", "", ""])
        rows.append(["  upstream CPU µs/request", f"{upstream_plain:.0f}", f"{upstream_conf:.0f}", "", "", "", ""])
        rows.append(["  node / upstream CPU (plain)", "", "", "", f"{hop:.2f}x", f"<= {GOALS['upstream_hop_ratio']}x", met])
    if "ohttp" in kinds:
        cpu = {route: round(med("ohttp", route, "node_cpu_us_per_request"), 1) for route in OHTTP_ROUTES}
        rate = {route: round(med("ohttp", route, "requests_per_s"), 1) for route in OHTTP_ROUTES}
        summary["ohttp"] = {
            "requests_per_s": rate,
            "node_cpu_us_per_request": cpu,
            "node_cpu_ratio_vs_direct": {route: round(cpu[route] / cpu["confidential"], 3) for route in ("ohttp", "ohttp_relay")},
        }
        rows.append(["OHTTP: requests/s (direct | ohttp | via relay)", "", f"{rate['confidential']:.0f}", "", f"{rate['ohttp']:.0f} | {rate['ohttp_relay']:.0f}", "", ""])
        rows.append(["  node CPU µs/request", "", f"{cpu['confidential']:.0f}", "", f"{cpu['ohttp']:.0f} | {cpu['ohttp_relay']:.0f}", "", ""])
        rows.append(["  node CPU vs direct confidential", "", "", "", f"{cpu['ohttp'] / cpu['confidential']:.2f}x | {cpu['ohttp_relay'] / cpu['confidential']:.2f}x", "", ""])
    print()
    print_table(["", "plain", "confidential", "padding off", "ratio", "goal", "met"], rows)
    failures = sum(w["samples"]["failures"] for w in windows)
    errors = sum(w["errors"] for w in windows)
    exhausted = sum(w["pool_exhausted"] for w in windows)
    print(f"\nnode pinned to CPU {node_cpus}, generator to CPUs {sorted(client_cpus)}" if pin else "\nno CPU pinning")
    print(f"sample verification failures: {failures}, HTTP errors: {errors}, exhausted pools: {exhausted}")
    print(f"took {time.perf_counter() - started:.0f} s")
    if not args.no_write:
        path = write_results(
            args.name,
            {
                "goals": GOALS,
                "stream_coalesce_max": os.environ.get("TEE_NODE_LIMITS__STREAM_COALESCE_MAX", "default (16)"),
                "quick": args.quick,
                "label": args.label,
                "notes": (
                    "The machine has 2 CPUs shared by the node, the generator and anything else running "
                    "(other test runs): absolute rates move with that, so each window also records the node's "
                    "CPU time per request/event, the figure to compare changes by. Confidential streams coalesce "
                    "engine chunks a stream has already queued (limits.stream_coalesce_max; plain streams send one "
                    "event per chunk, which is cheaper for them), so events per token differ by route and tokens/s "
                    "is the throughput to compare; each confidential event is AES-GCM "
                    "encrypted and Ed25519 signed (~18 us of libsodium alone). Run with "
                    "TEE_NODE_LIMITS__STREAM_COALESCE_MAX=1 for one event per chunk. 'confidential' is "
                    "length-hidden as our client asks by default (padded request, padded answers and events); "
                    "'confidential_unpadded' turns padding off (docs/protocol.md)."
                ),
                "seconds": seconds,
                "rounds": rounds,
                "pinning": {"node_cpus": node_cpus, "client_cpus": sorted(client_cpus) if client_cpus else None},
                "client_processes": args.clients,
                "prompt_words": PROMPT_WORDS,
                "request_connections": REQUEST_CONNECTIONS,
                "streams": STREAMS,
                "summary": summary,
                "windows": windows,
                "sample_failures": failures,
                "http_errors": errors,
            },
        )
        print(f"wrote {path.relative_to(REPO)}")
    return 1 if failures or errors else 0


def _privacy_pass_main(args: argparse.Namespace, node_cpus: str | None, client_cpus: set[int] | None, rounds: int, started: float) -> int:
    count = 300 if args.quick else 1000
    results = measure_privacy_pass(node_cpus, client_cpus, count, rounds)
    median = {
        key: float(statistics.median(r[key] for r in results["redemption"]))
        for key in ("token_over_bearer_cpu", "redemption_cpu_us")
    }
    results["summary"] = {
        "issuance_tokens_per_s": {k: v["tokens_per_s"] for k, v in results["issuance"].items()},
        "issuance_node_cpu_us_per_token": {k: v["node_cpu_us_per_token"] for k, v in results["issuance"].items()},
        "redemption_token_over_bearer_cpu": median["token_over_bearer_cpu"],
        "redemption_cpu_us_per_request": median["redemption_cpu_us"],
    }
    print(json.dumps(results["summary"], indent=1))
    print(f"took {time.perf_counter() - started:.0f} s")
    if not args.no_write:
        path = write_results(
            "privacy-pass" if args.name == "server" else args.name,
            {
                "quick": args.quick,
                "label": args.label,
                "requests_per_round": count,
                "rounds": rounds,
                "connections": PP_CONNECTIONS,
                "pinning": {"node_cpus": node_cpus, "client_cpus": sorted(client_cpus) if client_cpus else None},
                "notes": (
                    "Issuance: pre-blinded token requests sent over 2 connections, node CPU per token issued "
                    "(VOPRF BlindEvaluate and its DLEQ proof, one proof per batch). Redemption: the same "
                    "confidential requests (16-token prompt, padded) with a bearer token (baseline) and with a "
                    "PrivateToken (VOPRF evaluation, constant-time compare, the spent nonce appended and "
                    "fdatasync'ed in a thread), node CPU per request; the difference is the redemption's cost."
                ),
                **results,
            },
        )
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
