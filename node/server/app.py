"""The aiohttp app factory: wires routes to serving logic, owns lifecycles (`cleanup_ctx`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from .. import supervisor
from ..config import NodeConfig
from ..engine import Engine, build_engine
from .. import privacypass as pp
from ..crypto import b64e
from ..errors import InvalidTokenRequest, MalformedJson, ModelNotFound, NotReady, PlaintextDisabled, SchemaViolation, Unauthorized
from ..protocol import NodesCreateLockRequest
from .attestation import AttestationService, attestation_document, collateral_lifecycle
from .middleware import CONTEXT, error_middleware
from .ohttp import add_gateway
from .openapi import openapi_document
from .privacy_pass import DIRECTORY_PATH, ISSUANCE_PATH, PrivacyPass, privacy_pass_lifecycle
from .serving import CHAT, COMPLETIONS, EMBEDDINGS, IMAGES, Endpoint, authorize, read_body, serve_confidential, serve_plain
from .state import NODE, NodeState, bearer_token
from .tls import TlsIdentity
from .workers import WorkerAdmission, own_policy, workers_challenge, workers_join

log = logging.getLogger("tee_node.server")

CONFIDENTIAL_ROUTES = {
    "/v1/confidential/chat/completions": CHAT,
    "/v1/confidential/completions": COMPLETIONS,
    "/v1/confidential/embeddings": EMBEDDINGS,
    "/v1/confidential/images/generations": IMAGES,
}
PLAIN_ROUTES = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/images/generations": IMAGES,
}


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _confidential(endpoint: Endpoint):
    async def handler(request: web.Request) -> web.StreamResponse:
        return await serve_confidential(request, endpoint)

    return handler


async def _plaintext_disabled(request: web.Request) -> web.StreamResponse:
    """Said, not a bare 404: a user who sends OpenAI requests here learns why and what to do."""
    raise PlaintextDisabled()


def _plain(endpoint: Endpoint):
    async def handler(request: web.Request) -> web.StreamResponse:
        return await serve_plain(request, endpoint)

    return handler


async def nodes_lock(request: web.Request) -> web.Response:
    """Key discovery for clients pointed straight at the node (Atoma's proxy answers it there)."""
    state = request.app[NODE]
    await authorize(state, request)
    body = await read_body(state, request, request[CONTEXT])
    try:
        lock = NodesCreateLockRequest.model_validate_json(body)
    except ValidationError as exc:
        problems = exc.errors(include_input=False, include_url=False, include_context=False)
        if any(e["type"] == "json_invalid" for e in problems):
            raise MalformedJson() from None
        raise SchemaViolation.naming(problems) from None
    if not any(card.id == lock.model for card in state.engine.models()):
        raise ModelNotFound()
    key = state.keyring.live_keys()[0]
    return _json(
        {
            "public_key": key.public_key_b64,
            "node_small_id": state.config.node_small_id,
            "stack_entry_digest": None,
            "stack_small_id": 0,
            "kem_public_key": key.kem_public_key_b64,
        }
    )


async def list_models(request: web.Request) -> web.Response:
    state = request.app[NODE]
    await authorize(state, request)
    created = int(state.started_at)
    return _json({"object": "list", "data": [card.to_openai(created) for card in state.engine.models()]})


async def token_keys(request: web.Request) -> web.Response:
    """The issuer directory (RFC 9578 section 4); public, like the attestation."""
    issuer: PrivacyPass = request.app[NODE].privacy_pass
    return web.Response(body=orjson.dumps(issuer.directory()), content_type=pp.DIRECTORY_MEDIA_TYPE)


async def token_request(request: web.Request) -> web.Response:
    """Issuance (RFC 9578 section 5, or its batched form) to an account, within its quota.
    Only a bearer token authenticates here: a token buys no tokens."""
    state = request.app[NODE]
    account = state.token_digest(bearer_token(request))
    if account is None:
        raise Unauthorized()
    if request.content_type != pp.REQUEST_MEDIA_TYPE:
        raise InvalidTokenRequest()
    body = await read_body(state, request, request[CONTEXT])
    # On the loop: the voprf package holds the GIL, so a thread would not let the loop run
    # (about 1 ms of CPU per token; auth.privacy_pass.max_batch bounds a request's share).
    response, count = state.privacy_pass.issue(account, body)
    state.metrics.tokens_issued.inc(count)
    return web.Response(body=response, content_type=pp.RESPONSE_MEDIA_TYPE)


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[NODE]
    if not state.engine.ready:
        raise state.workers.not_ready() if state.workers is not None else NotReady()
    return _json({"status": "ready", "key_epoch": state.keyring.current.epoch})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[NODE]
    if not state.config.auth.metrics_public:
        await authorize(state, request)
    state.metrics.engine_ready.set(1 if state.engine.ready else 0)
    state.metrics.in_flight.set(state.admission.in_flight)
    state.metrics.queued.set(state.admission.queued)
    state.metrics.key_epoch.set(state.keyring.current.epoch)
    running = getattr(state.engine, "running_requests", None)
    if running is not None:
        state.metrics.engine_running.set(running())
    return web.Response(body=state.metrics.render(), content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    return _json(request.app[OPENAPI])


OPENAPI: web.AppKey[dict] = web.AppKey("openapi", dict)


def ready_line(config: NodeConfig, models: list[str], seconds: float, config_digest: bytes) -> str:
    """The one line that says the node serves: where, in which TEE mode, what, which config."""
    mode = config.tee_mode + (" (NOT a TEE: testing only)" if config.tee_mode == "simulated" else "")
    return (
        f"READY at {'https' if config.tls_enabled else 'http'}://{config.host}:{config.port} in {seconds:.1f} s | tee_mode={mode} | "
        f"models={', '.join(models)} | config_digest={config_digest.hex()}"
    )


async def _announce(app: web.Application) -> AsyncIterator[None]:
    """Say what the node attests with and which keys it holds; last of all, that it stopped."""
    state = app[NODE]
    if state.config.tee_mode == "simulated":
        log.info("attestation: simulated TEE (software root of trust, refused by verifiers unless told otherwise)")
    else:
        gpus = state.attestation.gpu.device_count if state.attestation.gpu else 0
        log.info("attestation: %s quotes via configfs-tsm, %d GPU(s) with evidence", state.config.tee_mode, gpus)
    key = state.keyring.current
    log.info(
        "keys: X25519 key epoch %d (rotated every %.0f s), Ed25519 signing key %s, both in memory only",
        key.epoch,
        state.config.keys.rotation_interval,
        state.signer.public_key_b64,
    )
    yield
    log.info("tee-node stopped")


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Load the engine in the background: /health answers at once, /ready once it is loaded."""
    state = app[NODE]

    async def load() -> None:
        try:
            await state.engine.start()
        except Exception as exc:  # the reason by type only; /ready stays 503
            log.error("engine %s failed to start: %s", state.engine.name, type(exc).__name__)
            return
        if not state.engine.ready:
            log.error("engine %s did not start (see above); /ready stays 503", state.engine.name)
            return
        service = state.attestation
        if service.measured_config is None:  # the weights are known now
            service.measure(state.engine.weights_sha256())
        models = [card.id for card in state.engine.models()]
        log.info(ready_line(state.config, models, time.time() - state.started_at, service.config_digest))

    loading = state.loading = asyncio.create_task(load())
    yield
    log.info("stopping the engine")
    loading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loading
    await state.engine.stop()
    supervisor.end_leftovers()


async def _stopping(app: web.Application) -> None:
    state = app[NODE]
    if not state.engine.ready:
        log.info("stopping: no new connections; the engine had not finished loading")
        if state.loading is not None:
            state.loading.cancel()  # at once: nothing of the start is said after this line
        return
    log.info(
        "stopping: no new connections; %d request(s) in flight get up to %.0f s to finish",
        state.admission.in_flight,
        state.config.shutdown_grace,
    )


async def _key_maintenance(app: web.Application) -> AsyncIterator[None]:
    """Rotate keys on schedule even when no request arrives."""
    state = app[NODE]
    period = max(0.05, min(5.0, state.config.keys.rotation_interval / 10, (state.config.keys.overlap or 5.0) / 10))

    async def loop() -> None:
        while True:
            await asyncio.sleep(period)
            state.keyring.maintain()

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _workers_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """A multi-VM head: the engine waits for its workers; the link goes down with the node."""
    state = app[NODE]
    admission: WorkerAdmission | None = state.workers
    if admission is None:
        yield
        return

    async def before_load() -> None:
        service = state.attestation
        service.measure(state.engine.weights_sha256())  # the models are prepared: the digest is known
        await admission.gate(await own_policy(service, state))
        state.engine.distributed_args = admission.engine_args()

    state.engine.before_load = before_load
    yield
    await admission.stop()


def server_settings(config: NodeConfig) -> dict[str, Any]:
    """Keyword arguments of aiohttp's server runner (`web.run_app`, `AppRunner`) for this config."""
    # aiohttp's own access log writes each client's address; the node's (the error middleware's)
    # writes none, so a request that came anonymously stays so in the logs.
    return {"keepalive_timeout": config.limits.header_timeout, "access_log": None}


def create_app(config: NodeConfig, engine: Engine | None = None) -> web.Application:
    engine = engine or build_engine(config)
    if config.tee_mode != "simulated" and not engine.tee_capable:
        raise ValueError(f"the {engine.name} engine cannot serve in TEE mode {config.tee_mode}")
    state = NodeState.build(config, engine)
    state.attestation = AttestationService(config)
    if config.tls_enabled:
        listen = [] if config.host in ("0.0.0.0", "::", "") else [config.host]
        state.tls = TlsIdentity.generate([*config.tls.names, *listen])
    if config.workers.count:
        state.workers = WorkerAdmission(config)
        state.attestation.workers = state.workers.workers
    app = web.Application(middlewares=[error_middleware], client_max_size=config.limits.max_body_bytes)
    app[NODE] = state
    app[OPENAPI] = openapi_document(config, PLAIN_ROUTES)
    for path, endpoint in CONFIDENTIAL_ROUTES.items():
        app.router.add_post(path, _confidential(endpoint))
    for path, endpoint in PLAIN_ROUTES.items():
        app.router.add_post(path, _plain(endpoint) if config.allow_plaintext else _plaintext_disabled)
    app.router.add_post("/v1/nodes/lock", nodes_lock)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/attestation", attestation_document)
    ohttp_keys = add_gateway(app, state.keyring)
    state.attestation.public_keys["ohttp"] = ohttp_keys.key_configs_b64  # bound in report_data v3
    if config.auth.privacy_pass.enabled:
        issuer = state.privacy_pass = PrivacyPass(config)
        # Every client sees the same token key: a key per user would link that user's tokens.
        state.attestation.public_keys["privacy_pass"] = lambda: b64e(issuer.token_key())
        app.router.add_get(DIRECTORY_PATH, token_keys)
        app.router.add_post(ISSUANCE_PATH, token_request)
    app.router.add_post("/v1/workers/challenge", workers_challenge)
    app.router.add_post("/v1/workers/join", workers_join)
    app.on_shutdown.append(_stopping)
    app.cleanup_ctx.append(_announce)
    app.cleanup_ctx.append(_workers_lifecycle)
    app.cleanup_ctx.append(_engine_lifecycle)
    app.cleanup_ctx.append(_key_maintenance)
    app.cleanup_ctx.append(collateral_lifecycle)
    if state.privacy_pass is not None:
        app.cleanup_ctx.append(lambda app: privacy_pass_lifecycle(app, state.privacy_pass))
    return app
