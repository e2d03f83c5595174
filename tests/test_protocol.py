"""node.protocol's wire models against the Atoma API documents (the protocol's seeds).

The facts checked are written here, taken from the seeds once: the OpenAPI excerpt's schemas
(seed 004: types, formats, `minimum`, required and nullable properties), the markdown field
tables of seeds 000 (response) and 002 (request), and seed 003's example response. Every
schema property is checked by behaviour: the model must accept a valid value, refuse the wrong
type, honour required/optional, null, `minimum: 0` and the int32/int64 range.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from node import protocol
from node.protocol import (
    ConfidentialComputeRequest,
    ConfidentialComputeResponse,
    NodesCreateLockRequest,
    NodesCreateLockResponse,
    Usage,
)

# Additions of this node (docs/protocol.md) that the seeds do not have.
ADDITIONS = {"ConfidentialComputeResponse": {"receipt"}, "ConfidentialComputeRequest": {"kem_ciphertext"}}

_COUNT32 = {"type": "integer", "format": "int32", "minimum": 0}
_TEXT = {"type": "string"}

# Seed 004 (the OpenAPI excerpt), components.schemas without descriptions and examples.
SCHEMAS: dict[str, dict[str, Any]] = {
    "ConfidentialComputeRequest": {
        "required": ["ciphertext", "stack_small_id", "nonce", "salt", "client_dh_public_key",
                     "node_dh_public_key", "plaintext_body_hash", "model_name"],
        "properties": {
            "ciphertext": _TEXT,
            "client_dh_public_key": _TEXT,
            "model_name": _TEXT,
            "node_dh_public_key": _TEXT,
            "nonce": _TEXT,
            "num_compute_units": {"type": ["integer", "null"], "format": "int64", "minimum": 0},
            "plaintext_body_hash": _TEXT,
            "salt": _TEXT,
            "stack_small_id": {"type": "integer", "format": "int64", "minimum": 0},
            "stream": {"type": ["boolean", "null"]},
        },
    },
    "ConfidentialComputeResponse": {
        "required": ["ciphertext", "nonce"],
        "properties": {
            "ciphertext": _TEXT,
            "nonce": _TEXT,
            "response_hash": {"type": ["string", "null"]},
            "signature": {"type": ["string", "null"]},
            "usage": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Usage"}]},
        },
    },
    "Usage": {
        "required": ["prompt_tokens", "completion_tokens", "total_tokens", "completion_tokens_details",
                     "prompt_tokens_details"],
        "properties": {
            "completion_tokens": _COUNT32,
            "completion_tokens_details": {"$ref": "#/components/schemas/CompletionTokensDetails"},
            "prompt_tokens": _COUNT32,
            "prompt_tokens_details": {"$ref": "#/components/schemas/PromptTokensDetails"},
            "total_tokens": _COUNT32,
        },
    },
    "CompletionTokensDetails": {
        "required": ["accepted_prediction_tokens", "audio_tokens", "reasoning_tokens", "rejected_prediction_tokens"],
        "properties": {
            "accepted_prediction_tokens": _COUNT32,
            "audio_tokens": _COUNT32,
            "reasoning_tokens": _COUNT32,
            "rejected_prediction_tokens": _COUNT32,
        },
    },
    "PromptTokensDetails": {
        "required": ["audio_tokens", "cached_tokens"],
        "properties": {"audio_tokens": _COUNT32, "cached_tokens": _COUNT32},
    },
}
MODELS: dict[str, type[BaseModel]] = {name: getattr(protocol, name) for name in SCHEMAS}

# The markdown field tables (camelCase names in snake_case): name -> required.
RESPONSE_TABLE = {"ciphertext": True, "nonce": True, "response_hash": False, "signature": False, "usage": False}  # seed 000
REQUEST_TABLE = {  # seed 002
    "ciphertext": True, "client_dh_public_key": True, "model_name": True, "node_dh_public_key": True, "nonce": True,
    "num_compute_units": False, "plaintext_body_hash": True, "salt": True, "stack_small_id": True, "stream": False,
}

# Seed 003's example response body, exactly.
EXAMPLE_RESPONSE = """{
  "ciphertext": "<string>",
  "nonce": "<string>",
  "response_hash": "<string>",
  "signature": "<string>",
  "usage": {
    "completion_tokens": 10,
    "completion_tokens_details": {
      "accepted_prediction_tokens": 10,
      "audio_tokens": 0,
      "reasoning_tokens": 10,
      "rejected_prediction_tokens": 0
    },
    "prompt_tokens": 10,
    "prompt_tokens_details": {
      "audio_tokens": 0,
      "cached_tokens": 10
    },
    "total_tokens": 20
  }
}"""


def _ref(schema: dict) -> str | None:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    for alt in schema.get("oneOf", []):
        if "$ref" in alt:
            return alt["$ref"].rsplit("/", 1)[1]
    return None


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    types = set(t) if isinstance(t, list) else {t} if t else set()
    for alt in schema.get("oneOf", []):
        types |= _types(alt)
    return types


def valid_instance(name: str) -> dict[str, Any]:
    """A valid JSON object for the schema: every property set to a plain valid value."""
    schema, out = SCHEMAS[name], {}
    for prop, spec in schema["properties"].items():
        ref = _ref(spec)
        types = _types(spec) - {"null"}
        if ref:
            out[prop] = valid_instance(ref)
        elif "integer" in types:
            out[prop] = 10
        elif "boolean" in types:
            out[prop] = True
        else:
            out[prop] = "x"
    return out


def _accepts(model: type[BaseModel], data: dict) -> bool:
    try:
        model.model_validate(data)
    except ValidationError:
        return False
    return True


CASES = [(name, prop) for name, schema in SCHEMAS.items() for prop in schema["properties"]]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_field_names_and_required(name):
    model, schema = MODELS[name], SCHEMAS[name]
    assert set(model.model_fields) == set(schema["properties"]) | ADDITIONS.get(name, set())
    required = {n for n, f in model.model_fields.items() if f.is_required()}
    assert required == set(schema.get("required", []))
    assert _accepts(model, valid_instance(name))


@pytest.mark.parametrize(("name", "prop"), CASES, ids=[f"{n}.{p}" for n, p in CASES])
def test_property_behaviour(name, prop):
    model, spec = MODELS[name], SCHEMAS[name]["properties"][prop]
    required = prop in SCHEMAS[name].get("required", [])
    base = valid_instance(name)

    def with_value(value):
        data = copy.deepcopy(base)
        data[prop] = value
        return _accepts(model, data)

    absent = {k: v for k, v in base.items() if k != prop}
    assert _accepts(model, absent) is (not required)
    nullable = "null" in _types(spec)
    assert with_value(None) is nullable
    types = _types(spec) - {"null"}
    if _ref(spec):
        assert not with_value("x") and not with_value(5)
    elif "integer" in types:
        assert with_value(0)
        assert not with_value("5") and not with_value(True) and not with_value(1.5)
        if spec.get("minimum") == 0:
            assert not with_value(-1)
        top = 2**31 - 1 if spec.get("format") == "int32" else 2**63 - 1
        assert with_value(top) and not with_value(top + 1)
    elif "boolean" in types:
        assert with_value(False) and not with_value("true") and not with_value(1)
    else:
        assert "string" in types
        assert with_value("") and not with_value(5) and not with_value(["x"])


def test_extra_fields_ignored():
    data = dict(valid_instance("ConfidentialComputeRequest"), unknown={"a": 1})
    assert "unknown" not in ConfidentialComputeRequest.model_validate(data).model_dump()


@pytest.mark.parametrize(("table", "model"), [(RESPONSE_TABLE, ConfidentialComputeResponse), (REQUEST_TABLE, ConfidentialComputeRequest)])
def test_markdown_seed_tables(table, model):
    assert set(model.model_fields) == set(table) | ADDITIONS.get(model.__name__, set())
    for name, required in table.items():
        assert model.model_fields[name].is_required() is required, name


def test_seed_example_response_parses():
    response = ConfidentialComputeResponse.model_validate_json(EXAMPLE_RESPONSE)
    assert response.usage.total_tokens == 20
    assert response.usage.completion_tokens_details.reasoning_tokens == 10
    assert response.receipt is None


def test_usage_from_openai_minimal():
    usage = Usage.from_openai({"prompt_tokens": 3, "completion_tokens": 4})
    assert usage.model_dump() == {
        "completion_tokens": 4,
        "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0, "reasoning_tokens": 0,
                                      "rejected_prediction_tokens": 0},
        "prompt_tokens": 3,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
        "total_tokens": 7,
    }


def test_usage_from_openai_details_and_nulls():
    # vLLM sends null for absent details; explicit totals are kept.
    usage = Usage.from_openai({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                               "prompt_tokens_details": None, "completion_tokens_details": None})
    assert usage.prompt_tokens_details.cached_tokens == 0 and usage.total_tokens == 7
    usage = Usage.from_openai({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 9,
                               "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": None},
                               "completion_tokens_details": {"reasoning_tokens": 1}})
    assert (usage.total_tokens, usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens_details.audio_tokens,
            usage.completion_tokens_details.reasoning_tokens) == (9, 4, 0, 1)
    # The result always matches the seeds' Usage schema (every detail field present).
    assert Usage.model_validate(usage.model_dump()) == usage
    assert set(usage.model_dump()) == set(SCHEMAS["Usage"]["properties"])
    assert Usage.from_openai({}).total_tokens == 0


def test_usage_from_openai_refuses_negative():
    with pytest.raises(ValidationError):
        Usage.from_openai({"prompt_tokens": -1, "completion_tokens": 0})


def test_lock_models():
    assert NodesCreateLockRequest.model_validate({"model": "m"}).max_num_tokens is None
    with pytest.raises(ValidationError):
        NodesCreateLockRequest.model_validate({"model": "m", "max_num_tokens": -1})
    lock = NodesCreateLockResponse(public_key="k", node_small_id=1, stack_small_id=2)
    assert lock.model_dump() == {
        "public_key": "k", "node_small_id": 1, "stack_entry_digest": None, "stack_small_id": 2, "kem_public_key": None,
    }  # fmt: skip
