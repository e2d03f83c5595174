"""Releases: the statement, offline Sigstore verification (a Sigstore-shaped instance made here,
each piece tampered with; real bundles of Sigstore's public-good and staging instances), the
`[release]` policy, and documents carrying a release."""

import base64
import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from sigstore.models import Bundle
from sigstore.verify import Verifier
from sigstore_support import GITHUB_ISSUER, SigstoreInstance, b64

from attestation.appraisal import Policy, PolicyError, ReleasePolicy, appraise, load_policy
from attestation.claims import Claims
from attestation.document import build_document, verify_document, verify_evidence
from attestation.errors import PolicyRefused, ReleaseInvalid
from attestation.producers.simulated import SimulatedProvider
from attestation.release import (
    PREDICATE_TYPE,
    build_statement,
    certificate_issuer,
    identity_policy,
    load_trusted_root,
    parse_bundle,
    reference_values_from_claims,
    signer_mismatch,
    verify_release,
)
from attestation.tdx import verify_quote

SIGSTORE = Path(__file__).resolve().parent / "data" / "sigstore"
TDX = Path(__file__).resolve().parent / "data" / "tdx"
IDENTITY = "https://github.com/example/tee-node/.github/workflows/release.yml@refs/tags/v1.4.0"
PATTERN = r"https://github\.com/example/tee-node/\.github/workflows/release\.yml@refs/tags/v.*"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
IMAGE = {"ghcr.io/example/tee-node": "ab" * 32}
NONCE = bytes(range(32))
SEED = b"release-test-seed-0123456789abcd"
MEASURED = {"tee_mode": "simulated", "engine": {"kind": "echo", "models": [{"name": "m"}]}}
KEM = bytes(range(256)) * 4 + bytes(160)  # an ML-KEM-768 key's size: the default policy requires one
REAL_BUNDLE_IDENTITY = "https://github.com/trailofbits/rfc8785.py/.github/workflows/release.yml@refs/tags/v0.1.2"


def simulated_document(measurement: bytes = b"image 1.4.0") -> dict:
    return build_document(
        SimulatedProvider(measurement, seed=SEED),
        None,
        nonce=NONCE,
        dh_public_key=b"\xd1" * 32,
        signing_public_key=b"\x5e" * 32,
        key_epoch=1,
        measured_config=MEASURED,
        kem_public_key=KEM,
    )


def claims_of(doc: dict) -> Claims:
    return verify_evidence(doc, expected_nonce=NONCE).claims


def statement_for(doc: dict, version: str = "1.4.0") -> dict:
    return build_statement(reference_values_from_claims(claims_of(doc)), version=version, repository="https://github.com/example/tee-node", commit=COMMIT, subjects=IMAGE)


@pytest.fixture(scope="module")
def instance() -> SigstoreInstance:
    return SigstoreInstance()


