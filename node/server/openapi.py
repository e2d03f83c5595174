"""GET /openapi.json, generated from the wire models so the document cannot drift from the code."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic.json_schema import models_json_schema

from .. import __version__
from ..config import NodeConfig
from ..protocol import (
    ConfidentialComputeRequest,
    ConfidentialComputeResponse,
    ConfidentialComputeStreamResponse,
    ErrorBody,
    ImageGenerationRequest,
    NodesCreateLockRequest,
    NodesCreateLockResponse,
)
from ..privacypass import DIRECTORY_MEDIA_TYPE, REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE
from ..wire import ERROR_TABLE, ERRORS, ErrorKind

REF = "#/components/schemas/{model}"
BEARER = [{"bearerAuth": []}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


# Codes only the routes that name them answer (a worker VM's join), not every operation.
NAMED_ONLY = frozenset({"WORKER_REFUSED"})


def _errors(codes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The error table's responses (every error an operation can answer, or those of `codes`),
    one per status, its description naming each code and when it is answered."""
    by_status: dict[int, list[ErrorKind]] = {}
    for kind in ERROR_TABLE:
        if codes is None and (kind.routing or kind.gateway or kind.code in NAMED_ONLY) or codes is not None and kind.code not in codes:
            continue
        by_status.setdefault(kind.status, []).append(kind)
    responses: dict[str, Any] = {}
    for status, kinds in sorted(by_status.items()):
        content: dict[str, Any] = {}
        if any(kind.problem_type is None for kind in kinds):
            content["application/json"] = {"schema": _ref("ErrorBody")}
        if any(kind.problem_type is not None for kind in kinds):
            content["application/problem+json"] = {"schema": {"type": "object", "required": ["type", "title", "status"]}}
        response: dict[str, Any] = {
            "description": "; ".join(f"{kind.code}: {kind.when}" for kind in kinds),
            "content": content,
        }
        if any(kind.retry_after for kind in kinds):
            response["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
        responses[str(status)] = response
    return responses


def _confidential_operation(summary: str, streamable: bool, description: str | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _ref("ConfidentialComputeResponse")}}
    if streamable:
        content["text/event-stream"] = {"schema": _ref("ConfidentialComputeStreamResponse")}
    return {
        "post": {
            "summary": summary,
            **({"description": description} if description else {}),
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("ConfidentialComputeRequest")}},
            },
            "responses": {"200": {"description": summary, "content": content}, **_errors()},
            "security": BEARER,
        }
    }


def _get(summary: str, content_type: str = "application/json", errors: tuple[str, ...] = (), token: bool = False) -> dict[str, Any]:
    """A GET operation; with `token`, one that needs a bearer token when tokens are configured."""
    if token:
        errors += ("UNAUTHORIZED",)
    responses = {"200": {"description": summary, "content": {content_type: {}}}, **_errors(errors)}
    return {"get": {"summary": summary, "responses": responses, **({"security": BEARER} if token else {})}}


def _plaintext_disabled_operation() -> dict[str, Any]:
    kind = ERRORS["PLAINTEXT_DISABLED"]
    return {
        "post": {
            "summary": "Plain OpenAI route: off on this node (allow_plaintext = false)",
            "responses": {
                str(kind.status): {
                    "description": f"{kind.code}: {kind.when}",
                    "content": {"application/json": {"schema": _ref("ErrorBody")}},
                }
            },
        }
    }


def _privacy_pass_paths() -> dict[str, Any]:
    """Issuance (docs/privacy-pass.md); redemption is the PrivateToken scheme on the bearer routes."""
    issuance_errors = ("UNAUTHORIZED", "INVALID_TOKEN_REQUEST", "TOKEN_BATCH_TOO_LARGE", "TOKEN_QUOTA_EXCEEDED", "BODY_TOO_LARGE")
    return {
        "/v1/privacy-pass/token-keys": _get("Privacy Pass issuer directory (RFC 9578): the token keys", DIRECTORY_MEDIA_TYPE),
        "/v1/privacy-pass/token-request": {
            "post": {
                "summary": "Privacy Pass token issuance to an account (RFC 9578 section 5, or a batch)",
                "requestBody": {"required": True, "content": {REQUEST_MEDIA_TYPE: {}}},
                "responses": {
                    "200": {"description": "TokenResponse", "content": {RESPONSE_MEDIA_TYPE: {}}},
                    **_errors(issuance_errors),
                },
                "security": BEARER,
            }
        },
    }


