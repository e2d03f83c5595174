"""A model split over two attested VMs, on one machine: two network namespaces, each with its own
/dev/shm and /run/wireguard (so nothing crosses between them but the network), a veth pair,
the node's own WireGuard link over it, a simulated TEE in each.

The head (`tee-node serve`, vLLM rank 0, pipeline stage 0) refuses a worker whose measurement
differs and names the claims, admits the matching one (`tee-node worker`, vLLM headless,
pipeline stage 1), and only then loads SmolLM2 split in two pipeline stages. A confidential
chat through the head answers "Paris" with every event and the receipt verified, `attest`
shows both VMs, and a capture on the veth sees nothing but WireGuard's UDP.

Needs root, iproute2, wireguard-go, wireguard-tools and tcpdump (.ci/run installs them).
Marked `multivm`: not part of a plain `pytest` run; `pytest -m multivm` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration_support import BIN, CHAT_MODEL, QUESTION, REPO, Proc, clean_env

pytestmark = [pytest.mark.multivm, pytest.mark.timeout(900)]

TOOLS = ("ip", "unshare", "wireguard-go", "wg", "tcpdump")
HEAD_IP, WORKER_IP = "172.31.250.1", "172.31.250.2"
LINK_ADDRESS = "10.250.0.1/24"
LINK_PORT = 51820
PORT = 8080
HEAD_URL = f"http://{HEAD_IP}:{PORT}"
READY_TIMEOUT = 600.0

CONFIG = f"""
host = "{HEAD_IP}"
port = {PORT}
tee_mode = "simulated"

[engine]
kind = "vllm"

[[engine.models]]
name = "{CHAT_MODEL}"
source = "embedded:smollm2"
dtype = "float32"
max_model_len = MAX_MODEL_LEN
pipeline_parallel_size = 2
distributed_executor_backend = "mp"

