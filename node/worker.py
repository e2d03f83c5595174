"""`tee-node worker --head URL`: one worker VM of a multi-VM node (a later pipeline stage).

It makes its keys and a WireGuard key pair in memory, measures its config and weights like the
head, and asks the head to join with its own attestation document, whose nonce binds the link
key (attestation/workers.py). Once the head has appraised and admitted it, it brings the link
up with the head as its only peer and runs vLLM headless (the multiprocessing backend's
`nnodes`, `node_rank`, `master_addr` = the head's link address): every byte vLLM exchanges with
the head crosses the link. A refused worker prints the failing claims and never starts vLLM.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from attestation.workers import link_nonce

from .config import NodeConfig
from .engine.vllm import end_engine_processes, engine_args_for, set_engine_environment
from .keys import KeyRing, Signer
from .link import LinkKeys, WireGuardLink, vllm_environment
from .models import prepare_model, weights_sha256
from .server.attestation import AttestationService

log = logging.getLogger("tee_node.worker")

JOIN_RETRY = 2.0  # seconds between join attempts while the head is still preparing its models
HEAD_KEEPALIVE = 25  # seconds: keeps the head's view of this worker's endpoint fresh through NATs
# With keepalives flowing, WireGuard renews its session every 2 minutes; no handshake for this
# long means the head is gone (stopped, or restarted with a new link key): the worker ends, and
# its supervisor starts it again to join the head's next run.
HEAD_LOST_AFTER = 300.0


class JoinRefused(Exception):
    """The head refused this worker; `failed_claims` says why."""

    def __init__(self, status: int, failed_claims: list[str]) -> None:
        super().__init__("; ".join(failed_claims) or f"HTTP {status}")
        self.failed_claims = failed_claims


@dataclass(frozen=True)
class Admission:
    role: str
    node_rank: int
    nnodes: int
    link_address: str
    head_link_address: str
    head_link_public_key: bytes
    head_link_port: int
    rendezvous_port: int


def _measure(config: NodeConfig) -> tuple[AttestationService, dict[str, str], list[str]]:
    """Prepare the models as the head does and fix the measured config (and the simulated MRTD)."""
    weights: dict[str, str] = {}
    paths = []
    for cfg in config.engine.models:
        path = prepare_model(cfg.source, config.cache_dir, lambda message: log.info("model check: %s", message))
        digest = weights_sha256(cfg.source, path)
        if digest is not None:
            weights[cfg.name] = digest
        paths.append(str(path))
    service = AttestationService(config)
    service.measure(weights)
    return service, weights, paths


async def join(session: aiohttp.ClientSession, head: str, config: NodeConfig, service: AttestationService, link: LinkKeys, deadline: float) -> Admission:
    """Challenge, evidence, join; retried while the head is not ready to take workers (503)."""
    keyring = KeyRing(config.keys.rotation_interval, config.keys.overlap, config.keys.replay_capacity)
    signer = Signer.generate()
    loop = asyncio.get_running_loop()
    while True:
        async with session.post(f"{head}/v1/workers/challenge") as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise JoinRefused(response.status, _claims(body))
        challenge = bytes.fromhex(body["challenge"])
        evidence = await service.document(
            link_nonce(challenge, link.public_key),
            keyring.current,
            signer,
            # The release this VM runs (attestation.release_bundle), for policies with a [release].
            release_bundle=service.release_bundle,
        )
        request = {
            "challenge": challenge.hex(),
            "link_public_key": link.public_key_b64,
            "link_port": config.workers.link_port,
            "evidence": evidence,
        }
        async with session.post(f"{head}/v1/workers/join", json=request) as response:
            body = await response.json(content_type=None)
            if response.status == 200:
                return Admission(
                    role=body["role"],
                    node_rank=body["node_rank"],
                    nnodes=body["nnodes"],
                    link_address=body["link_address"],
                    head_link_address=body["head_link_address"],
                    head_link_public_key=base64.b64decode(body["head_link_public_key"], validate=True),
                    head_link_port=body["head_link_port"],
                    rendezvous_port=body["rendezvous_port"],
                )
            if response.status != 503 or loop.time() > deadline:
                raise JoinRefused(response.status, _claims(body))
        log.info("worker: the head is not ready to take workers yet; asking again in %.0f s", JOIN_RETRY)
        await asyncio.sleep(JOIN_RETRY)


def _claims(body: Any) -> list[str]:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return []
    claims = error.get("failed_claims")
    if isinstance(claims, list):
        return [c for c in claims if isinstance(c, str)]
    return [str(error.get("message", ""))]


async def _watch_head(link: WireGuardLink, head_key: bytes, since: float) -> None:
    """Returns once the link has had no handshake with the head for HEAD_LOST_AFTER seconds."""
    while True:
        await asyncio.sleep(HEAD_KEEPALIVE)
        last = await link.latest_handshake(head_key) or since
        if time.time() - last > HEAD_LOST_AFTER:
            return


def _run_headless(config: NodeConfig, model: str, admission: Admission) -> None:
    """vLLM's headless multi-node worker, as `vllm serve --headless` runs it (blocks until it ends)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    args = AsyncEngineArgs(
        **engine_args_for(config.engine.models[0], model, cpu=current_platform.is_cpu()),
        nnodes=admission.nnodes,
        node_rank=admission.node_rank,
        master_addr=admission.head_link_address,
        master_port=admission.rendezvous_port,
    )
    vllm_config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER, headless=True)
    executor = MultiprocExecutor(vllm_config, monitor_workers=False)
    log.info("worker: vLLM %s loaded; serving the head", admission.role)
    executor.start_worker_monitor(inline=True)


