"""The verified release a node serves, as the client reports it: `NodeIdentity.release`,
`tee-node attest --json`'s `release` and `chat`'s stderr (version, source, identity, log index)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sigstore_support import GITHUB_ISSUER, SigstoreInstance

from attestation.document import verify_evidence
from attestation.release import build_statement, reference_values_from_claims
from node.cli import main as cli_main
from node.client import ConfidentialClient

NONCE = bytes(range(32))
SEED = "5e" * 32
IDENTITY = "https://github.com/example/tee-node/.github/workflows/release.yml@refs/tags/v1.4.0"
REPOSITORY = "https://github.com/example/tee-node"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def instance() -> SigstoreInstance:
    return SigstoreInstance()


async def test_the_verified_release_is_reported(make_node, instance, tmp_path, capsys):
    state = {"state_dir": str(tmp_path / "state"), "simulated_seed": SEED}
    plain = await make_node(attestation=state)
    document = await (await plain.client.get(f"/v1/attestation?nonce={NONCE.hex()}")).json()
    values = reference_values_from_claims(verify_evidence(document, expected_nonce=NONCE).claims)
    issued = instance.sign(
        build_statement(values, version="1.4.0", repository=REPOSITORY, commit=COMMIT, subjects={"tee-node": "ab" * 32})
    )
    bundle = tmp_path / "release.sigstore.json"
    bundle.write_text(json.dumps(issued.bundle))
    node = await make_node(attestation={**state, "release_bundle": str(bundle)})
    url = str(node.client.make_url("")).rstrip("/")
    root = tmp_path / "root.json"
    root.write_text(instance.trusted_root_json())
    policy = tmp_path / "release.toml"
    policy.write_text(f'allow_simulated = true\n\n[release]\nidentity = "{IDENTITY}"\nissuer = "{GITHUB_ISSUER}"\ntrusted_root = "root.json"\n')

    async with ConfidentialClient(url, policy=policy) as client:
        identity = await client.attest()
    release = identity.release
    assert release == {
        "version": "1.4.0",
        "source": {"repository": REPOSITORY, "commit": COMMIT},
        "identity": IDENTITY,
        "log_index": release["log_index"],
    } and isinstance(release["log_index"], int)

    # The command line runs its synchronous client in a thread while this loop serves the node.
    assert await asyncio.to_thread(cli_main, ["attest", url, "--policy", str(policy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["release"] == release
    assert await asyncio.to_thread(cli_main, ["chat", url, "released hello", "--policy", str(policy)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "released hello\n"
    assert f"  release:       1.4.0 from {REPOSITORY} at {COMMIT}, signed by {IDENTITY}, log index {release['log_index']}\n" in captured.err

    # A policy without [release] verifies no release: none is reported, though the node serves one.
    async with ConfidentialClient(url, allow_simulated=True) as client:
        assert (await client.attest()).release is None
    assert await asyncio.to_thread(cli_main, ["attest", url, "--allow-simulated", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["release"] is None