@pytest.fixture(scope="module")
def root_file(instance, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sigstore") / "trusted_root.json"
    path.write_text(instance.trusted_root_json())
    return path


@pytest.fixture(scope="module")
def doc() -> dict:
    return simulated_document()


@pytest.fixture(scope="module")
def issued(instance, doc):
    return instance.sign(statement_for(doc))


def exact_signer():
    return identity_policy(issuer=GITHUB_ISSUER, identity=IDENTITY)


# --- the statement -------------------------------------------------------------------------


def test_statement_has_the_release_shape_with_the_policy_files_keys(doc):
    claims = claims_of(doc)
    statement = statement_for(doc)
    assert statement["_type"] == "https://in-toto.io/Statement/v1" and statement["predicateType"] == PREDICATE_TYPE
    assert statement["subject"] == [{"name": "ghcr.io/example/tee-node", "digest": {"sha256": "ab" * 32}}]
    predicate = statement["predicate"]
    assert predicate["version"] == "1.4.0" and predicate["source"] == {"repository": "https://github.com/example/tee-node", "commit": COMMIT}
    values = predicate["reference_values"]
    assert set(values) == {"tdx", "config_digest"}
    cpu = claims.cpu
    assert values["tdx"]["mr_td"] == [cpu.mr_td.hex()]
    assert [values["tdx"][f"rtmr{i}"] for i in range(4)] == [[r.hex()] for r in cpu.rtmrs]
    assert values["config_digest"] == [claims.config_digest.hex()]
    # A client's own choices never come from a release.
    assert "allowed_tcb_status" not in values["tdx"] and "allow_simulated" not in values


def test_statement_refuses_what_a_release_cannot_say(doc):
    values = reference_values_from_claims(claims_of(doc))
    common = dict(version="1", repository="r", subjects=IMAGE)
    with pytest.raises(ReleaseInvalid, match="commit"):
        build_statement(values, commit="abc", **common)
    with pytest.raises(ReleaseInvalid, match="allow_debug"):
        build_statement({**values, "tdx": {**values["tdx"], "allow_debug": True}}, commit=COMMIT, **common)
    with pytest.raises(ReleaseInvalid, match="allow_simulated"):
        build_statement({**values, "allow_simulated": True}, commit=COMMIT, **common)
    with pytest.raises(ReleaseInvalid, match="mr_td"):
        build_statement({"tdx": {"mr_td": ["00"]}}, commit=COMMIT, **common)
    with pytest.raises(ReleaseInvalid, match="subject"):
        build_statement(values, commit=COMMIT, version="1", repository="r", subjects={})


# --- verification of a minted instance ------------------------------------------------------


def test_a_minted_release_verifies_offline(issued, root_file, doc):
    release = verify_release(issued.json(), trusted_root=root_file, signer=exact_signer())
    assert (release.version, release.identity, release.issuer) == ("1.4.0", IDENTITY, GITHUB_ISSUER)
    assert release.source["commit"] == COMMIT and release.log_index == 5
    assert release.integrated_time is not None and release.integrated_time > 1_700_000_000
    assert release.reference_values == statement_for(doc)["predicate"]["reference_values"]
    # The pattern form and the parsed-object form too.
    pattern = identity_policy(issuer=GITHUB_ISSUER, identity_pattern=PATTERN)
    assert verify_release(issued.bundle, trusted_root=root_file, signer=pattern).version == "1.4.0"


def tampered(issued, change) -> dict:
    bundle = copy.deepcopy(issued.bundle)
    change(bundle)
    return bundle


def _entry(bundle):
    return bundle["verificationMaterial"]["tlogEntries"][0]


def _flip_b64(text: str, index: int = -1) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[index] ^= 0x01
    return b64(bytes(raw))


def _other_payload(bundle):
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["reference_values"]["tdx"]["mr_td"] = ["00" * 48]
    bundle["dsseEnvelope"]["payload"] = b64(json.dumps(statement).encode())


def _flip_signature(bundle):
    sig = bundle["dsseEnvelope"]["signatures"][0]
    sig["sig"] = _flip_b64(sig["sig"], 10)


def _flip_certificate(bundle):
    cert = bundle["verificationMaterial"]["certificate"]
    cert["rawBytes"] = _flip_b64(cert["rawBytes"])


def _flip_proof(bundle):
    proof = _entry(bundle)["inclusionProof"]
    proof["hashes"][0] = _flip_b64(proof["hashes"][0], 0)


def _flip_root_hash(bundle):
    proof = _entry(bundle)["inclusionProof"]
    proof["rootHash"] = _flip_b64(proof["rootHash"], 0)


def _flip_set(bundle):
    promise = _entry(bundle)["inclusionPromise"]
    promise["signedEntryTimestamp"] = _flip_b64(promise["signedEntryTimestamp"], 12)


def _other_log_index(bundle):
    _entry(bundle)["logIndex"] = "4"


TAMPERING = {
    "payload": (_other_payload, "DSSE"),
    "DSSE signature": (_flip_signature, "DSSE"),
    "certificate": (_flip_certificate, "certificate chain"),
    "inclusion proof": (_flip_proof, "inclusion proof"),
    "root hash": (_flip_root_hash, "inclusion proof"),
    "signed entry timestamp": (_flip_set, "SET"),
    "log index": (_other_log_index, "SET"),
}


@pytest.mark.parametrize("piece", sorted(TAMPERING))
def test_each_tampered_piece_is_refused(issued, root_file, piece):
    change, reason = TAMPERING[piece]
    with pytest.raises(ReleaseInvalid, match=reason):
        verify_release(tampered(issued, change), trusted_root=root_file, signer=exact_signer())


def test_a_checkpoint_not_signed_by_the_log_is_refused(instance, issued, root_file):
    other_key = ec.generate_private_key(ec.SECP256R1())

    def forge(bundle):
        proof = _entry(bundle)["inclusionProof"]
        proof["checkpoint"]["envelope"] = instance.checkpoint(int(proof["treeSize"]), base64.b64decode(proof["rootHash"]), key=other_key)

    with pytest.raises(ReleaseInvalid, match="checkpoint"):
        verify_release(tampered(issued, forge), trusted_root=root_file)


def test_a_checkpoint_for_another_tree_is_refused(instance, issued, root_file):
    def other_tree(bundle):
        proof = _entry(bundle)["inclusionProof"]
        proof["checkpoint"]["envelope"] = instance.checkpoint(int(proof["treeSize"]), b"\x07" * 32)

    with pytest.raises(ReleaseInvalid, match="root hash"):
        verify_release(tampered(issued, other_tree), trusted_root=root_file)


def test_an_sct_not_signed_by_the_ct_log_is_refused(instance, doc, root_file):
    forged = instance.sign(statement_for(doc), sct_key=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ReleaseInvalid, match="SCT"):
        verify_release(forged.json(), trusted_root=root_file)


def test_a_certificate_without_its_sct_is_refused(instance, doc, root_file):
    # The same leaf re-issued without the SCT list: the chain holds, the CT log never saw it.
    good = instance.sign(statement_for(doc))
    precert = good.certificate.tbs_precertificate_bytes
    assert precert != good.certificate.tbs_certificate_bytes
    from cryptography import x509

    builder = x509.CertificateBuilder(
        issuer_name=good.certificate.issuer,
        subject_name=good.certificate.subject,
        public_key=good.certificate.public_key(),
        serial_number=good.certificate.serial_number,
        not_valid_before=good.certificate.not_valid_before_utc,
        not_valid_after=good.certificate.not_valid_after_utc,
        extensions=[e for e in good.certificate.extensions if e.oid.dotted_string != "1.3.6.1.4.1.11129.2.4.2"],
    )
    no_sct = builder.sign(instance.ca_key, hashes.SHA384())

    def swap(bundle):
        bundle["verificationMaterial"]["certificate"]["rawBytes"] = b64(no_sct.public_bytes(Encoding.DER))

    with pytest.raises(ReleaseInvalid, match="SCT"):
        verify_release(tampered(good, swap), trusted_root=root_file)


def test_another_root_refuses_the_release(issued, tmp_path):
    other = tmp_path / "other_root.json"
    other.write_text(SigstoreInstance("other-sigstore").trusted_root_json())
    with pytest.raises(ReleaseInvalid, match="certificate chain"):
        verify_release(issued.json(), trusted_root=other)
    # Sigstore's public-good root (the default) does not know the test instance either.
    with pytest.raises(ReleaseInvalid, match="certificate chain"):
        verify_release(issued.json())


def test_the_wrong_identity_or_issuer_is_refused(issued, root_file):
    cases = [
        (identity_policy(issuer=GITHUB_ISSUER, identity=IDENTITY.replace("v1.4.0", "v1.4.1")), "SANs do not match"),
        (identity_policy(issuer="https://accounts.google.com", identity=IDENTITY), "OIDCIssuer does not match"),
        # Matched in full: a pattern for the repository's prefix alone does not accept the tag's workflow.
        (identity_policy(issuer=GITHUB_ISSUER, identity_pattern=r"https://github\.com/example/tee-node"), "do not match the pattern"),
        (identity_policy(issuer=GITHUB_ISSUER, identity_pattern=r"https://github\.com/attacker/.*"), "do not match the pattern"),
    ]
    for signer, reason in cases:
        with pytest.raises(ReleaseInvalid, match=reason):
            verify_release(issued.json(), trusted_root=root_file, signer=signer)
        release = verify_release(issued.json(), trusted_root=root_file)  # authentic: the signer is appraised apart
        assert reason in (signer_mismatch(release, signer) or "")
    assert signer_mismatch(verify_release(issued.json(), trusted_root=root_file), exact_signer()) is None


def test_a_signed_statement_that_is_not_a_release_is_refused(instance, doc, root_file):
    statement = statement_for(doc)
    cases = [
        ({**statement, "predicateType": "https://slsa.dev/provenance/v1"}, "not a tee-node release"),
        ({**statement, "predicate": {**statement["predicate"], "reference_values": {"tdx": {"allow_debug": True}}}}, "allow_debug"),
        ({**statement, "predicate": {**statement["predicate"], "extra": 1}}, "unknown key"),
        (b"not json", "not an in-toto statement"),
        ({**statement, "subject": []}, "not an in-toto statement"),
    ]
    for payload, reason in cases:
        with pytest.raises(ReleaseInvalid, match=reason):
            verify_release(instance.sign(payload).json(), trusted_root=root_file)


def test_what_is_not_a_bundle_is_named(tmp_path):
    for data, reason in [("{", "not a Sigstore bundle"), ("{}", "not a Sigstore bundle"), ('{"mediaType": "x"}', "not a Sigstore bundle")]:
        with pytest.raises(ReleaseInvalid, match=reason):
            parse_bundle(data)
    bad_root = tmp_path / "root.json"
    bad_root.write_text("{}")
    with pytest.raises(ReleaseInvalid, match="not a Sigstore trusted root"):
        load_trusted_root(bad_root)
    with pytest.raises(ReleaseInvalid, match="cannot read"):
        load_trusted_root(tmp_path / "missing.json")


# --- real bundles -------------------------------------------------------------------------


def test_the_real_public_good_bundle_verifies_offline_under_the_shipped_root():
    root = load_trusted_root()  # attestation/roots/, the default
    assert (SIGSTORE / "public_good_trusted_root.json").read_bytes() == (
        Path(__file__).resolve().parent.parent / "attestation" / "roots" / "sigstore_public_good_trusted_root.json"
    ).read_bytes()
    bundle = Bundle.from_json((SIGSTORE / "bundle_v3_github.whl.sigstore").read_bytes())
    signer = identity_policy(issuer=GITHUB_ISSUER, identity=REAL_BUNDLE_IDENTITY)
    Verifier(trusted_root=root).verify_artifact((SIGSTORE / "bundle_v3_github.whl").read_bytes(), bundle, signer)
    assert certificate_issuer(bundle.signing_certificate) == GITHUB_ISSUER
    # The same bundle with the artifact changed, and under another root, is refused.
    from sigstore.errors import VerificationError

    with pytest.raises(VerificationError):
        Verifier(trusted_root=root).verify_artifact(b"another wheel", bundle, signer)
    with pytest.raises(VerificationError):
        Verifier(trusted_root=load_trusted_root(SIGSTORE / "staging_trusted_root.json")).verify_artifact(
            (SIGSTORE / "bundle_v3_github.whl").read_bytes(), bundle, signer
        )
    # It signs a wheel, not a DSSE statement: not a release.
    with pytest.raises(ReleaseInvalid, match="DSSE"):
        verify_release((SIGSTORE / "bundle_v3_github.whl.sigstore").read_text(), signer=signer)


def test_a_real_dsse_bundle_verifies_but_is_not_a_release():
    """Sigstore's staging instance (Rekor v2, RFC 3161 timestamp): sigstore-python verifies it
    offline; its statement is SLSA provenance, not ours."""
    text = (SIGSTORE / "a.dsse.staging-rekor-v2.txt.sigstore.json").read_text()
    with pytest.raises(ReleaseInvalid, match="slsa.dev/provenance/v1.*not a tee-node release"):
        verify_release(text, trusted_root=SIGSTORE / "staging_trusted_root.json")
    with pytest.raises(ReleaseInvalid, match="does not verify"):
        verify_release(text)  # the public-good root knows neither the staging TSA nor its CA


# --- policy ------------------------------------------------------------------------------------


def test_release_table_is_checked(tmp_path):
    def policy(text):
        path = tmp_path / "p.toml"
        path.write_text(text)
        return load_policy(path)

    (tmp_path / "roots").mkdir()
    (tmp_path / "roots" / "test.json").write_text("{}")
    loaded = policy(f'[release]\nidentity = "{IDENTITY}"\nissuer = "{GITHUB_ISSUER}"\ntrusted_root = "roots/test.json"\n')
    assert loaded.release == ReleasePolicy(issuer=GITHUB_ISSUER, identity=IDENTITY, trusted_root=tmp_path / "roots" / "test.json")
    assert policy(f'[release]\nidentity_pattern = "x.*"\nissuer = "{GITHUB_ISSUER}"\n').release.identity_pattern == "x.*"
    for text, reason in [
        (f'[release]\nidentity = "a"\nidentity_pattern = "b"\nissuer = "{GITHUB_ISSUER}"\n', "exactly one"),
        ('[release]\nidentity = "a"\n', "needs issuer"),
        (f'[release]\nidentity_pattern = "("\nissuer = "{GITHUB_ISSUER}"\n', "not a regular expression"),
        (f'[release]\nidentity = "a"\nissuer = "{GITHUB_ISSUER}"\nsubject = "x"\n', "unknown key"),
        ('[release]\nidentity = ""\nissuer = "i"\n', "non-empty"),
        (f'[release]\nidentity = "a"\nissuer = "{GITHUB_ISSUER}"\ntrusted_root = "missing.json"\n', "is not a file"),
    ]:
        with pytest.raises(PolicyError, match=reason):
            policy(text)


def release_policy(root_file, **kwargs) -> Policy:
    release = ReleasePolicy(issuer=GITHUB_ISSUER, identity=kwargs.pop("identity", IDENTITY), trusted_root=root_file)
    return Policy(allow_simulated=True, release=release, **kwargs)


def with_bundle(doc: dict, bundle) -> dict:
    return {**doc, "release_bundle": bundle}


def test_a_document_serving_its_release_is_accepted_on_the_release_alone(doc, issued, root_file):
    verified = verify_document(with_bundle(doc, issued.bundle), expected_nonce=NONCE, policy=release_policy(root_file))
    release = verified.release
    assert (release.version, release.identity, release.issuer, release.log_index) == ("1.4.0", IDENTITY, GITHUB_ISSUER, 5)
    assert verified.claims.as_json()["release"]["predicate"]["version"] == "1.4.0"
    by_pattern = replace(release_policy(root_file), release=ReleasePolicy(issuer=GITHUB_ISSUER, identity_pattern=PATTERN, trusted_root=root_file))
    assert verify_document(with_bundle(doc, issued.bundle), expected_nonce=NONCE, policy=by_pattern).release.identity == IDENTITY
    # Without [release] the bundle is not looked at.
    assert verify_document(with_bundle(doc, issued.bundle), expected_nonce=NONCE, policy=Policy(allow_simulated=True)).release is None


def test_a_release_pinning_another_image_refuses_the_node(instance, doc, root_file):
    other = instance.sign(statement_for(simulated_document(b"image 1.3.9"), version="1.3.9"))
    with pytest.raises(PolicyRefused) as refused:
        verify_document(with_bundle(doc, other.bundle), expected_nonce=NONCE, policy=release_policy(root_file))
    assert any(e.startswith("mr_td differs from release 1.3.9") for e in refused.value.errors), refused.value.errors


def test_a_node_without_a_release_is_refused(doc, root_file):
    for served in (doc, with_bundle(doc, None)):
        with pytest.raises(PolicyRefused, match="serves no release bundle"):
            verify_document(served, expected_nonce=NONCE, policy=release_policy(root_file))


def test_an_altered_proof_refuses_the_document(doc, issued, root_file):
    with pytest.raises(ReleaseInvalid, match="inclusion proof"):
        verify_document(with_bundle(doc, tampered(issued, _flip_proof)), expected_nonce=NONCE, policy=release_policy(root_file))


def test_a_release_by_another_signer_is_refused(doc, issued, root_file):
    with pytest.raises(PolicyRefused, match="release 1.4.0 was not signed by"):
        verify_document(with_bundle(doc, issued.bundle), expected_nonce=NONCE, policy=release_policy(root_file, identity=IDENTITY + "x"))


def test_release_pins_and_policy_pins_must_both_hold(doc, issued, root_file):
    claims = claims_of(doc)
    policy = release_policy(root_file)
    other = "11" * 48
    own = replace(policy, tdx=replace(policy.tdx, mr_td=frozenset({other})))
    with pytest.raises(PolicyRefused, match="mr_td differs from policy"):
        verify_document(with_bundle(doc, issued.bundle), expected_nonce=NONCE, policy=own)
    both = replace(policy, tdx=replace(policy.tdx, mr_td=frozenset({other, claims.cpu.mr_td.hex()})))
    assert verify_document(with_bundle(doc, issued.bundle), expected_nonce=NONCE, policy=both).release is not None


def test_a_release_pins_a_real_tdx_measurement(instance, root_file):
    """A real TD whose registers only the release pins counts as pinned; without the release it does not."""
    result = verify_quote((TDX / "cos-113-tdx-quote.dat").read_bytes())
    claims = Claims(tee="tdx", simulated=False, cpu=result.claims)
    values = reference_values_from_claims(claims)
    release = verify_release(
        instance.sign(build_statement(values, version="2.0.0", repository="r", commit=COMMIT, subjects=IMAGE)).json(),
        trusted_root=root_file,
    )
    policy = release_policy(root_file)
    unpinned = "not pinned by the policy"
    assert any(unpinned in e and "mr_td" in e for e in appraise(claims, replace(policy, release=None)).errors)
    verdict = appraise(replace(claims, release=release), policy)
    assert not any(unpinned in e for e in verdict.errors) and not any("differs from release" in e for e in verdict.errors)
    moved = replace(claims, cpu=replace(claims.cpu, rtmrs=(b"\x01" * 48, *claims.cpu.rtmrs[1:])), release=release)
    assert any(e.startswith("rtmr0 differs from release 2.0.0") for e in appraise(moved, policy).errors)


def test_a_release_pins_a_real_sev_snp_guest(instance, root_file):
    """AMD's sample report: a release pinning its MEASUREMENT, HOST_DATA, VMPL and REPORTED_TCB
    as the minimum accepts it; one that requires newer firmware names the part and the release."""
    from datetime import datetime, timezone

    from attestation.sevsnp import load_amd_certificates, verify_report

    snp = Path(__file__).resolve().parent / "data" / "sev-snp"
    chain = [load_amd_certificates((snp / "vcek.testcer").read_bytes())[0], *load_amd_certificates((snp / "milan.testcer").read_bytes())]
    result = verify_report((snp / "attestation.bin").read_bytes(), chain, at=datetime(2026, 6, 1, tzinfo=timezone.utc))
    claims = Claims(tee="sev-snp", simulated=False, cpu=result.claims)
    values = reference_values_from_claims(claims)
    assert values["sev_snp"]["measurement"] == [result.claims.measurement.hex()] and "min_reported_tcb" in values["sev_snp"]
    policy = release_policy(root_file)

    def release_of(values, version):
        statement = build_statement(values, version=version, repository="r", commit=COMMIT, subjects=IMAGE)
        return verify_release(instance.sign(statement).json(), trusted_root=root_file)

    verdict = appraise(replace(claims, release=release_of(values, "3.0.0")), policy)
    assert not any("release 3.0.0" in e or "not pinned" in e for e in verdict.errors), verdict.errors
    newer = copy.deepcopy(values)
    newer["sev_snp"]["min_reported_tcb"]["snp"] = result.claims.reported_tcb.snp + 1
    errors = appraise(replace(claims, release=release_of(newer, "3.1.0")), policy).errors
    assert any(e.startswith("reported_tcb.snp") and "release 3.1.0" in e for e in errors), errors