async def run(config: NodeConfig, head: str, *, join_timeout: float = 600.0) -> int:
    head = head.rstrip("/")
    service, _, paths = await asyncio.to_thread(_measure, config)
    log.info("worker: measured config fixed: config_digest=%s", service.config_digest.hex())
    keys = LinkKeys.generate()
    # The worker cannot pin the head's self-signed certificate before it knows it; what it sends
    # (its public evidence and link key) is public, and only the head it joins talks to it afterwards.
    connector = aiohttp.TCPConnector(ssl=False)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        try:
            admission = await join(session, head, config, service, keys, loop.time() + join_timeout)
        except JoinRefused as exc:
            log.error("worker: the head refused this worker: %s", exc)
            for claim in exc.failed_claims:
                print(f"refused: {claim}", flush=True)
            return 1
    log.info("worker: admitted as %s (node rank %d of %d)", admission.role, admission.node_rank, admission.nnodes)
    link = WireGuardLink(config.workers.link_interface, keys, admission.link_address, config.workers.link_port)
    await link.start()
    try:
        head_host = urlsplit(head).hostname or ""
        await link.add_peer(
            admission.head_link_public_key,
            admission.head_link_address,
            endpoint=f"{head_host}:{admission.head_link_port}",
            keepalive=HEAD_KEEPALIVE,
        )
        set_engine_environment(config.cache_dir, config.log_level)
        os.environ.update(vllm_environment(link))
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        vllm = loop.run_in_executor(None, _run_headless, config, paths[0], admission)
        stopping = asyncio.ensure_future(stop.wait())
        head_lost = asyncio.ensure_future(_watch_head(link, admission.head_link_public_key, time.time()))
        try:
            await asyncio.wait([vllm, stopping, head_lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            head_lost.cancel()
        if vllm.done() and vllm.exception() is not None:
            exc = vllm.exception()
            log.error("worker: vLLM failed: %s: %s", type(exc).__name__, exc)
            return 1
        if head_lost.done() and not head_lost.cancelled():
            log.error("worker: no WireGuard handshake with the head for %.0f s: the head is gone; stopping", HEAD_LOST_AFTER)
            return 1
        return 0
    finally:
        end_engine_processes()
        await link.stop()
        log.info("worker stopped")
