"""report_data binding, attestation documents (simulated round trip, tampering) and the quote CLI."""

import argparse
import base64
import dataclasses
import copy
import hashlib
import json
import struct
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from nvidia_support import AT as GPU_AT
from nvidia_support import SampleNvml, throwaway_device_chain

from attestation import binding, cli
from attestation.appraisal import Policy
from attestation.document import build_document, verify_document, verify_evidence
from attestation.errors import (
    ChainInvalid,
    DocumentInvalid,
    GpuEvidenceInvalid,
    NonceMismatch,
    PolicyRefused,
    ReportDataMismatch,
    SignatureInvalid,
)
from attestation.producers.nvml import NvidiaGpuProvider
from attestation.producers.simulated import SimulatedProvider, SimulatedTdx
from attestation.sevsnp import load_amd_certificates

TESTDATA = Path(__file__).resolve().parent / "data"
SEED = b"document-test-seed-0123456789abc"
MEASUREMENT = b"code digest || config digest"
NONCE = bytes(range(32))
DH = b"\xd1" * 32
SIGN = b"\x5e" * 32
MEASURED = {"tee_mode": "simulated", "engine": {"kind": "echo", "models": [{"name": "m"}]}}
CONFIG = hashlib.sha256(json.dumps(MEASURED, sort_keys=True, separators=(",", ":")).encode()).digest()
KEM = bytes(range(256)) * 4 + bytes(160)
TLS = hashlib.sha256(b"certificate").digest()
AT = datetime(2026, 6, 1, tzinfo=timezone.utc)
SIMULATED = Policy(allow_simulated=True)


# NVIDIA's sample GPU report, re-signed for each requested nonce by a throwaway device chain.
GPU_CHAIN = throwaway_device_chain()
GPU_ROOTS = (GPU_CHAIN[-1].cert,)


def FakeGpu():
    return NvidiaGpuProvider(nvml=SampleNvml(device_chain=GPU_CHAIN))


def make_doc(gpu=None, **overrides):
    # Every key epoch of a node has its ML-KEM twin; without one the default policy refuses the document.
    args = dict(nonce=NONCE, dh_public_key=DH, signing_public_key=SIGN, key_epoch=3, measured_config=MEASURED, kem_public_key=KEM)
    args.update(overrides)
    return build_document(SimulatedProvider(MEASUREMENT, seed=SEED), gpu, **args)


# --- binding ---


