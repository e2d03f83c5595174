"""The measured config (docs/protocol.md): same digest across hosts, no secret, weights named,
fixed once the engine is ready; and the simulated DEBUG attribute refused end to end."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from server_support import MODEL, TEE_NODE, GatedEcho, http_get, spawn_node, wait_for

from attestation.appraisal import Policy
from attestation.document import verify_document
from attestation.errors import PolicyRefused
from node.client import Client

NONCE = bytes(range(32))
SIMULATED = Policy(allow_simulated=True)


def fetch(url: str) -> dict:
    status, body = http_get(f"{url}/v1/attestation?nonce={NONCE.hex()}")
    assert status == 200, body
    return json.loads(body)


def test_two_hosts_with_different_secrets_report_the_same_config_digest(tmp_path):
    token_a, token_b = "token-of-host-a-0123456789", "token-of-host-b-9876543210"
    digest_a, digest_b = (hashlib.sha256(t.encode()).hexdigest() for t in (token_a, token_b))
    seed_b = "5e" * 32
    a = spawn_node(env={
        "TEE_NODE_ATTESTATION__STATE_DIR": str(tmp_path / "state-a"),
        "TEE_NODE_AUTH__API_TOKEN_SHA256": json.dumps([digest_a]),
        "TEE_NODE_LOG_LEVEL": "DEBUG",
    })
    try:
        b = spawn_node(env={
            "TEE_NODE_ATTESTATION__STATE_DIR": str(tmp_path / "state-b"),
            "TEE_NODE_ATTESTATION__SIMULATED_SEED": seed_b,
            "TEE_NODE_AUTH__API_TOKEN_SHA256": json.dumps([digest_b]),
            "TEE_NODE_CACHE_DIR": str(tmp_path / "cache-b"),
        })
        try:
            assert a.port != b.port
            doc_a, doc_b = fetch(a.url), fetch(b.url)
        finally:
            b.stop()
    finally:
        a.stop()
    assert doc_a["config_digest"] == doc_b["config_digest"]
    assert doc_a["measured_config"] == doc_b["measured_config"]
    assert doc_a["measured_config"]["tokens_required"] is True
    measured = json.dumps(doc_a["measured_config"])
    for secret_or_local in (digest_a, digest_b, token_a, seed_b, str(tmp_path), str(a.port), "DEBUG", "127.0.0.1"):
        assert secret_or_local not in measured
    verified_a = verify_document(doc_a, expected_nonce=NONCE, policy=SIMULATED)
    verified_b = verify_document(doc_b, expected_nonce=NONCE, policy=SIMULATED)
    # Different simulated roots (state dir vs seed), the same code-and-config measurement: pinnable.
    assert verified_a.measurement == verified_b.measurement
    assert doc_a["cpu_evidence"]["quote"] != doc_b["cpu_evidence"]["quote"]


class WeightedEcho(GatedEcho):
    """Echo that reports a weight-manifest digest, as the vLLM engine does once its models are loaded."""

    def weights_sha256(self) -> dict[str, str]:
        return {MODEL: "cd" * 32}


async def test_attestation_waits_for_the_engine_and_names_the_weights(make_node):
    engine = WeightedEcho()
    engine.start_gate.clear()
    node = await make_node(engine=engine, wait_ready=False)
    response = await node.client.get(f"/v1/attestation?nonce={NONCE.hex()}")
    assert response.status == 503 and (await response.json())["error"]["code"] == "NOT_READY"
    engine.start_gate.set()
    await wait_for(lambda: engine.ready, what="engine ready")
    response = await node.client.get(f"/v1/attestation?nonce={NONCE.hex()}")
    assert response.status == 200
    doc = await response.json()
    (model,) = doc["measured_config"]["engine"]["models"]
    assert model["name"] == MODEL and model["weights_sha256"] == "cd" * 32
    verified = verify_document(doc, expected_nonce=NONCE, policy=SIMULATED)
    assert verified.config_digest == node.state.attestation.config_digest
    assert verified.config_digest == node.state.config.digest({MODEL: "cd" * 32})
    assert verified.config_digest != node.state.config.digest({MODEL: "ce" * 32})  # other weights, other digest


def test_a_debug_simulated_node_is_refused_by_attest_and_the_client(tmp_path):
    node = spawn_node(env={"TEE_NODE_ATTESTATION__SIMULATED_DEBUG": "true"})
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")}
        attest = subprocess.run([str(TEE_NODE), "attest", node.url, "--allow-simulated"], capture_output=True, text=True, env=env, timeout=60)
        assert attest.returncode == 1
        assert "debug is set in td_attributes: the host can read and change this TD" in attest.stderr
        with Client(node.url, allow_simulated=True) as client:
            try:
                client.attest()
                raise AssertionError("a debug TD was accepted")
            except PolicyRefused as refused:
                assert refused.errors[0].startswith("debug is set in td_attributes")
        # The same node under a policy that knowingly allows a debug TD (test systems only).
        policy = tmp_path / "debug-ok.toml"
        policy.write_text("allow_simulated = true\n[tdx]\nallow_debug = true\n")
        ok = subprocess.run([str(TEE_NODE), "attest", node.url, "--policy", str(policy), "--json"], capture_output=True, text=True, env=env, timeout=60)
        assert ok.returncode == 0, ok.stderr
        result = json.loads(ok.stdout)
        assert result["accepted"] is True and result["claims"]["cpu"]["debug"] is True
    finally:
        node.stop()
    # Without the setting the same node is not a debug TD.
    plain = spawn_node()
    try:
        with Client(plain.url, allow_simulated=True) as client:
            assert client.attest().claims["cpu"]["debug"] is False
    finally:
        plain.stop()


def test_tee_node_config_digest_matches_what_the_node_attests(tmp_path):
    node = spawn_node()
    try:
        doc = fetch(node.url)
    finally:
        node.stop()
    config = tmp_path / "echo.toml"
    config.write_text(f'[engine]\nkind = "echo"\n[[engine.models]]\nname = "{MODEL}"\nsource = "{MODEL}"\n[limits]\nstream_coalesce_max = 1\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")}
    out = subprocess.run([str(TEE_NODE), "config", "digest", "--config", str(config)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == doc["config_digest"]


def test_config_digest_needs_the_weights_or_their_measured_digest(tmp_path, capsys, monkeypatch):
    from node.cli import main
    from node.config import load_config
    from node.models import weights_sha256

    for name in [k for k in os.environ if k.startswith("TEE_NODE_")]:
        monkeypatch.delenv(name)
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"tensor bytes")
    config = tmp_path / "node.toml"
    config.write_text(f'[engine]\nkind = "vllm"\n[[engine.models]]\nname = "m"\nsource = "{weights}"\n')
    assert main(["models", "digest", "--config", str(config)]) == 0
    measured = capsys.readouterr().out.strip()
    assert measured == f"m={weights_sha256(str(weights), weights)}"
    assert main(["config", "digest", "--config", str(config)]) == 0
    here = capsys.readouterr().out.strip()
    assert here == load_config(config).digest({"m": measured[2:]}).hex()
    # On a host without the weights (an image build) the digest needs them measured elsewhere.
    (weights / "model.safetensors").unlink()
    weights.rmdir()
    assert main(["config", "digest", "--config", str(config)]) == 1
    assert "weights of m are not at" in capsys.readouterr().err
    assert main(["config", "digest", "--config", str(config), "--weights-sha256", measured]) == 0
    assert capsys.readouterr().out.strip() == here
