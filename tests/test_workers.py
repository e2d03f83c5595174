"""Worker VMs in the attestation document: each worker's evidence binds its link key through the
join challenge, is verified offline with the head's, and is appraised under the same policy."""

from __future__ import annotations

import base64
import hashlib
import json
import tomllib

import pytest

from attestation.appraisal import Policy, policy_from_claims
from attestation.document import build_document, verify_document, verify_evidence
from attestation.errors import DocumentInvalid, NonceMismatch, PolicyRefused, ReportDataMismatch
from attestation.producers.simulated import SimulatedProvider
from attestation.workers import WorkerEntry, link_nonce
from node.link import LinkKeys, peer_address

SEED = b"workers-test-seed-0123456789abcd"
NONCE = bytes(range(32))
KEM = bytes(range(256)) * 4 + bytes(160)
MEASURED = {"tee_mode": "simulated", "engine": {"kind": "vllm", "models": [{"name": "m"}]}, "workers": {"count": 1}}
SIMULATED = Policy(allow_simulated=True)


def document(measurement: bytes, nonce: bytes, measured=MEASURED, **extra):
    return build_document(
        SimulatedProvider(measurement, seed=SEED),
        None,
        nonce=nonce,
        dh_public_key=b"\xd1" * 32,
        signing_public_key=b"\x5e" * 32,
        key_epoch=1,
        measured_config=measured,
        kem_public_key=KEM,
        **extra,
    )


def worker_entry(measurement: bytes = b"same code", *, link: bytes | None = None, challenge: bytes = b"\x07" * 32, measured=MEASURED) -> dict:
    link = link or LinkKeys.generate().public_key
    evidence = document(measurement, link_nonce(challenge, link), measured)
    return WorkerEntry("pipeline-stage-1", link, challenge, evidence).to_json()


def test_link_nonce_follows_its_definition():
    challenge, link = b"\x01" * 32, b"\x02" * 32
    expected = hashlib.sha256(b"tee-node/worker-link/v1\x00" + challenge + link).digest()
    assert link_nonce(challenge, link) == expected
    assert link_nonce(challenge, b"\x03" * 32) != expected
    with pytest.raises(ValueError):
        link_nonce(b"short", link)


def test_link_keys_are_wireguard_keys_and_addresses_follow_the_head():
    keys = LinkKeys.generate()
    assert len(keys.private_key) == len(keys.public_key) == 32 and keys.private_key not in repr(keys).encode()
    assert peer_address("10.99.0.1/24", 0) == "10.99.0.1/24"
    assert peer_address("10.99.0.1/24", 2) == "10.99.0.3/24"


def test_a_head_lists_its_worker_and_the_client_verifies_both_offline():
    entry = worker_entry()
    head = document(b"same code", NONCE, workers=[entry])
    verified = verify_document(head, expected_nonce=NONCE, policy=SIMULATED)
    assert verified.workers == [entry]
    (worker,) = verified.worker_attestations
    assert worker.measurement == verified.measurement and worker.config_digest == verified.config_digest
    # The entry is bound through the head's report_data: swapping the link key breaks it.
    swapped = {**entry, "link_public_key": base64.b64encode(LinkKeys.generate().public_key).decode()}
    with pytest.raises(ReportDataMismatch):
        verify_document({**head, "workers": [swapped]}, expected_nonce=NONCE, policy=SIMULATED)


def test_a_worker_whose_evidence_does_not_bind_its_link_key_is_refused():
    other_link = LinkKeys.generate().public_key
    entry = worker_entry()
    entry["link_public_key"] = base64.b64encode(other_link).decode()  # evidence made for another key
    head = document(b"same code", NONCE, workers=[entry])
    with pytest.raises(NonceMismatch, match="pipeline-stage-1.*link key"):
        verify_document(head, expected_nonce=NONCE, policy=SIMULATED)


def test_one_failing_worker_refuses_the_whole_node_and_is_named():
    head_measured = MEASURED
    other = {**MEASURED, "engine": {"kind": "vllm", "models": [{"name": "other"}]}}
    head = document(b"same code", NONCE, workers=[worker_entry(b"other code", measured=other)])
    own = verify_evidence(document(b"same code", NONCE, head_measured), expected_nonce=NONCE).claims
    # The head's own registers and config digest, as a client (or the head's default worker policy) pins them.
    pinned = Policy.from_mapping(tomllib.loads(policy_from_claims(own)))
    assert verify_document(document(b"same code", NONCE, workers=[worker_entry()]), expected_nonce=NONCE, policy=pinned)
    with pytest.raises(PolicyRefused) as refused:
        verify_document(head, expected_nonce=NONCE, policy=pinned)
    errors = refused.value.errors
    assert any(e.startswith("worker pipeline-stage-1: mr_td differs") for e in errors), errors
    assert any(e.startswith("worker pipeline-stage-1: config_digest differs") for e in errors), errors
    assert not any(not e.startswith("worker ") for e in errors), errors  # the head itself passes


def test_a_worker_evidence_listing_workers_is_refused():
    nested_link = LinkKeys.generate().public_key
    challenge = b"\x09" * 32
    nested = document(b"same code", link_nonce(challenge, nested_link), workers=[worker_entry()])
    entry = WorkerEntry("pipeline-stage-1", nested_link, challenge, nested).to_json()
    with pytest.raises(DocumentInvalid, match="workers of its own"):
        verify_document(document(b"same code", NONCE, workers=[entry]), expected_nonce=NONCE, policy=SIMULATED)


