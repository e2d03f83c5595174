"""`tee-node release statement`, `tee-node release verify`, and `tee-node attest --policy
release.toml` against a node serving a release minted by a Sigstore-shaped instance made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_support import spawn_node
from sigstore_support import GITHUB_ISSUER, SigstoreInstance

from attestation.tdx import TdxQuote
from node.cli import main

TDX = Path(__file__).resolve().parent / "data" / "tdx"
SIGSTORE = Path(__file__).resolve().parent / "data" / "sigstore"
IDENTITY = "https://github.com/example/tee-node/.github/workflows/release.yml@refs/tags/v1.4.0"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SOURCE = ["--repository", "https://github.com/example/tee-node", "--commit", COMMIT, "--subject", f"ghcr.io/example/tee-node={'ab' * 32}"]


@pytest.fixture(scope="module")
def instance() -> SigstoreInstance:
    return SigstoreInstance()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_statement_from_a_quote_pins_its_registers(capsys):
    path = TDX / "cos-113-tdx-quote.dat"
    code, out, err = run(capsys, "release", "statement", "--from-quote", str(path), "--version", "1.4.0", *SOURCE)
    assert code == 0, err
    statement = json.loads(out)
    body = TdxQuote.from_bytes(path.read_bytes()).body
    assert statement["predicateType"] == "urn:tee-node:release:v1"
    assert statement["subject"] == [{"name": "ghcr.io/example/tee-node", "digest": {"sha256": "ab" * 32}}]
    predicate = statement["predicate"]
    assert predicate["version"] == "1.4.0" and predicate["source"]["commit"] == COMMIT
    assert predicate["reference_values"]["tdx"]["mr_td"] == [body.mr_td.hex()]
    assert [predicate["reference_values"]["tdx"][f"rtmr{i}"] for i in range(4)] == [[r.hex()] for r in body.rtmrs]
    assert "config_digest" not in predicate["reference_values"]  # bare evidence has no config


def test_statement_refuses_evidence_that_does_not_verify_and_bad_arguments(capsys, tmp_path):
    broken = tmp_path / "quote.dat"
    data = bytearray((TDX / "cos-113-tdx-quote.dat").read_bytes())
    data[700] ^= 1
    broken.write_bytes(bytes(data))
    code, out, err = run(capsys, "release", "statement", "--from-quote", str(broken), *SOURCE)
    assert code == 1 and out == "" and "does not verify" in err
    code, out, err = run(capsys, "release", "statement", "--from-quote", str(TDX / "cos-113-tdx-quote.dat"), *SOURCE[:2], "--commit", "abc", *SOURCE[4:])
    assert code == 1 and "commit" in err
    with pytest.raises(SystemExit):
        main(["release", "statement", "--from-quote", str(broken), *SOURCE[:4], "--subject", "image=xyz"])


def test_verify_prints_the_release_and_exits_0_only_when_valid(capsys, instance, tmp_path):
    root = tmp_path / "root.json"
    root.write_text(instance.trusted_root_json())
    statement = json.loads(run(capsys, "release", "statement", "--from-quote", str(TDX / "cos-113-tdx-quote.dat"), *SOURCE)[1])
    bundle = tmp_path / "release.sigstore.json"
    bundle.write_text(instance.sign(statement).json())
    args = ["release", "verify", str(bundle), "--issuer", GITHUB_ISSUER, "--trusted-root", str(root)]

    code, out, err = run(capsys, *args, "--identity", IDENTITY, "--json")
    result = json.loads(out)
    assert code == 0 and result["valid"] is True and result["errors"] == []
    assert (result["identity"], result["issuer"], result["log_index"]) == (IDENTITY, GITHUB_ISSUER, 5)
    assert isinstance(result["integrated_time"], int) and result["predicate"] == statement["predicate"]

    code, out, _ = run(capsys, *args, "--identity-pattern", r"https://github\.com/example/tee-node/.*")
    assert code == 0 and "valid: True" in out and f"identity: {IDENTITY}" in out

    code, out, _ = run(capsys, *args, "--identity-pattern", r"https://github\.com/example/.*@refs/heads/main", "--json")
    result = json.loads(out)
    assert code == 1 and result["valid"] is False and "do not match the pattern" in result["errors"][0]

    code, out, _ = run(capsys, "release", "verify", str(bundle), "--identity", IDENTITY, "--issuer", GITHUB_ISSUER, "--json")
    assert code == 1 and "does not verify" in json.loads(out)["errors"][0]  # Sigstore's public-good root: not our CA

    code, out, _ = run(capsys, *args, "--identity", IDENTITY, "--trusted-root", str(tmp_path / "none.json"), "--json")
    assert code == 1 and "cannot read the Sigstore trusted root" in json.loads(out)["errors"][0]
    code, out, _ = run(capsys, "release", "verify", str(tmp_path / "none"), "--identity", IDENTITY, "--issuer", GITHUB_ISSUER)
    assert code == 2 and "cannot read" in out


def test_verify_the_real_staging_dsse_bundle_is_not_a_release(capsys):
    code, out, _ = run(
        capsys, "release", "verify", str(SIGSTORE / "a.dsse.staging-rekor-v2.txt.sigstore.json"),
        "--identity-pattern", ".*", "--issuer", "https://token.actions.githubusercontent.com",
        "--trusted-root", str(SIGSTORE / "staging_trusted_root.json"), "--json",
    )  # fmt: skip
    assert code == 1 and "not a tee-node release" in json.loads(out)["errors"][0]


def test_attest_with_a_release_policy_against_a_node_serving_its_release(capsys, instance, tmp_path):
    """From a node measured by `release statement --from-node`, a release minted by an instance
    this test made; `tee-node attest --policy release.toml` pins only the release's signer."""
    env = {"TEE_NODE_ATTESTATION__SIMULATED_SEED": "5e" * 32, "TEE_NODE_ATTESTATION__STATE_DIR": str(tmp_path / "state")}
    measured = spawn_node(env=env)
    try:
        code, out, err = run(capsys, "release", "statement", "--from-node", measured.url, "--allow-simulated", "--version", "1.4.0", *SOURCE)
    finally:
        measured.stop()
    assert code == 0, err
    statement = json.loads(out)
    assert statement["predicate"]["reference_values"]["config_digest"]
    root = tmp_path / "root.json"
    root.write_text(instance.trusted_root_json())
    bundle = tmp_path / "release.sigstore.json"
    bundle.write_text(instance.sign(statement).json())
    policy = tmp_path / "release.toml"
    policy.write_text(
        f'allow_simulated = true\n\n[release]\nidentity = "{IDENTITY}"\nissuer = "{GITHUB_ISSUER}"\ntrusted_root = "root.json"\n'
    )
    other_signer = tmp_path / "other.toml"
    other_signer.write_text(policy.read_text().replace("v1.4.0", "v1.4.1"))
    node = spawn_node(env={**env, "TEE_NODE_ATTESTATION__RELEASE_BUNDLE": str(bundle)})
    try:
        code, out, err = run(capsys, "attest", node.url, "--policy", str(policy), "--json")
        assert code == 0, out + err
        result = json.loads(out)
        assert result["accepted"] is True and result["document"]["release_bundle"] == json.loads(bundle.read_text())
        code, out, err = run(capsys, "attest", node.url, "--policy", str(other_signer), "--json")
        result = json.loads(out)
        assert code == 1 and result["accepted"] is False
        assert any("release 1.4.0 was not signed by" in e for e in result["policy_errors"]), result
    finally:
        node.stop()
    # The node that served none is refused by the same policy.
    bare = spawn_node(env=env)
    try:
        code, out, _ = run(capsys, "attest", bare.url, "--policy", str(policy), "--json")
        assert code == 1 and any("serves no release bundle" in e for e in json.loads(out)["policy_errors"])
    finally:
        bare.stop()
