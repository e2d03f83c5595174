"""Worker VMs joining the head (`tee-node worker`): challenge, appraisal, the WireGuard link.

A worker asks `POST /v1/workers/challenge` for a fresh challenge, then `POST /v1/workers/join`
with its link public key and its own attestation document whose nonce binds both
(attestation/workers.py). The head checks that document as a client would (`verify_document`:
authenticity, then `appraise`, the one place trust is decided) under its worker policy: a
worker that fails is refused with every failing claim named, never reaches the link or vLLM,
and the head stays not ready. An admitted worker becomes a WireGuard peer; once
`workers.count` have joined, the engine loads with vLLM's multi-node settings pointing at the
head's link address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import time
import tomllib
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from attestation.appraisal import Policy, load_policy, policy_from_claims
from attestation.document import verify_document, verify_evidence
from attestation.errors import AttestationError, PolicyRefused
from attestation.workers import CHALLENGE_SIZE, WorkerEntry

from ..config import NodeConfig
from ..errors import InvalidBody, MalformedJson, NotReady, WaitingForWorkers, WorkerRefused
from ..link import LinkKeys, WireGuardLink, peer_address, vllm_environment
from .middleware import CONTEXT
from .serving import read_body
from .state import NODE

log = logging.getLogger("tee_node.workers")

# Bounds on what unauthenticated callers can make the head hold: outstanding challenges (the
# oldest goes first) and the refusals /ready reports (the latest are kept).
MAX_CHALLENGES = 64
MAX_REFUSALS = 8


def worker_role(node_rank: int) -> str:
    return f"pipeline-stage-{node_rank}"


class WorkerAdmission:
    """The head's side of a multi-VM node: challenges, admitted workers, the link, the engine gate."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.keys = LinkKeys.generate()
        settings = config.workers
        self.link = WireGuardLink(settings.link_interface, self.keys, settings.link_address, settings.link_port)
        self.entries: list[WorkerEntry] = []
        self.refusals: list[str] = []
        self._challenges: dict[bytes, float] = {}
        self._policy: Policy | None = None
        # Read at start: a policy file that does not load stops `tee-node serve` with its reason.
        self._file_policy = _load_worker_policy(settings.policy) if settings.policy is not None else None
        self._prepared = asyncio.Event()
        self._complete = asyncio.Event()
        self._join_lock = asyncio.Lock()

    def workers(self) -> list[dict[str, Any]] | None:
        """The document's `workers`: every admitted worker's entry (None on a single-VM node)."""
        return [entry.to_json() for entry in self.entries] if self.config.workers.count else None

    def not_ready(self) -> NotReady:
        """/ready's answer while the model is not loaded: until every worker has joined, which
        workers are missing and each refusal's failing claims."""
        if self._complete.is_set():
            return NotReady()
        return WaitingForWorkers(self.config.workers.count, len(self.entries), self.refusals)

    def engine_args(self) -> dict[str, Any]:
        """vLLM's multi-node settings for the head, rank 0, rendezvous on its link address."""
        return {
            "nnodes": self.config.workers.count + 1,
            "node_rank": 0,
            "master_addr": self.link.ip,
            "master_port": self.config.workers.rendezvous_port,
        }

    async def gate(self, head_policy: Policy) -> None:
        """Called by the engine once its models are prepared: bring the link up, then wait until
        every worker has joined. `head_policy` pins the head's own evidence (the default policy)."""
        settings = self.config.workers
        self._policy = self.worker_policy(head_policy)
        await self.link.start()
        os.environ.update(vllm_environment(self.link))
        self._prepared.set()
        log.info("workers: waiting for %d worker VM(s) to join over %s", settings.count, self.link.address)
        await self._complete.wait()

    def worker_policy(self, head_policy: Policy) -> Policy:
        """`[workers] policy` (a policy file, e.g. pinning the release the VMs run), else the head's own evidence."""
        return self._file_policy if self._file_policy is not None else head_policy

    def challenge(self) -> bytes:
        now = time.monotonic()
        self._challenges = {c: t for c, t in self._challenges.items() if t > now}
        while len(self._challenges) >= MAX_CHALLENGES:
            del self._challenges[next(iter(self._challenges))]
        challenge = secrets.token_bytes(CHALLENGE_SIZE)
        self._challenges[challenge] = now + self.config.workers.challenge_ttl
        return challenge

    def _take_challenge(self, challenge: bytes) -> None:
        expires = self._challenges.pop(challenge, None)
        if expires is None or expires < time.monotonic():
            raise WorkerRefused(("challenge is unknown, used or expired: ask /v1/workers/challenge for a new one",))

    async def join(self, entry: WorkerEntry, link_port: int, remote: str) -> dict[str, Any]:
        """Appraise the worker's evidence; admit it as a link peer and assign its rank, or refuse."""
        if not self._prepared.is_set():
            raise NotReady()
        self._take_challenge(entry.challenge)
        assert self._policy is not None
        try:
            # A client's own path: authenticity (the release included), then `appraise`.
            verified = await asyncio.to_thread(verify_document, entry.evidence, expected_nonce=entry.expected_nonce, policy=self._policy)
        except PolicyRefused as exc:
            self._refuse(*exc.errors)
        except AttestationError as exc:
            self._refuse(f"evidence does not verify: {exc}")
        if verified.workers is not None:
            self._refuse("a worker's evidence must not list workers of its own")
        async with self._join_lock:
            if self._complete.is_set():
                raise WorkerRefused(("the node already has all its workers (workers.count)",))
            if any(e.link_public_key == entry.link_public_key for e in self.entries):
                raise WorkerRefused(("this link key has already joined",))
            node_rank = len(self.entries) + 1
            address = peer_address(self.config.workers.link_address, node_rank)
            await self.link.add_peer(entry.link_public_key, address, endpoint=f"{remote}:{link_port}")
            admitted = WorkerEntry(worker_role(node_rank), entry.link_public_key, entry.challenge, entry.evidence)
            self.entries.append(admitted)
            log.info("workers: %s admitted (measurement %s) at %s", admitted.role, verified.measurement, address)
            if len(self.entries) == self.config.workers.count:
                self._complete.set()
        return {
            "role": admitted.role,
            "node_rank": node_rank,
            "nnodes": self.config.workers.count + 1,
            "link_address": address,
            "head_link_address": self.link.ip,
            "head_link_public_key": self.keys.public_key_b64,
            "head_link_port": self.config.workers.link_port,
            "rendezvous_port": self.config.workers.rendezvous_port,
        }

    def _refuse(self, *errors: str) -> None:
        self.refusals = [*self.refusals, "; ".join(errors)][-MAX_REFUSALS:]
        log.warning("workers: a worker was refused: %s; the node stays not ready until enough workers pass", "; ".join(errors))
        raise WorkerRefused(errors)

    async def stop(self) -> None:
        self._complete.set()  # a gate still waiting gives way: the node is stopping
        await self.link.stop()