def test_worker_entries_are_parsed_strictly():
    good = worker_entry()
    for broken in (
        {**good, "challenge": "zz"},
        {**good, "link_public_key": "AA=="},
        {**good, "evidence": "a string"},
        {k: v for k, v in good.items() if k != "role"},
    ):
        with pytest.raises(DocumentInvalid):
            WorkerEntry.from_json(json.loads(json.dumps(broken)))


def test_a_head_documents_its_worker_routes_and_their_refusal():
    from node.config import load_config
    from node.server.openapi import openapi_document

    single = openapi_document(load_config(None))
    assert "/v1/workers/join" not in single["paths"]
    assert "403" not in single["paths"]["/v1/confidential/chat/completions"]["post"]["responses"]
    head = load_config(None, engine={"models": [{"name": "m", "source": "embedded:smollm2"}]}, workers={"count": 1})
    join = openapi_document(head)["paths"]["/v1/workers/join"]["post"]["responses"]
    assert join["403"]["description"].startswith("WORKER_REFUSED: ") and "503" in join
    # Only the head's measured config says how many VMs hold the model.
    assert head.measured_config({})["workers"] == {"count": 1} and "workers" not in load_config(None).measured_config({})


# --- the head's join routes, in-process (admission itself runs in the multivm test: it needs root) ---


async def test_a_single_vm_node_refuses_workers(make_node):
    node = await make_node()
    response = await node.client.post("/v1/workers/challenge")
    body = await response.json()
    assert response.status == 403 and body["error"]["code"] == "WORKER_REFUSED"
    assert body["error"]["failed_claims"] == ["this node takes no workers (workers.count = 0)"]


async def test_a_head_refuses_malformed_joins_and_asks_workers_to_wait_until_it_is_prepared(aiohttp_client):
    from node.config import load_config
    from node.server import create_app
    from server_support import NodeTestServer, echo_engine

    config = load_config(None, engine={"models": [{"name": "m", "source": "embedded:smollm2"}]}, workers={"count": 1})
    client = await aiohttp_client(NodeTestServer(create_app(config, echo_engine())))
    challenge = (await (await client.post("/v1/workers/challenge")).json())["challenge"]
    good = {**worker_entry(challenge=bytes.fromhex(challenge)), "link_port": 51820}
    for broken, field in (
        ({**good, "link_port": "51820"}, "link_port"),
        ({**good, "link_public_key": "not base64"}, "link_public_key"),
        ({k: v for k, v in good.items() if k != "evidence"}, "evidence"),
    ):
        response = await client.post("/v1/workers/join", json=broken)
        body = await response.json()
        assert response.status == 400 and body["error"]["code"] == "INVALID_BODY", (field, body)
    response = await client.post("/v1/workers/join", data=b"{not json")
    assert response.status == 400
    # The head measures its own models before it can compare a worker with itself.
    response = await client.post("/v1/workers/join", json=good)
    assert response.status == 503 and (await response.json())["error"]["code"] == "NOT_READY"


def test_the_worker_policy_is_the_configured_file_else_the_heads_own(tmp_path):
    from node.config import load_config
    from node.server.workers import WorkerAdmission

    models = {"models": [{"name": "m", "source": "embedded:smollm2"}]}
    own = Policy(allow_simulated=True, config_digest=frozenset({"ab" * 32}))
    assert WorkerAdmission(load_config(None, engine=models, workers={"count": 1})).worker_policy(own) is own
    policy_file = tmp_path / "workers.toml"
    policy_file.write_text('allow_simulated = true\nconfig_digest = ["' + "cd" * 32 + '"]\n')
    configured = WorkerAdmission(load_config(None, engine=models, workers={"count": 1, "policy": str(policy_file)}))
    assert configured.worker_policy(own).config_digest == frozenset({"cd" * 32})
    policy_file.write_text("allow_simulatd = true\n")
    with pytest.raises(ValueError, match="allow_simulatd"):  # `tee-node serve` says so and does not start
        WorkerAdmission(load_config(None, engine=models, workers={"count": 1, "policy": str(policy_file)}))
    with pytest.raises(ValueError, match="cannot be read"):
        WorkerAdmission(load_config(None, engine=models, workers={"count": 1, "policy": str(tmp_path / "missing.toml")}))


def test_the_heads_last_handshake_is_read_from_wg():
    from node.link import handshake_time

    head, other = b"\x01" * 32, b"\x02" * 32
    output = f"{base64.b64encode(other).decode()}\t1733300000\n{base64.b64encode(head).decode()}\t0\n"
    assert handshake_time(output, other) == 1733300000.0
    assert handshake_time(output, head) is None  # listed, but no handshake yet
    assert handshake_time("", head) is None


def test_vllm_talks_between_vms_over_the_link_only():
    from node.link import WireGuardLink, vllm_environment

    link = WireGuardLink("tee-link0", LinkKeys.generate(), "10.99.0.2/24", 51820)
    assert vllm_environment(link) == {
        "VLLM_HOST_IP": "10.99.0.2",
        "GLOO_SOCKET_IFNAME": "tee-link0",
        "NCCL_SOCKET_IFNAME": "tee-link0",
        "NCCL_IB_DISABLE": "1",  # verbs bypass the IP stack, so the link
    }