def openapi_document(config: NodeConfig, plain_paths: Iterable[str] = ()) -> dict[str, Any]:
    """The node's OpenAPI 3.1 document; `plain_paths` are documented as refused when they are off."""
    _, schemas = models_json_schema(
        [
            (ConfidentialComputeRequest, "validation"),
            (ConfidentialComputeResponse, "serialization"),
            (ConfidentialComputeStreamResponse, "serialization"),
            (ErrorBody, "serialization"),
            (ImageGenerationRequest, "validation"),
            (NodesCreateLockRequest, "validation"),
            (NodesCreateLockResponse, "serialization"),
        ],
        ref_template=REF,
    )
    paths: dict[str, Any] = {
        "/v1/confidential/chat/completions": _confidential_operation("Confidential chat completions", True),
        "/v1/confidential/completions": _confidential_operation("Confidential completions", True),
        "/v1/confidential/embeddings": _confidential_operation("Confidential embeddings", False),
        "/v1/confidential/images/generations": _confidential_operation(
            "Confidential image generations",
            False,
            "The plaintext is an ImageGenerationRequest; the sealed answer an OpenAI images response (`created`, "
            "`data`), each image a PNG: `url` a data:image/png;base64 URL (the default) or `b64_json`. "
            "num_compute_units, when given, must be width x height x n; usage counts those pixels.",
        ),
        "/v1/nodes/lock": {
            "post": {
                "summary": "The node's current X25519 public key",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NodesCreateLockRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "Lock",
                        "content": {"application/json": {"schema": _ref("NodesCreateLockResponse")}},
                    },
                    **_errors(),
                },
                "security": BEARER,
            }
        },
        "/v1/models": _get("Models served", token=True),
        "/health": _get("Liveness"),
        "/ready": _get("Readiness: 200 once the engine can serve, else 503", errors=("NOT_READY",)),
        "/metrics": _get("Prometheus metrics", "text/plain", token=not config.auth.metrics_public),
        "/v1/attestation": {
            "get": {
                "summary": "TEE evidence bound to the node's keys, measured config and the caller's nonce (503 NOT_READY until the models are loaded)",
                "parameters": [
                    {
                        "name": "nonce",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                    }
                ],
                "responses": {"200": {"description": "Attestation document", "content": {"application/json": {}}}, **_errors()},
            }
        },
        "/v1/ohttp/keys": _get("Oblivious HTTP key configurations (RFC 9458), as the attestation binds them", "application/ohttp-keys"),
        "/v1/ohttp": {
            "post": {
                "summary": "Oblivious HTTP gateway: an encapsulated Binary HTTP request for any route of the node",
                "requestBody": {
                    "required": True,
                    "content": {
                        media: {"schema": {"type": "string", "format": "binary"}}
                        for media in ("message/ohttp-req", "message/ohttp-chunked-req")
                    },
                },
                "responses": {
                    "200": {
                        "description": "The encapsulated answer (chunked for a chunked request)",
                        "content": {media: {} for media in ("message/ohttp-res", "message/ohttp-chunked-res")},
                    },
                    **_errors(("INVALID_BODY", "BODY_TOO_LARGE", *(kind.code for kind in ERROR_TABLE if kind.gateway))),
                },
            }
        },
    }
    if config.workers.count:
        worker_errors = ("INVALID_BODY", "BODY_TOO_LARGE", "WORKER_REFUSED", "NOT_READY")
        paths["/v1/workers/challenge"] = {
            "post": {
                "summary": "A worker VM's join challenge (hex, 32 bytes), valid once for workers.challenge_ttl",
                "responses": {"200": {"description": "Challenge", "content": {"application/json": {}}}, **_errors(("WORKER_REFUSED",))},
            }
        }
        paths["/v1/workers/join"] = {
            "post": {
                "summary": "A worker VM joins: its evidence, bound to its WireGuard key, is appraised with the worker policy",
                "requestBody": {"required": True, "content": {"application/json": {}}},
                "responses": {"200": {"description": "Admitted: rank and link", "content": {"application/json": {}}}, **_errors(worker_errors)},
            }
        }
    if not config.allow_plaintext:
        paths.update({path: _plaintext_disabled_operation() for path in plain_paths})
    if config.auth.privacy_pass.enabled:
        paths.update(_privacy_pass_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "tee-node", "version": __version__, "description": f"TEE mode: {config.tee_mode}"},
        "paths": paths,
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