def test_report_data_follows_the_protocol_byte_for_byte():
    gpu = [{"device": 0, "format": "nvidia-cc", "evidence": "ü"}]
    canonical = json.dumps(gpu, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert binding.canonical_json(gpu) == canonical and "ü".encode() in canonical
    v2_inputs = NONCE + DH + SIGN + struct.pack("<Q", 7) + CONFIG + hashlib.sha256(canonical).digest()
    common = dict(nonce=NONCE, dh_public_key=DH, signing_public_key=SIGN, key_epoch=7, config_digest=CONFIG, gpu_evidence=gpu)
    with_both = binding.report_data(**common, kem_public_key=KEM, tls_cert_sha256=TLS, version=2)
    v2_prefix = b"tee-node/report-data/v2\x00" + v2_inputs
    assert with_both == hashlib.sha512(v2_prefix + hashlib.sha256(KEM).digest() + TLS).digest() and len(with_both) == 64
    # Absent keys commit to SHA-256 of nothing and 32 zero bytes.
    without = binding.report_data(**common, kem_public_key=None, tls_cert_sha256=None, version=2)
    assert without == hashlib.sha512(v2_prefix + hashlib.sha256(b"").digest() + bytes(32)).digest()
    # v3: every v2 input in v2's order, then the public keys' canonical JSON and the workers' (or nothing).
    keys = {"ohttp": "AAEC", "privacy_pass": None}
    keys_json = json.dumps(keys, sort_keys=True, separators=(",", ":")).encode()
    v3_prefix = b"tee-node/report-data/v3\x00" + v2_inputs + hashlib.sha256(KEM).digest() + TLS + hashlib.sha256(keys_json).digest()
    no_workers = binding.report_data(**common, kem_public_key=KEM, tls_cert_sha256=TLS, public_keys=keys)
    assert no_workers == hashlib.sha512(v3_prefix + hashlib.sha256(b"").digest()).digest()
    workers = [{"role": "pipeline-stage-1", "link_public_key": "AA==", "evidence": {"version": 3}}]
    workers_json = json.dumps(workers, sort_keys=True, separators=(",", ":")).encode()
    with_workers = binding.report_data(**common, kem_public_key=KEM, tls_cert_sha256=TLS, public_keys=keys, workers=workers)
    assert with_workers == hashlib.sha512(v3_prefix + hashlib.sha256(workers_json).digest()).digest()
    # An empty list of workers is not the same commitment as no workers.
    assert binding.report_data(**common, kem_public_key=KEM, tls_cert_sha256=TLS, public_keys=keys, workers=[]) != no_workers
    assert binding.gpu_nonce(nonce=NONCE, dh_public_key=DH, signing_public_key=SIGN) == hashlib.sha256(
        b"tee-node/gpu-nonce/v1\x00" + NONCE + DH + SIGN
    ).digest()


def test_report_data_rejects_bad_lengths():
    common = dict(dh_public_key=DH, signing_public_key=SIGN, config_digest=CONFIG, gpu_evidence=[])
    with pytest.raises(ValueError, match="nonce"):
        binding.report_data(nonce=b"x", key_epoch=0, kem_public_key=None, tls_cert_sha256=None, **common)
    with pytest.raises(ValueError, match="key_epoch"):
        binding.report_data(nonce=NONCE, key_epoch=-1, kem_public_key=None, tls_cert_sha256=None, **common)
    with pytest.raises(ValueError, match="kem_public_key"):
        binding.report_data(nonce=NONCE, key_epoch=0, kem_public_key=KEM[:-1], tls_cert_sha256=None, **common)
    with pytest.raises(ValueError, match="tls_cert_sha256"):
        binding.report_data(nonce=NONCE, key_epoch=0, kem_public_key=None, tls_cert_sha256=TLS[:16], **common)
    with pytest.raises(ValueError, match="public_keys"):
        binding.report_data(nonce=NONCE, key_epoch=0, kem_public_key=None, tls_cert_sha256=None, **common)
    with pytest.raises(ValueError, match="v2 binds no"):
        binding.report_data(
            nonce=NONCE, key_epoch=0, kem_public_key=None, tls_cert_sha256=None, version=2, public_keys={}, **common
        )


# --- documents ---


def test_document_has_the_protocol_shape():
    doc = make_doc(kem_public_key=None)
    assert set(doc) == {
        "version", "tee", "simulated", "nonce", "dh_public_key", "signing_public_key", "key_epoch",
        "config_digest", "report_data", "cpu_evidence", "gpu_evidence",
        "kem_public_key", "tls_cert_sha256", "measured_config", "collateral",
        "release_bundle", "public_keys", "workers",
    }
    assert (doc["version"], doc["tee"], doc["simulated"]) == (3, "simulated", True)
    assert (doc["public_keys"], doc["workers"], doc["release_bundle"]) == ({"ohttp": None, "privacy_pass": None}, None, None)
    assert (doc["kem_public_key"], doc["tls_cert_sha256"]) == (None, None)
    assert doc["measured_config"] == MEASURED and doc["collateral"] == {"intel": None, "amd": None, "nvidia": None}
    assert doc["nonce"] == NONCE.hex() and doc["config_digest"] == CONFIG.hex()
    assert base64.b64decode(doc["dh_public_key"]) == DH
    assert doc["cpu_evidence"]["format"] == "tdx-quote" and doc["cpu_evidence"]["certificates"] is None
    assert doc["gpu_evidence"] == []
    json.dumps(doc)  # serialisable as is


def test_simulated_round_trip_is_accepted_only_when_allowed():
    doc = make_doc()
    result = verify_document(doc, expected_nonce=NONCE, policy=SIMULATED)
    assert result.simulated is True and result.tee == "simulated"
    assert result.measurement == hashlib.sha384(MEASUREMENT).hexdigest()
    assert (result.dh_public_key, result.signing_public_key, result.key_epoch, result.config_digest) == (DH, SIGN, 3, CONFIG)
    assert (result.kem_public_key, result.tls_cert_sha256, result.measured_config) == (KEM, None, MEASURED)


def test_a_document_without_a_kem_key_is_refused_unless_classical_is_allowed():
    doc = make_doc(kem_public_key=None)
    with pytest.raises(PolicyRefused) as refused:
        verify_document(doc, expected_nonce=NONCE, policy=SIMULATED)
    assert refused.value.errors == (
        "kem_public_key is missing: the node offers no ML-KEM-768 key, so requests would be protected by X25519 alone "
        "(not post-quantum); refuse it, or, knowingly, pass --allow-classical (require_post_quantum = false)",
    )
    classical = dataclasses.replace(SIMULATED, require_post_quantum=False)
    assert verify_document(doc, expected_nonce=NONCE, policy=classical).kem_public_key is None


def test_kem_key_and_tls_certificate_are_bound():
    doc = make_doc(kem_public_key=KEM, tls_cert_sha256=TLS)
    assert base64.b64decode(doc["kem_public_key"]) == KEM and doc["tls_cert_sha256"] == TLS.hex()
    result = verify_document(doc, expected_nonce=NONCE, policy=SIMULATED)
    assert (result.kem_public_key, result.tls_cert_sha256) == (KEM, TLS)
    for field, value in (
        ("kem_public_key", base64.b64encode(KEM[::-1]).decode()),
        ("kem_public_key", None),
        ("tls_cert_sha256", "00" * 32),
        ("tls_cert_sha256", None),
    ):
        swapped = copy.deepcopy(doc)
        swapped[field] = value
        with pytest.raises(ReportDataMismatch):
            verify_document(swapped, expected_nonce=NONCE, policy=SIMULATED)


def test_measured_config_must_hash_to_the_config_digest():
    doc = make_doc()
    doc["measured_config"] = {**MEASURED, "allow_plaintext": True}
    with pytest.raises(DocumentInvalid, match="measured_config"):
        verify_document(doc, expected_nonce=NONCE, policy=SIMULATED)
    with pytest.raises(DocumentInvalid, match="measured_config"):  # authenticity first, whatever the policy
        verify_document(doc, expected_nonce=NONCE, policy=Policy())


def test_a_simulated_quote_cannot_pass_as_tdx():
    doc = make_doc()
    doc["tee"], doc["simulated"] = "tdx", False
    for policy in (Policy(), SIMULATED, Policy(accept_any_measurement=True)):
        with pytest.raises(DocumentInvalid, match="do not match"):
            verify_document(doc, expected_nonce=NONCE, policy=policy)


def test_simulated_evidence_is_refused_by_the_default_policy():
    with pytest.raises(PolicyRefused, match="tee is simulated") as refused:
        verify_document(make_doc(), expected_nonce=NONCE, policy=Policy())
    assert refused.value.errors == ("tee is simulated, which is not a TEE: pass --allow-simulated (allow_simulated = true) for testing only",)


@pytest.mark.parametrize(
    "field, value",
    [
        ("dh_public_key", base64.b64encode(b"\x01" * 32).decode()),
        ("signing_public_key", base64.b64encode(b"\x02" * 32).decode()),
        ("key_epoch", 4),
        ("measured_config", {"tee_mode": "tdx"}),
    ],
)
def test_a_swapped_field_fails(field, value):
    doc = make_doc()
    doc[field] = value
    doc["config_digest"] = binding.config_digest(doc["measured_config"]).hex()
    with pytest.raises(ReportDataMismatch, match="document report_data"):
        verify_document(doc, expected_nonce=NONCE, policy=SIMULATED)
    # Recomputing the document's report_data does not help: the quote still commits to the old keys.
    doc["report_data"] = binding.report_data(
        nonce=NONCE,
        dh_public_key=base64.b64decode(doc["dh_public_key"]),
        signing_public_key=base64.b64decode(doc["signing_public_key"]),
        key_epoch=doc["key_epoch"],
        config_digest=bytes.fromhex(doc["config_digest"]),
        gpu_evidence=[],
        kem_public_key=KEM,
        tls_cert_sha256=None,
        public_keys=doc["public_keys"],
    ).hex()
    with pytest.raises(ReportDataMismatch, match="evidence's REPORTDATA"):
        verify_document(doc, expected_nonce=NONCE, policy=SIMULATED)


def _as_v2(doc):
    """The same node's answer as a v2 node gives it: no v3 fields, report_data v2, fresh evidence."""
    v2 = {k: v for k, v in doc.items() if k not in ("release_bundle", "public_keys", "workers")}
    report = binding.report_data(
        nonce=NONCE, dh_public_key=DH, signing_public_key=SIGN, key_epoch=v2["key_epoch"],
        config_digest=bytes.fromhex(v2["config_digest"]), gpu_evidence=[],
        kem_public_key=base64.b64decode(v2["kem_public_key"]) if v2["kem_public_key"] else None,
        tls_cert_sha256=None, version=2,
    )
    evidence = SimulatedProvider(MEASUREMENT, seed=SEED).get_evidence(report)
    v2.update(version=2, report_data=report.hex())
    v2["cpu_evidence"] = {**v2["cpu_evidence"], "quote": base64.b64encode(evidence.quote).decode()}
    return v2


def test_v2_documents_still_verify():
    v2 = _as_v2(make_doc())
    result = verify_document(v2, expected_nonce=NONCE, policy=SIMULATED)
    assert (result.version, result.public_keys, result.workers, result.release_bundle) == (
        2, {"ohttp": None, "privacy_pass": None}, None, None,
    )
    # A v2 document relabelled as v3 lacks the v3 fields; given them, its report_data no longer matches.
    with pytest.raises(DocumentInvalid, match="public_keys"):
        verify_document({**v2, "version": 3}, expected_nonce=NONCE, policy=SIMULATED)
    relabelled = {**v2, "version": 3, "public_keys": {"ohttp": None, "privacy_pass": None}, "workers": None, "release_bundle": None}
    with pytest.raises(ReportDataMismatch):
        verify_document(relabelled, expected_nonce=NONCE, policy=SIMULATED)
    with pytest.raises(DocumentInvalid, match="version 2 or 3"):
        verify_document({**v2, "version": 4}, expected_nonce=NONCE, policy=SIMULATED)


def test_public_keys_are_bound_into_report_data():
    keys = {"ohttp": base64.b64encode(b"ohttp key configuration").decode(), "privacy_pass": None}
    doc = make_doc(public_keys=keys)
    assert verify_document(doc, expected_nonce=NONCE, policy=SIMULATED).public_keys == keys
    for swapped in ({**keys, "ohttp": base64.b64encode(b"the operator's other key").decode()}, {**keys, "ohttp": None},
                    {**keys, "privacy_pass": base64.b64encode(b"a per-user token key").decode()}):
        with pytest.raises(ReportDataMismatch, match="document report_data"):
            verify_document({**doc, "public_keys": swapped}, expected_nonce=NONCE, policy=SIMULATED)
    for malformed, reason in (({**keys, "extra": None}, "exactly the keys"), ({"ohttp": None}, "exactly the keys"),
                              ({**keys, "ohttp": "not base64!"}, "base64"), ([], "public_keys")):
        with pytest.raises(DocumentInvalid, match=reason):
            verify_document({**doc, "public_keys": malformed}, expected_nonce=NONCE, policy=SIMULATED)


def test_release_bundle_is_shape_checked_but_not_bound():
    doc = make_doc(release_bundle={"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"})
    assert verify_document(doc, expected_nonce=NONCE, policy=SIMULATED).release_bundle == doc["release_bundle"]
    # Unbound: another bundle does not break the binding (its own signatures are what authenticate it).
    other = {**doc, "release_bundle": {"mediaType": "other"}}
    assert verify_document(other, expected_nonce=NONCE, policy=SIMULATED).release_bundle == {"mediaType": "other"}
    with pytest.raises(DocumentInvalid, match="release_bundle"):
        verify_document({**doc, "release_bundle": "a string"}, expected_nonce=NONCE, policy=SIMULATED)
    without = dict(doc)
    del without["release_bundle"]
    with pytest.raises(DocumentInvalid, match="release_bundle"):
        verify_document(without, expected_nonce=NONCE, policy=SIMULATED)


def test_workers_are_bound_and_malformed_workers_refused():
    empty = make_doc(workers=[])
    assert verify_document(empty, expected_nonce=NONCE, policy=SIMULATED).workers == []
    with pytest.raises(ReportDataMismatch):  # [] and null are different commitments
        verify_document({**empty, "workers": None}, expected_nonce=NONCE, policy=SIMULATED)
    with pytest.raises(DocumentInvalid, match="workers"):
        verify_document({**empty, "workers": ["not an object"]}, expected_nonce=NONCE, policy=SIMULATED)
    # An entry without the challenge its evidence answers cannot be checked: refused, not skipped.
    worker = {"role": "pipeline-stage-1", "link_public_key": base64.b64encode(bytes(32)).decode(), "evidence": make_doc()}
    with pytest.raises(DocumentInvalid, match="challenge"):
        verify_document(make_doc(workers=[worker]), expected_nonce=NONCE, policy=SIMULATED)


def test_a_different_nonce_fails():
    doc = make_doc()
    other = b"\xee" * 32
    with pytest.raises(NonceMismatch):
        verify_document(doc, expected_nonce=other, policy=SIMULATED)
    doc["nonce"] = other.hex()  # replaying old evidence under the verifier's new nonce
    with pytest.raises(ReportDataMismatch):
        verify_document(doc, expected_nonce=other, policy=SIMULATED)


def test_a_tampered_quote_fails():
    doc = make_doc()
    quote = bytearray(base64.b64decode(doc["cpu_evidence"]["quote"]))
    quote[48 + 136] ^= 1  # MRTD
    doc["cpu_evidence"]["quote"] = base64.b64encode(bytes(quote)).decode()
    with pytest.raises(SignatureInvalid):
        verify_document(doc, expected_nonce=NONCE, policy=SIMULATED)


def test_a_quote_from_another_simulated_root_still_needs_the_binding():
    # Another seed is another simulated "platform"; it is accepted as simulated, but only for its own binding.
    doc = make_doc()
    other = SimulatedTdx.from_seed(SEED[::-1]).quote(bytes(64), MEASUREMENT)
    doc["cpu_evidence"]["quote"] = base64.b64encode(other).decode()
    with pytest.raises(ReportDataMismatch):
        verify_document(doc, expected_nonce=NONCE, policy=SIMULATED)


def test_measurement_policy():
    doc = make_doc()
    good = hashlib.sha384(MEASUREMENT).hexdigest().upper()
    assert verify_document(doc, expected_nonce=NONCE, policy=SIMULATED.with_measurements({good}))
    with pytest.raises(PolicyRefused, match="mr_td differs from policy"):
        verify_document(doc, expected_nonce=NONCE, policy=SIMULATED.with_measurements({"00" * 48}))


def test_malformed_documents_are_refused():
    for mutate in (
        lambda d: d.pop("dh_public_key"),
        lambda d: d.update(dh_public_key="not base64!"),
        lambda d: d.update(dh_public_key=base64.urlsafe_b64encode(b"\xff" * 32).decode()),
        lambda d: d.update(key_epoch=True),
        lambda d: d.update(version=1),
        lambda d: d.pop("kem_public_key"),
        lambda d: d.update(kem_public_key=base64.b64encode(b"k" * 32).decode()),
        lambda d: d.update(tls_cert_sha256="zz" * 32),
        lambda d: d.pop("collateral"),
        lambda d: d.update(collateral={"intel": None, "amd": None}),
        lambda d: d.update(measured_config=[]),
        lambda d: d.update(tee="sgx"),
        lambda d: d["cpu_evidence"].update(format="sev-snp-report"),
    ):
        doc = make_doc()
        mutate(doc)
        with pytest.raises(DocumentInvalid):
            verify_document(doc, expected_nonce=NONCE, policy=SIMULATED)


def test_gpu_evidence_must_verify_then_is_appraised():
    doc = make_doc(gpu=FakeGpu())
    assert len(doc["gpu_evidence"]) == 1
    # Present evidence must verify, GPUs required or not: this chain does not end at NVIDIA's root.
    with pytest.raises(GpuEvidenceInvalid, match="not a pinned root"):
        verify_document(doc, expected_nonce=NONCE, policy=SIMULATED, at=GPU_AT)
    verified = verify_evidence(doc, expected_nonce=NONCE, at=GPU_AT, gpu_device_roots=GPU_ROOTS)
    assert verified.gpu_devices == 1 and verified.gpu_verified
    (gpu,) = verified.claims.gpus
    assert (gpu.device, gpu.model, gpu.driver_version, gpu.vbios_version) == (0, "GH100", "545.00", "96.00.5E.00.01")
    assert (gpu.cc_mode, gpu.ready, gpu.measurements, gpu.ocsp) == ("on", True, "not_checked", "unknown")
    # Every GPU that came with the node is appraised: no RIMs and no OCSP answers, so refused.
    with pytest.raises(PolicyRefused) as info:
        verify_document(doc, expected_nonce=NONCE, policy=SIMULATED, at=GPU_AT, gpu_device_roots=GPU_ROOTS)
    assert [e.split(" ")[:3] for e in info.value.errors] == [["gpu", "0", "measurements"], ["gpu", "0", "ocsp"]]
    with pytest.raises(PolicyRefused, match="the node sent none"):
        verify_document(make_doc(), expected_nonce=NONCE, policy=Policy(allow_simulated=True, require_gpu=True))


def test_unreadable_gpu_evidence_is_refused():
    entry = {"format": "nvidia-cc", "device": 0, "evidence": base64.b64encode(b"\x11\xe0").decode(), "certificate": "Y2VydA=="}
    doc = make_doc(gpu=type("Broken", (), {"get_evidence": lambda self, n: [entry]})())
    with pytest.raises(GpuEvidenceInvalid, match="GPU 0 evidence is unreadable"):
        verify_document(doc, expected_nonce=NONCE, policy=SIMULATED)


def test_gpu_evidence_is_covered_by_report_data_and_nonce():
    doc = make_doc(gpu=FakeGpu())
    dropped = copy.deepcopy(doc)
    dropped["gpu_evidence"] = []
    with pytest.raises(ReportDataMismatch):
        verify_evidence(dropped, expected_nonce=NONCE, at=GPU_AT, gpu_device_roots=GPU_ROOTS)
    # Evidence made for another nonce, correctly re-bound into report_data by a lying node, is still caught.
    stale = FakeGpu().get_evidence(b"\x00" * 32)
    doc = build_document(
        SimulatedProvider(MEASUREMENT, seed=SEED),
        type("Replay", (), {"get_evidence": lambda self, n: stale})(),
        nonce=NONCE, dh_public_key=DH, signing_public_key=SIGN, key_epoch=3, measured_config=MEASURED, kem_public_key=KEM,
    )
    with pytest.raises(GpuEvidenceInvalid, match="NonceMismatch"):
        verify_evidence(doc, expected_nonce=NONCE, at=GPU_AT, gpu_device_roots=GPU_ROOTS)


def _real_doc(fmt, quote, certificates=None, tee="tdx"):
    doc = make_doc()
    doc.update(tee=tee, simulated=False)
    doc["cpu_evidence"] = {"format": fmt, "quote": base64.b64encode(quote).decode(), "certificates": certificates}
    return doc


def test_real_tdx_evidence_is_verified_then_refused_for_its_binding():
    quote = (TESTDATA / "tdx" / "tdx_prod_quote_SPR_E4.dat").read_bytes()
    with pytest.raises(ReportDataMismatch, match="evidence's REPORTDATA"):
        verify_document(_real_doc("tdx-quote", quote), expected_nonce=NONCE, policy=Policy(), at=AT)
    with pytest.raises(ReportDataMismatch):  # authenticity is checked before any policy
        verify_document(_real_doc("tdx-quote", quote), expected_nonce=NONCE, policy=Policy(allowed_tees=frozenset({"sev-snp"})), at=AT)


def test_real_snp_evidence_is_verified_then_refused_for_its_binding():
    snp = TESTDATA / "sev-snp"
    report = (snp / "attestation.bin").read_bytes()
    vcek = load_amd_certificates((snp / "vcek.testcer").read_bytes())[0].public_bytes(Encoding.PEM).decode()
    pem = vcek + (snp / "milan.testcer").read_text()
    with pytest.raises(ReportDataMismatch, match="evidence's REPORTDATA"):
        verify_document(_real_doc("sev-snp-report", report, pem, "sev-snp"), expected_nonce=NONCE, policy=Policy(), at=AT)
    with pytest.raises(ChainInvalid, match="no VCEK supplied"):
        verify_document(_real_doc("sev-snp-report", report, None, "sev-snp"), expected_nonce=NONCE, policy=Policy(), at=AT)


# --- CLI ---


def run_cli(capsys, *argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    code = cli.run(parser.parse_args([*map(str, argv), "--json"]))
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "name, version, mrtd",
    [
        ("tdx_prod_quote_SPR_E4.dat", 4, "6363b8043668a3ad"),
        ("cos-113-tdx-quote.dat", 4, "dae67181d3d65e07"),
        ("quote_v5_sample.dat", 5, "7348651a34b2d2d3"),
    ],
)
def test_cli_verifies_tdx_samples(capsys, name, version, mrtd):
    code, out = run_cli(capsys, TESTDATA / "tdx" / name, "--at", "2026-06-01T00:00:00Z")
    # Authentic, but refused by the default policy: nothing is pinned and without collateral the TCB is Unknown.
    assert code == 1 and out["valid"] is True and out["errors"] == [] and out["accepted"] is False
    assert out["tcb_status"] == "Unknown" and out["claims"]["tcb_status"] == "Unknown"
    assert (out["tee"], out["version"], out["simulated"]) == ("tdx", version, False)
    assert out["measurement"].startswith(mrtd) and len(out["report_data"]) == 128
    assert out["claims"]["mr_td"] == out["measurement"] and out["claims"]["rtmrs"] == out["rtmrs"]
    for key in ("mr_config_id", "mr_owner", "mr_seam", "td_attributes", "xfam"):
        assert out[key] == out["claims"][key]
    assert out["debug"] is False and len(out["fmspc"]) == 12


def test_cli_snp_needs_a_vcek(capsys):
    snp = TESTDATA / "sev-snp"
    code, out = run_cli(capsys, snp / "attestation.bin")
    assert code == 1 and out["valid"] is False and "no VCEK supplied" in out["errors"][0]
    assert out["report_data"].startswith("0102030405") and out["version"] == 2
    code, out = run_cli(capsys, snp / "attestation.bin", "--at", "2026-06-01", "--certs", snp / "vcek.testcer", snp / "milan.testcer")
    assert code == 1 and out["valid"] is True and out["tee"] == "sev-snp" and out["accepted"] is False
    assert out["claims"]["product"] == "Milan" and out["claims"]["debug"] is True
    assert any(e.startswith("debug is allowed by the guest policy") for e in out["policy_errors"])


def test_cli_simulated_quote_and_flags(capsys, tmp_path):
    path = tmp_path / "quote.bin"
    path.write_bytes(SimulatedTdx.from_seed(SEED).quote(b"\x09" * 64, MEASUREMENT))
    code, out = run_cli(capsys, path)
    assert code == 1 and out["valid"] is True and out["simulated"] is True and out["accepted"] is False
    assert out["policy_errors"][0].startswith("tee is simulated")
    code, out = run_cli(capsys, path, "--allow-simulated")
    assert code == 0 and out["valid"] is True and out["simulated"] is True and out["accepted"] is True
    assert out["report_data"] == "09" * 64


def test_cli_tampered_and_unknown_files(capsys, tmp_path):
    data = bytearray((TESTDATA / "tdx" / "tdx_prod_quote_SPR_E4.dat").read_bytes())
    data[200] ^= 1
    (tmp_path / "bad.dat").write_bytes(bytes(data))
    code, out = run_cli(capsys, tmp_path / "bad.dat", "--at", "2026-06-01T00:00:00+00:00")
    assert code == 1 and "SignatureInvalid" in out["errors"][0]
    (tmp_path / "junk").write_bytes(b"hello")
    assert run_cli(capsys, tmp_path / "junk")[0] == 2
    assert run_cli(capsys, tmp_path / "missing")[0] == 2


def test_cli_collateral_and_text_output(capsys):
    code = cli.quote_verify(
        TESTDATA / "tdx" / "tdx_prod_quote_SPR_E4.dat",
        at=datetime(2023, 6, 20, tzinfo=timezone.utc),
        collateral=TESTDATA / "tdx",
    )
    out = capsys.readouterr().out
    assert code == 1 and "tcb status: TCBNotSupported" in out and "valid: yes" in out and "accepted: no" in out
    # Lines for a person, not Python's reprs of lists, None and booleans.
    assert not any(repr_ in out for repr_ in ("['", "None", "True", "False"))
    assert "policy errors:\n  - " in out
