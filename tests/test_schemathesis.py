"""Schemathesis against the node's own /openapi.json, served by a real loopback node (echo).

Every operation, positive and negative generation: no 5xx, every status documented, every
response of the documented content type and schema. Bounded examples per operation in the
default suite, more with `pytest -m long`. Afterwards the node still serves a good request.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from reliability import ServerThread, node_config

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
# POST /v1/ohttp takes binary bodies: the fuzzer sends them as it sends application/octet-stream.
for _media in ("message/ohttp-req", "message/ohttp-chunked-req"):
    schemathesis.serializer.alias(_media, "application/octet-stream")


@pytest.fixture(scope="module")
def node():
    # A generous attestation rate: the fuzzer calls it many times (429 is documented anyway).
    config = node_config(limits={"attestation_per_minute": 100_000, "read_timeout": 5.0})
    with ServerThread(config) as server:
        yield server
        server.good_request()
        assert server.settled()


@pytest.fixture(scope="module")
def schema(node):
    return schemathesis.openapi.from_url(node.url + "/openapi.json")


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def run_operation(node: ServerThread, operation, mode, examples: int, checks=CHECKS, max_status: int = 500) -> int:
    calls = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        nonlocal calls
        response = case.call_and_validate(base_url=node.url, checks=checks, timeout=15)
        assert response.status_code != 500 and response.status_code < max_status, response.text[:300]
        calls += 1

    try:
        run()
    except Unsatisfiable:  # negative mode on an operation without inputs: nothing to break
        assert mode == schemathesis.GenerationMode.NEGATIVE
    return calls


def test_openapi_document_loads(schema):
    labels = {op.label for op in operations(schema)}
    assert "POST /v1/confidential/chat/completions" in labels
    assert "GET /v1/attestation" in labels


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_schemathesis(node, schema, mode):
    total = sum(run_operation(node, op, mode, examples=15) for op in operations(schema))
    assert total > 0
    node.good_request()


@pytest.mark.long
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_schemathesis_long(node, schema, mode):
    total = sum(run_operation(node, op, mode, examples=1000) for op in operations(schema))
    print(f"\nschemathesis {mode.value}: {total} calls")
    node.good_request()


def test_schemathesis_while_not_ready(node, schema):
    """With the engine down, every operation still answers documented statuses (503 included,
    which is by design here, so `not_a_server_error` is left out and only 500 is refused)."""

    async def set_ready(value: bool) -> None:
        node.engine._ready = value

    node.run(set_ready(False))
    try:
        for op in operations(schema):
            run_operation(node, op, schemathesis.GenerationMode.POSITIVE, 5, CHECKS[1:], max_status=600)
    finally:
        node.run(set_ready(True))
    node.good_request()
