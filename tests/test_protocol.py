"""node.protocol's wire models against the seeds (the Atoma API documents in /work/shared/seeds).

The OpenAPI excerpt (seed 004) is parsed and every schema property is checked by behaviour:
the model must accept a valid value, refuse the wrong type, honour required/optional,
null, `minimum: 0` and the int32/int64 range. The markdown seeds' field tables are checked too.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from node import protocol
from node.protocol import (
    ConfidentialComputeRequest,
    ConfidentialComputeResponse,
    NodesCreateLockRequest,
    NodesCreateLockResponse,
    Usage,
)

SEEDS = Path("/work/shared/seeds")
if not SEEDS.exists():  # the seeds also travel with the repo's docs in some checkouts
    SEEDS = Path(__file__).resolve().parent.parent / "docs" / "seeds"
pytestmark = pytest.mark.skipif(not SEEDS.exists(), reason="seeds not available")

# Additions of this node (PROTOCOL.md parts B and C) that the seeds do not have.
ADDITIONS = {"ConfidentialComputeResponse": {"receipt"}, "ConfidentialComputeRequest": {"kem_ciphertext"}}


def _seed(prefix: str) -> str:
    return next(SEEDS.glob(f"{prefix}_*.txt")).read_text()


def openapi_schemas() -> dict[str, Any]:
    text = _seed("004")
    block = re.search(r"````yaml[^\n]*\n(.*?)````", text, re.S).group(1)
    return yaml.safe_load(block)["components"]["schemas"]


SCHEMAS = openapi_schemas() if SEEDS.exists() else {}
MODELS: dict[str, type[BaseModel]] = {name: getattr(protocol, name) for name in SCHEMAS}


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


def _markdown_fields(prefix: str) -> dict[str, bool]:
    """`name -> required` from a seed's markdown field table (camelCase turned to snake_case)."""
    out = {}
    for line in _seed(prefix).splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|[^|]*\|\s*(:heavy_check_mark:|:heavy_minus_sign:)", line)
        if m:
            out[re.sub(r"(?<!^)([A-Z])", r"_\1", m.group(1)).lower()] = m.group(2) == ":heavy_check_mark:"
    return out


@pytest.mark.parametrize(("prefix", "model"), [("000", ConfidentialComputeResponse), ("002", ConfidentialComputeRequest)])
def test_markdown_seed_tables(prefix, model):
    fields = _markdown_fields(prefix)
    assert fields, "no field table found"
    for name, required in fields.items():
        assert model.model_fields[name].is_required() is required, name


def test_seed_example_response_parses():
    text = _seed("003")
    example = re.search(r"\n\{\n.*?\n\}\n", text, re.S).group(0)

    response = ConfidentialComputeResponse.model_validate_json(example)
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
