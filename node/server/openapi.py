"""GET /openapi.json, generated from the wire models so the document cannot drift from the code."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from .. import __version__
from ..config import NodeConfig
from ..protocol import (
    ConfidentialComputeRequest,
    ConfidentialComputeResponse,
    ConfidentialComputeStreamResponse,
    ErrorBody,
    NodesCreateLockRequest,
    NodesCreateLockResponse,
)

REF = "#/components/schemas/{model}"
ERROR_STATUSES = {
    "400": "INVALID_BODY, DECRYPTION_FAILED or HASH_MISMATCH",
    "401": "UNAUTHORIZED or INVALID_SIGNATURE",
    "404": "MODEL_NOT_FOUND",
    "409": "REPLAYED_REQUEST",
    "413": "BODY_TOO_LARGE",
    "422": "STALE_NODE_KEY (the body carries the current X25519 and ML-KEM-768 keys)",
    "429": "OVERLOADED (with Retry-After)",
    "503": "NOT_READY",
    "500": "INTERNAL_ERROR",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _errors() -> dict[str, Any]:
    return {
        status: {"description": text, "content": {"application/json": {"schema": _ref("ErrorBody")}}}
        for status, text in ERROR_STATUSES.items()
    }


def _confidential_operation(summary: str, streamable: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _ref("ConfidentialComputeResponse")}}
    if streamable:
        content["text/event-stream"] = {"schema": _ref("ConfidentialComputeStreamResponse")}
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("ConfidentialComputeRequest")}},
            },
            "responses": {"200": {"description": summary, "content": content}, **_errors()},
            "security": [{"bearerAuth": []}],
        }
    }


def _get(summary: str, content_type: str = "application/json", errors: tuple[str, ...] = ()) -> dict[str, Any]:
    responses = {"200": {"description": summary, "content": {content_type: {}}}}
    responses.update({status: _errors()[status] for status in errors})
    return {"get": {"summary": summary, "responses": responses}}


def openapi_document(config: NodeConfig) -> dict[str, Any]:
    _, schemas = models_json_schema(
        [
            (ConfidentialComputeRequest, "validation"),
            (ConfidentialComputeResponse, "serialization"),
            (ConfidentialComputeStreamResponse, "serialization"),
            (ErrorBody, "serialization"),
            (NodesCreateLockRequest, "validation"),
            (NodesCreateLockResponse, "serialization"),
        ],
        ref_template=REF,
    )
    paths: dict[str, Any] = {
        "/v1/confidential/chat/completions": _confidential_operation("Confidential chat completions", True),
        "/v1/confidential/completions": _confidential_operation("Confidential completions", True),
        "/v1/confidential/embeddings": _confidential_operation("Confidential embeddings", False),
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
                "security": [{"bearerAuth": []}],
            }
        },
        "/v1/models": _get("Models served"),
        "/health": _get("Liveness"),
        "/ready": _get("Readiness: 200 once the engine can serve, else 503", errors=("503",)),
        "/metrics": _get("Prometheus metrics", "text/plain"),
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
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "tee-node", "version": __version__, "description": f"TEE mode: {config.tee_mode}"},
        "paths": paths,
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
