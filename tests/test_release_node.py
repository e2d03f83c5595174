"""A node serving its release (attestation.release_bundle), end to end: in-process nodes on the
simulated TEE, a Sigstore-shaped instance made by the test, and the client's `[release]` policy."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
from server_support import TEE_NODE
from sigstore_support import GITHUB_ISSUER, SigstoreInstance, b64

from attestation.appraisal import Policy, ReleasePolicy
from attestation.document import verify_evidence
from attestation.errors import PolicyRefused, ReleaseInvalid
from attestation.release import build_statement, reference_values_from_claims
from node.client import ConfidentialClient
from node.config import load_config

NONCE = bytes(range(32))
SEED = "5e" * 32
IDENTITY = "https://github.com/example/tee-node/.github/workflows/release.yml@refs/tags/v1.4.0"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def instance() -> SigstoreInstance:
    return SigstoreInstance()


@pytest.fixture
def root_file(instance, tmp_path) -> Path:
    path = tmp_path / "trusted_root.json"
    path.write_text(instance.trusted_root_json())
    return path


def attestation_settings(tmp_path: Path, bundle: Path | None = None) -> dict:
    settings = {"state_dir": str(tmp_path / "state"), "simulated_seed": SEED}
    if bundle is not None:
        settings["release_bundle"] = str(bundle)
    return settings


async def document_of(node) -> dict:
    response = await node.client.get(f"/v1/attestation?nonce={NONCE.hex()}")
    assert response.status == 200
    return await response.json()


def release_policy(root_file: Path, identity: str = IDENTITY) -> Policy:
    """Pins nothing of its own: the release's reference values are all it pins."""
    return Policy(allow_simulated=True, release=ReleasePolicy(issuer=GITHUB_ISSUER, identity=identity, trusted_root=root_file))


def statement(reference_values: dict, version: str = "1.4.0") -> dict:
    return build_statement(
        reference_values, version=version, repository="https://github.com/example/tee-node", commit=COMMIT, subjects={"tee-node": "ab" * 32}
    )


async def attest(node, policy: Policy):
    async with ConfidentialClient(str(node.client.make_url("")), policy=policy) as client:
        return await client.attest(), client


async def test_a_node_serves_its_release_and_a_release_pinning_client_accepts_it(make_node, instance, root_file, tmp_path):
    plain = await make_node(attestation=attestation_settings(tmp_path))
    plain_doc = await document_of(plain)
    claims = verify_evidence(plain_doc, expected_nonce=NONCE).claims
    values = reference_values_from_claims(claims)
    assert set(values["tdx"]) >= {"mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3"} and values["config_digest"] == [plain_doc["config_digest"]]

    def node_serving(name: str, bundle: dict):
        path = tmp_path / f"{name}.sigstore.json"
        path.write_text(json.dumps(bundle))
        return make_node(attestation=attestation_settings(tmp_path, path))

    issued = instance.sign(statement(values))
    served = await node_serving("release", issued.bundle)
    served_doc = await document_of(served)
    # Verbatim, and never measured: the same registers and config digest as without it.
    assert served_doc["release_bundle"] == issued.bundle and plain_doc["release_bundle"] is None
    assert (served_doc["config_digest"], served_doc["measured_config"]) == (plain_doc["config_digest"], plain_doc["measured_config"])
    served_claims = verify_evidence(served_doc, expected_nonce=NONCE).claims
    assert (served_claims.cpu.mr_td, served_claims.cpu.rtmrs) == (claims.cpu.mr_td, claims.cpu.rtmrs)

    identity, _ = await attest(served, release_policy(root_file))
    assert identity.measurement == claims.cpu.mr_td.hex()

    # Refused: no release served; a release pinning another MRTD; a release whose proof was altered;
    # a release signed by someone else.
    with pytest.raises(PolicyRefused, match="serves no release bundle"):
        await attest(plain, release_policy(root_file))
    other_values = copy.deepcopy(values)
    other_values["tdx"]["mr_td"] = ["11" * 48]
    other = await node_serving("other", instance.sign(statement(other_values, "1.5.0")).bundle)
    with pytest.raises(PolicyRefused) as refused:
        await attest(other, release_policy(root_file))
    assert [e for e in refused.value.errors if e.startswith("mr_td differs from release 1.5.0")], refused.value.errors
    altered = copy.deepcopy(issued.bundle)
    proof = altered["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]
    proof["hashes"][-1] = b64(bytes(32))
    tampered = await node_serving("altered", altered)
    with pytest.raises(ReleaseInvalid, match="inclusion proof"):
        await attest(tampered, release_policy(root_file))
    with pytest.raises(PolicyRefused, match="was not signed by"):
        await attest(served, release_policy(root_file, identity=IDENTITY.replace("v1.4.0", "v9")))


@pytest.mark.parametrize(
    "content, reason",
    [("{", "is not valid JSON"), ("[1]", "is not a Sigstore bundle"), ('{"mediaType": "application/json"}', "is not a Sigstore bundle")],
)
def test_a_bundle_that_is_not_one_stops_the_start(tmp_path, content, reason):
    from node.server import create_app
    from server_support import echo_config

    path = tmp_path / "bundle.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"attestation.release_bundle {path} {reason}"):
        create_app(echo_config(attestation=attestation_settings(tmp_path, path)))


def test_the_bundle_path_comes_from_the_environment_and_a_bad_one_stops_serve(tmp_path, monkeypatch):
    path = tmp_path / "missing.sigstore.json"
    monkeypatch.setenv("TEE_NODE_ATTESTATION__RELEASE_BUNDLE", str(path))
    assert load_config().attestation.release_bundle == path
    assert "release_bundle" not in json.dumps(load_config().measured_config({}))
    path.write_text("not json")
    proc = subprocess.run(
        [str(TEE_NODE), "serve", "--engine", "echo", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TEE_NODE_ATTESTATION__STATE_DIR": str(tmp_path / "s")},  # PYTHONPATH: this tree's node
    )
    assert proc.returncode == 2, proc.stderr
    assert f"cannot start: attestation.release_bundle {path} is not valid JSON" in proc.stderr