[workers]
count = 1
link_address = "{LINK_ADDRESS}"
link_port = {LINK_PORT}
"""


def _run(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout)


@dataclass
class Vm:
    """One simulated confidential VM: a network namespace, its own cache (weights hard-linked),
    state (its own simulated root of trust) and, per process, its own /dev/shm and /run/wireguard."""

    netns: str
    veth: str
    ip: str
    home: Path

    def command(self, *argv: str) -> list[str]:
        mounts = "mount -t tmpfs tmpfs /dev/shm && mkdir -p /run/wireguard && mount -t tmpfs tmpfs /run/wireguard"
        return ["ip", "netns", "exec", self.netns, "unshare", "--mount", "sh", "-c", f'{mounts} && exec "$@"', "vm", *argv]

    def env(self) -> dict[str, str]:
        return clean_env(
            PYTHONPATH=str(REPO),
            TEE_NODE_CACHE_DIR=str(self.home / "cache"),
            TEE_NODE_ATTESTATION__STATE_DIR=str(self.home / "state"),
        )

    def start(self, name: str, *argv: str) -> Proc:
        return Proc(name, self.command(*argv), self.env(), self.home / f"{name}.log")

    def run(self, *argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*argv), env=self.env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def kill_all(self) -> None:
        """Whatever still runs in this namespace was started by this test."""
        pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def _prepare_home(home: Path, model_dir: Path) -> None:
    """The VM's own cache holding the prepared weights (hard links: the same bytes, as two VMs
    built from one image hold them) and nothing else."""
    models = home / "cache" / "models"
    models.mkdir(parents=True)
    shutil.copytree(model_dir, models / model_dir.name, copy_function=_link_or_copy)
    (home / "state").mkdir()


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """The VMs' directories: a directory of this test's own (pytest's base temp directory keeps
    only the last few sessions' and is pruned by any other pytest session started meanwhile)."""
    path = Path(tempfile.mkdtemp(prefix="tee-node-multivm-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def vms(home: Path, chat_model_dir: Path) -> Iterator[tuple[Vm, Vm]]:
    assert os.geteuid() == 0, "the multi-VM test makes network namespaces and tun devices: run it as root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"missing {', '.join(missing)}: apt-get install iproute2 util-linux wireguard-go wireguard-tools tcpdump"
    tag = str(os.getpid())
    head = Vm(f"tnhead{tag}", f"tnh{tag}", HEAD_IP, home / "head")
    worker = Vm(f"tnwork{tag}", f"tnw{tag}", WORKER_IP, home / "worker")
    for vm in (head, worker):
        _prepare_home(vm.home, chat_model_dir)
        _run("ip", "netns", "add", vm.netns)
    try:
        _run("ip", "link", "add", head.veth, "type", "veth", "peer", "name", worker.veth)
        for vm in (head, worker):
            _run("ip", "link", "set", vm.veth, "netns", vm.netns)
            # IPv4 only: no IPv6 neighbour discovery on the wire, so the capture holds only what the VMs send.
            ipv6 = "/proc/sys/net/ipv6/conf/all/disable_ipv6"
            _run("ip", "netns", "exec", vm.netns, "sh", "-c", f"test ! -e {ipv6} || echo 1 > {ipv6}")
            _run("ip", "-n", vm.netns, "address", "add", f"{vm.ip}/24", "dev", vm.veth)
            _run("ip", "-n", vm.netns, "link", "set", "lo", "up")
            _run("ip", "-n", vm.netns, "link", "set", vm.veth, "up")
        yield head, worker
    finally:
        for vm in (head, worker):
            vm.kill_all()
            subprocess.run(["ip", "netns", "del", vm.netns], capture_output=True)


def _config(path: Path, max_model_len: int) -> Path:
    path.write_text(CONFIG.replace("MAX_MODEL_LEN", str(max_model_len)))
    return path


_READY_PROBE = f"""
import json, urllib.error, urllib.request
try:
    with urllib.request.urlopen('{HEAD_URL}/ready', timeout=5) as r:
        print(json.dumps([r.status, json.loads(r.read())]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, json.loads(e.read())]))
except OSError:
    print(json.dumps([0, None]))
"""


def _ready(head: Vm) -> tuple[int, dict | None]:
    """/ready of the head, asked from inside its VM: (status, body)."""
    status, body = json.loads(head.run(str(BIN / "python"), "-c", _READY_PROBE).stdout)
    return status, body


def _ready_status(head: Vm) -> int:
    return _ready(head)[0]


def _wait_ready(head: Vm, procs: list[Proc], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        for proc in procs:
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited {proc.popen.returncode}:\n{proc.tail()}")
        if _ready_status(head) == 200:
            return time.monotonic() - started
        time.sleep(2)
    pytest.fail(f"the head was not ready after {timeout:.0f} s:\n{procs[0].tail()}\n--- worker:\n{procs[-1].tail()}")


@pytest.fixture(scope="module")
def split_node(vms: tuple[Vm, Vm], home: Path) -> Iterator[dict]:
    """The head refuses the wrong worker, admits the right one, loads the split model."""
    head, worker = vms
    config = _config(home / "node.toml", 512)
    other = _config(home / "other.toml", 1024)  # one measured setting differs: another config digest and MRTD
    node = head.start("head", str(BIN / "tee-node"), "serve", "--config", str(config))
    procs = [node]
    try:
        refused = worker.run(str(BIN / "tee-node"), "worker", "--head", HEAD_URL, "--config", str(other), timeout=300)
        not_ready_after_refusal = _ready(head)
        good = worker.start("worker", str(BIN / "tee-node"), "worker", "--head", HEAD_URL, "--config", str(config))
        procs.append(good)
        seconds = _wait_ready(head, procs, READY_TIMEOUT)
        print(f"\nsplit node ready in {seconds:.0f} s after the worker started", file=sys.stderr)
        yield {"refused": refused, "not_ready_after_refusal": not_ready_after_refusal, "head": node, "worker": good, "config": config}
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_a_worker_with_another_measurement_is_refused_and_named(split_node):
    refused = split_node["refused"]
    assert refused.returncode == 1, refused.stdout + refused.stderr
    lines = [line for line in refused.stdout.splitlines() if line.startswith("refused: ")]
    assert any(line.startswith("refused: mr_td differs from policy") for line in lines), refused.stdout
    assert any(line.startswith("refused: config_digest differs from policy") for line in lines), refused.stdout
    status, body = split_node["not_ready_after_refusal"]
    assert status == 503 and body["error"]["code"] == "NOT_READY", body
    # /ready says why: no worker admitted yet, and the refused one's failing claims.
    workers = body["error"]["workers"]
    assert (workers["expected"], workers["admitted"]) == (1, 0) and "mr_td differs from policy" in workers["refused"][0], body
    head_log = split_node["head"].log.read_text()
    assert "a worker was refused: mr_td differs from policy" in head_log
    # The refused worker never got a link address or a rank: vLLM's world is the head and one worker.
    assert head_log.count("admitted (measurement") == 1


def test_a_confidential_chat_through_the_split_model_answers_paris(vms, split_node):
    head, worker = vms
    capture_file = head.home / "veth.pcap"
    capture = subprocess.Popen(
        ["ip", "netns", "exec", head.netns, "tcpdump", "-i", head.veth, "-n", "-U", "-w", str(capture_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # tcpdump attaches
        chat = head.run(
            str(BIN / "tee-node"), "chat", HEAD_URL, QUESTION,
            "--allow-simulated", "--temperature", "0", "--max-tokens", "16",
        )
    finally:
        time.sleep(1.0)
        capture.terminate()
        capture.wait(timeout=10)
    assert chat.returncode == 0, chat.stdout + chat.stderr
    assert "Paris" in chat.stdout, chat.stdout
    # The CLI says this (on stderr, beside the answer) only once every event's hash and
    # signature and the receipt have verified.
    assert "receipt verified:" in chat.stderr and "signed by the attested key" in chat.stderr, chat.stderr

    packets = _run("tcpdump", "-r", str(capture_file), "-n", "-tt").stdout.splitlines()
    assert packets, "the chat sent nothing between the VMs: the pipeline's second stage did not run over the veth"
    wireguard = [p for p in packets if _is_wireguard(p)]
    # ARP (who has the peer's underlay address) is the link layer finding the peer, not traffic of the VMs.
    others = [p for p in packets if not _is_wireguard(p) and " ARP, " not in p]
    assert not others, f"{len(others)} packet(s) on the veth are not the link's WireGuard UDP:\n" + "\n".join(others[:10])
    assert len(wireguard) > 10, packets  # the prompt's activations and 16 decode steps crossed the link
    # Both directions: activations go to stage 1, its output comes back to the head's sampler.
    assert any(f"{HEAD_IP}.{LINK_PORT} > {WORKER_IP}.{LINK_PORT}" in p for p in wireguard)
    assert any(f"{WORKER_IP}.{LINK_PORT} > {HEAD_IP}.{LINK_PORT}" in p for p in wireguard)


def _is_wireguard(line: str) -> bool:
    ends = {f"{HEAD_IP}.{LINK_PORT}", f"{WORKER_IP}.{LINK_PORT}", f"{WORKER_IP}.{LINK_PORT}:", f"{HEAD_IP}.{LINK_PORT}:"}
    fields = line.split()
    return len(fields) > 4 and fields[1] == "IP" and fields[2] in ends and fields[4] in ends and "UDP" in line


def test_attest_lists_both_vms_verified_under_one_policy(vms, split_node):
    head, _ = vms
    attest = head.run(str(BIN / "tee-node"), "attest", HEAD_URL, "--allow-simulated", "--json")
    assert attest.returncode == 0, attest.stdout + attest.stderr
    result = json.loads(attest.stdout)
    assert result["accepted"] is True
    roles = [vm["role"] for vm in result["vms"]]
    assert roles == ["head", "pipeline-stage-1"], result["vms"]
    head_vm, worker_vm = result["vms"]
    assert worker_vm["measurement"] == head_vm["measurement"] and worker_vm["config_digest"] == head_vm["config_digest"]
    assert result["document"]["workers"][0]["link_public_key"] == worker_vm["link_public_key"]
    # A client pinning another worker measurement refuses the whole node, naming the worker.
    pinned = head.run(
        str(BIN / "tee-node"), "attest", HEAD_URL, "--allow-simulated", "--json", "--measurement", head_vm["measurement"],
    )
    assert pinned.returncode == 0, pinned.stdout
    wrong = head.run(str(BIN / "tee-node"), "attest", HEAD_URL, "--allow-simulated", "--json", "--measurement", "ab" * 48)
    refusal = json.loads(wrong.stdout)
    assert wrong.returncode != 0 and refusal["accepted"] is False
    assert any(e.startswith("worker pipeline-stage-1: mr_td") for e in refusal["policy_errors"]), refusal