def _load_worker_policy(path: Path) -> Policy:
    try:
        return load_policy(path)
    except OSError as exc:
        raise ValueError(f"workers.policy {path} cannot be read: {exc.strerror}: give a policy file (docs/policy.md) or none") from None


async def own_policy(service: Any, state: Any) -> Policy:
    """The default worker policy: every register of the head's own evidence and its config digest
    (tee-node policy from-quote applied to itself), so a worker must run what the head runs."""
    nonce = secrets.token_bytes(32)
    document = await service.document(nonce, state.keyring.current, state.signer)
    claims = (await asyncio.to_thread(verify_evidence, document, expected_nonce=nonce)).claims
    return Policy.from_mapping(tomllib.loads(policy_from_claims(claims)))


async def _json_body(request: web.Request) -> dict[str, Any]:
    state = request.app[NODE]
    body = await read_body(state, request, request[CONTEXT])
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedJson() from None
    if not isinstance(data, dict):
        raise InvalidBody("request body must be a JSON object")
    return data


async def workers_challenge(request: web.Request) -> web.Response:
    admission: WorkerAdmission | None = request.app[NODE].workers
    if admission is None:
        raise WorkerRefused(("this node takes no workers (workers.count = 0)",))
    return web.json_response({"challenge": admission.challenge().hex()})


async def workers_join(request: web.Request) -> web.Response:
    admission: WorkerAdmission | None = request.app[NODE].workers
    if admission is None:
        raise WorkerRefused(("this node takes no workers (workers.count = 0)",))
    data = await _json_body(request)
    link_port = data.get("link_port")
    if not isinstance(link_port, int) or isinstance(link_port, bool) or not 1 <= link_port <= 65535:
        raise InvalidBody("link_port must be a UDP port number")
    try:
        entry = WorkerEntry.from_json({**data, "role": "joining"})
    except AttestationError:
        raise InvalidBody("challenge, link_public_key or evidence is malformed") from None
    try:
        remote = ipaddress.ip_address(request.remote or "")
    except ValueError:  # relayed (Oblivious HTTP): no address to reach the worker at
        raise InvalidBody("a worker joins directly, not through a relay: the head needs its address for the link") from None
    answer = await admission.join(entry, link_port, f"[{remote}]" if remote.version == 6 else str(remote))
    return web.Response(body=orjson.dumps(answer), content_type="application/json")
