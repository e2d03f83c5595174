"""NVIDIA GPU attestation: SPDM parsing, the offline verifier on NVIDIA's real samples at a fixed time
(signature, device chain, nonce, RIMs, measurements), OCSP, and `tee-node gpu verify`."""

from __future__ import annotations

import json
import struct
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from nvidia_support import (
    AT,
    DRIVER_RIM,
    HOPPER_CHAIN,
    HOPPER_REPORT,
    PROD_VBIOS_RIM,
    TEST_CHAIN,
    TEST_REPORT,
    VBIOS_RIM,
    flip,
    issue,
    ocsp_response,
    replace_certificate,
    report_bytes,
    resign_report,
    resign_rim,
    sample_nonce,
    throwaway_device_chain,
)
from server_support import TEE_NODE

from attestation import trust
from attestation.appraisal import Policy, appraise_gpu
from attestation.errors import ChainInvalid, CollateralInvalid, CertificateRevoked, ParseError, SignatureInvalid
from attestation.nvidia import ocsp as gpu_ocsp
from attestation.nvidia import spdm
from attestation.nvidia.rim import verify_rim
from attestation.nvidia.verify import verify_gpu_report

RIM_PAIR = [DRIVER_RIM.read_bytes(), VBIOS_RIM.read_bytes()]


def verify(report: bytes | None = None, chain: bytes | None = None, **kwargs):
    kwargs.setdefault("nonce", sample_nonce())
    kwargs.setdefault("at", AT)
    return verify_gpu_report(report or report_bytes(), chain or TEST_CHAIN.read_bytes(), **kwargs)


def policy_errors(result) -> list[str]:
    """What the default policy says of a bare report."""
    return appraise_gpu(result.claims(0), Policy(), bare=True)


def only_error(result, kind: type | str) -> str:
    """The one error of `result`, which must be of `kind` (an exception class or the name of a reason)."""
    assert len(result.errors) == 1, result.errors
    assert result.errors[0].startswith(getattr(kind, "__name__", kind) + ":"), result.errors
    assert not result.valid
    return result.errors[0]


def offsets(report: bytes) -> dict[str, int]:
    """Where things are in a report, computed from the layout (not from the parser under test)."""
    record_length = int.from_bytes(report[spdm.REQUEST_SIZE + spdm.RESP_RECORD_LENGTH:][:3], "little")
    record = spdm.REQUEST_SIZE + spdm.RESP_RECORD
    opaque_length = record + record_length + spdm.NONCE_SIZE
    return {
        "record": record,
        "first_measurement_value": record + spdm.BLOCK_MEASUREMENT + spdm.DMTF_VALUE,
        "opaque": opaque_length + spdm.OPAQUE_LENGTH_SIZE,
        "signature": len(report) - spdm.SIGNATURE_SIZE,
    }


# --- parser ---


def test_test_report_parses_to_nvidia_fields():
    report = spdm.GpuAttestationReport.from_bytes(report_bytes())
    assert report.request.param2 == spdm.ALL_MEASUREMENTS
    assert report.nonce == sample_nonce()
    response = report.response
    assert len(response.blocks) == 64 and [b.index for b in response.blocks] == list(range(1, 65))
    assert all(len(b.value) == 48 for b in response.blocks)
    opaque = response.opaque
    assert report.driver_version == "545.00"
    assert report.vbios_version == "96.00.5E.00.01"
    assert opaque.text(spdm.OpaqueField.PROJECT) == "1010"
    assert opaque.text(spdm.OpaqueField.PROJECT_SKU) == "0200"
    assert opaque.text(spdm.OpaqueField.CHIP_SKU) == "882"
    assert opaque.fwid is None  # this older firmware does not report it
    assert opaque.nvdec0_disabled
    assert len(opaque.measurement_counts) == 64
    assert len(response.signature) == spdm.SIGNATURE_SIZE


def test_hopper_report_parses_with_its_fwid():
    report = spdm.GpuAttestationReport.from_bytes(report_bytes(HOPPER_REPORT))
    assert report.driver_version == "550.90.07"
    assert report.vbios_version == "96.00.9F.00.01"
    assert len(report.response.opaque.fwid) == 48


def test_vbios_version_spelling():
    assert spdm.format_vbios_version(bytes.fromhex("005e009601000000")) == "96.00.5E.00.01"
    with pytest.raises(ParseError):
        spdm.format_vbios_version(b"\x00" * 7)


def test_report_as_hex_text_or_raw_bytes():
    raw = report_bytes()
    assert spdm.parse_report_text(raw) == raw
    assert spdm.parse_report_text(raw.hex().upper().encode() + b"\n") == raw


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda r: r[:-1], "truncated"),
        (lambda r: r + b"\x00", "follow the response signature"),
        (lambda r: r[:1] + b"\xe1" + r[2:], "not GET_MEASUREMENTS"),
        (lambda r: r[:spdm.REQUEST_SIZE + 1] + b"\x61" + r[spdm.REQUEST_SIZE + 2:], "not MEASUREMENTS"),
        (lambda r: r[:2] + b"\x00" + r[3:], "did not ask for a signature"),
        (lambda r: r[:spdm.REQUEST_SIZE] + b"\x10" + r[spdm.REQUEST_SIZE + 1:], "version"),
        # one block fewer than the record holds
        (lambda r: r[:spdm.REQUEST_SIZE + 4] + b"\x3f" + r[spdm.REQUEST_SIZE + 5:], "blocks take"),
    ],
)
def test_malformed_reports_are_refused_with_a_reason(mutate, reason):
    with pytest.raises(ParseError, match=reason):
        spdm.GpuAttestationReport.from_bytes(mutate(report_bytes()))


def test_opaque_data_without_driver_version_is_unreadable():
    opaque = spdm.OpaqueData.from_bytes(struct.pack("<HH", spdm.OpaqueField.VBIOS_VERSION, 8) + bytes(8))
    with pytest.raises(ParseError, match="DRIVER_VERSION"):
        opaque.driver_version
    with pytest.raises(ParseError, match="repeats"):
        spdm.OpaqueData.from_bytes((struct.pack("<HH", 3, 1) + b"1") * 2)


# --- verifier on the real samples ---


@pytest.mark.parametrize("report, chain", [(TEST_REPORT, TEST_CHAIN), (HOPPER_REPORT, HOPPER_CHAIN)])
def test_both_samples_verify_signature_and_chain(report, chain):
    result = verify(report_bytes(report), chain.read_bytes(), nonce=sample_nonce(report))
    assert result.valid, result.errors
    assert result.model == "GH100"
    assert [trust.common_name(c) for c in result.chain][-1] == "NVIDIA Device Identity CA"
    assert trust.fingerprint(result.chain[-1]) == trust.NVIDIA_DEVICE_IDENTITY_CA_SHA256
    # Without RIMs nothing is compared, and the default policy says so.
    assert (result.measurements, result.measurements_checked) == ("not_checked", 0)
    assert result.ocsp == "unknown"
    assert any("measurements were not checked" in e for e in policy_errors(result))


def test_test_report_matches_every_active_measurement_of_its_rim_pair():
    result = verify(rims=RIM_PAIR)
    assert result.valid, result.errors
    assert result.driver_rim.version == "545.00" and result.vbios_rim.version == "96.00.5E.00.01"
    active = len(result.driver_rim.active) + len(result.vbios_rim.active)
    # NVDEC0 is disabled in this report, so its measurement (35) is not compared (NVIDIA's rule).
    assert result.measurements_checked == active - 1 == 32
    assert result.measurements_matched == 32 and result.measurements_mismatched == ()
    assert result.measurements == "match"
    (refusal,) = policy_errors(result)
    assert refusal.startswith("gpu 0 ocsp status is unknown")


def test_prod_vbios_rim_of_the_same_version_is_refused_naming_the_indices():
    result = verify(rims=[DRIVER_RIM.read_bytes(), PROD_VBIOS_RIM.read_bytes()])
    assert result.valid, result.errors  # every signature holds: the values differ
    assert result.measurements == "mismatch"
    assert result.measurements_mismatched == (1, 2, 3, 9)
    assert any("differ from NVIDIA's RIMs at indices [1, 2, 3, 9]" in e for e in policy_errors(result))


def test_wrong_nonce_fails():
    message = only_error(verify(nonce=bytes(32)), "NonceMismatch")
    assert "different nonce" in message


@pytest.mark.parametrize("where", ["signature", "first_measurement_value", "opaque"])
def test_a_flipped_byte_fails_the_signature(where):
    report = report_bytes()
    tampered = flip(report, offsets(report)[where] + 5)
    spdm.GpuAttestationReport.from_bytes(tampered)  # still well-formed: the signature is what catches it
    assert "does not verify" in only_error(verify(tampered), SignatureInvalid)


def test_a_flipped_byte_in_a_certificate_fails_the_chain():
    pem = TEST_CHAIN.read_bytes()
    der = x509.load_pem_x509_certificates(pem)[1].public_bytes(Encoding.DER)
    tampered = replace_certificate(pem, 1, flip(der, len(der) - 10))  # inside its signature
    result = verify(chain=tampered)
    assert not result.valid
    assert any(e.startswith("SignatureInvalid:") and "GSP BROM" in e for e in result.errors), result.errors


def test_chain_must_end_at_the_pinned_root():
    result = verify(device_roots=[issue("Another Root").cert])
    assert "not a pinned root" in only_error(result, ChainInvalid)


def test_fwid_must_match_the_attestation_certificate():
    hopper = report_bytes(HOPPER_REPORT)
    # The test_no_gpu chain's leaf has another firmware id: a valid report cannot borrow it.
    result = verify(hopper, TEST_CHAIN.read_bytes(), nonce=sample_nonce(HOPPER_REPORT))
    assert any("firmware id" in e for e in result.errors), result.errors


def test_a_flipped_hash_value_in_a_rim_fails_its_signature():
    good = VBIOS_RIM.read_bytes()
    value = b'Hash0="'
    start = good.index(value, good.index(b'index="1"')) + len(value)
    tampered = good[:start] + (b"1" if good[start:start + 1] != b"1" else b"2") + good[start + 1:]
    with pytest.raises(SignatureInvalid, match="Digest mismatch"):
        verify_rim(tampered, at=AT)
    assert "SignatureInvalid" in only_error(verify(rims=[DRIVER_RIM.read_bytes(), tampered]), SignatureInvalid)


def test_rim_signed_outside_nvidias_rim_root_fails():
    root = issue("Throwaway RIM Root")
    leaf = issue("Throwaway RIM Signer", root, ca=False)
    forged = resign_rim(VBIOS_RIM, [leaf, root])
    with pytest.raises(ChainInvalid, match="not a pinned root"):
        verify_rim(forged, at=AT)
    # The forged RIM is otherwise sound: only the root it chains to is wrong.
    assert verify_rim(forged, at=AT, trusted_roots=[root.cert]).version == "96.00.5E.00.01"
    assert "not a pinned root" in only_error(verify(rims=[DRIVER_RIM.read_bytes(), forged]), ChainInvalid)


def test_rim_with_a_second_signature_is_refused():
    good = DRIVER_RIM.read_bytes()
    start, end = good.index(b"<ds:Signature"), good.index(b"</ds:Signature>") + len(b"</ds:Signature>")
    doubled = good[:end] + good[start:end] + good[end:]
    with pytest.raises(ParseError, match="exactly one XML signature"):
        verify_rim(doubled, at=AT)


def test_rims_are_checked_at_the_given_time_not_skipped():
    with pytest.raises(ChainInvalid, match="not valid at"):
        verify_rim(DRIVER_RIM.read_bytes(), at=datetime(2026, 1, 1, tzinfo=timezone.utc))


def test_rim_of_another_version_is_named():
    result = verify(rims=[RIM_PAIR[0], (PROD_VBIOS_RIM.parent / "1010_0200_882_96005E0003_PROD.swidtag").read_bytes()])
    assert "neither the report's driver version" in only_error(result, "RimMismatch")
    assert result.measurements == "not_checked"


def test_pinned_nvidia_roots_match_the_samples():
    assert trust.nvidia_device_roots()[0].subject == x509.load_pem_x509_certificates(TEST_CHAIN.read_bytes())[-1].subject
    assert trust.fingerprint(trust.nvidia_rim_roots()[0]) == trust.NVIDIA_RIM_ROOT_CA_SHA256


# --- OCSP ---


@pytest.fixture
def pki():
    root = issue("Test Root")
    ca = issue("Test CA", root)
    leaf = issue("Test Leaf", ca, ca=False)
    return root, ca, leaf


def check(subjects, responses, at=AT):
    return gpu_ocsp.check_ocsp(subjects, gpu_ocsp.load_responses(responses), at)


def test_ocsp_good_when_every_certificate_has_a_response(pki):
    root, ca, leaf = pki
    subjects = gpu_ocsp.rim_chain_subjects([leaf.cert, ca.cert, root.cert])
    responses = [ocsp_response(leaf.cert, ca.cert, ca), ocsp_response(ca.cert, root.cert, root)]
    assert check(subjects, responses).status == "good"
    partial = check(subjects, responses[:1])
    assert (partial.status, partial.missing) == ("unknown", ("Test CA",))


def test_ocsp_delegated_responder(pki):
    root, ca, leaf = pki
    subjects = gpu_ocsp.rim_chain_subjects([leaf.cert, ca.cert])
    responder = issue("Test OCSP Responder", ca, ca=False, ocsp_signing=True)
    assert check(subjects, [ocsp_response(leaf.cert, ca.cert, responder, include_signer=True)]).status == "good"
    # A certificate of the CA without the OCSP signing purpose is no responder.
    impostor = issue("Test Other", ca, ca=False)
    with pytest.raises(CollateralInvalid, match="not signed by"):
        check(subjects, [ocsp_response(leaf.cert, ca.cert, impostor, include_signer=True)])


@pytest.mark.parametrize(
    "kwargs, error, reason",
    [
        ({"status": ocsp.OCSPCertStatus.REVOKED}, CertificateRevoked, "revoked"),
        ({"status": ocsp.OCSPCertStatus.UNKNOWN}, CollateralInvalid, "does not know"),
    ],
)
def test_ocsp_bad_answers_fail_with_a_reason(pki, kwargs, error, reason):
    root, ca, leaf = pki
    subjects = gpu_ocsp.rim_chain_subjects([leaf.cert, ca.cert])
    with pytest.raises(error, match=reason):
        check(subjects, [ocsp_response(leaf.cert, ca.cert, ca, **kwargs)])


@pytest.mark.parametrize(
    "kwargs",
    [{"next_update": AT - timedelta(minutes=1), "this_update": AT - timedelta(days=1)}, {"next_update": None}],
)
def test_ocsp_out_of_date_counts_as_none(pki, kwargs):
    root, ca, leaf = pki
    subjects = gpu_ocsp.rim_chain_subjects([leaf.cert, ca.cert])
    stale = ocsp_response(leaf.cert, ca.cert, ca, status=ocsp.OCSPCertStatus.REVOKED, **kwargs)
    result = check(subjects, [stale])
    assert (result.status, result.missing, result.stale) == ("unknown", ("Test Leaf",), ("Test Leaf",))
    # ...but it must still be the issuer's: a forged stale answer is an error, not a shrug.
    with pytest.raises(CollateralInvalid, match="not signed by"):
        check(subjects, [ocsp_response(leaf.cert, ca.cert, issue("Forger"), **kwargs)])


def test_ocsp_response_for_nvidia_chain_signed_by_another_key_fails():
    chain = x509.load_pem_x509_certificates(TEST_CHAIN.read_bytes())
    forger = issue("Forger")
    forged = ocsp_response(chain[1], chain[2], forger)  # the right CertID, the wrong signer
    result = verify(ocsp_responses=[forged])
    assert result.ocsp == "invalid"
    assert "is not signed by" in only_error(result, CollateralInvalid)
    with pytest.raises(CollateralInvalid, match="malformed"):
        gpu_ocsp.load_responses([b"not der"])


# --- CLI ---


def gpu_verify(*args: str) -> tuple[int, dict]:
    out = subprocess.run([str(TEE_NODE), "gpu", "verify", *args, "--json"], capture_output=True, text=True, timeout=60)
    return out.returncode, json.loads(out.stdout)


CLI_KEYS = {
    "valid",
    "driver_version",
    "vbios_version",
    "measurements_checked",
    "measurements_matched",
    "measurements_mismatched",
    "ocsp",
    "accepted",
    "policy_errors",
    "errors",
}


def test_cli_with_rims(tmp_path):
    raw = tmp_path / "report.bin"
    raw.write_bytes(report_bytes())  # raw bytes work as well as hex text
    code, out = gpu_verify(
        str(raw), "--cert-chain", str(TEST_CHAIN), "--nonce", sample_nonce().hex(),
        "--rim", str(DRIVER_RIM), "--rim", str(PROD_VBIOS_RIM), "--at", "2024-06-01T00:00:00",
    )
    assert CLI_KEYS <= out.keys()
    assert out["valid"] is True and out["errors"] == []
    assert (out["driver_version"], out["vbios_version"]) == ("545.00", "96.00.5E.00.01")
    assert (out["measurements_checked"], out["measurements_matched"], out["measurements_mismatched"]) == (32, 28, [1, 2, 3, 9])
    assert out["accepted"] is False and code == 1


def test_cli_without_rims_is_not_accepted_and_a_wrong_nonce_is_invalid():
    code, out = gpu_verify(str(HOPPER_REPORT), "--cert-chain", str(HOPPER_CHAIN), "--nonce", sample_nonce(HOPPER_REPORT).hex(), "--at", "2024-06-01")
    assert (code, out["valid"], out["accepted"], out["measurements_checked"]) == (1, True, False, 0)
    assert out["vbios_version"] == "96.00.9F.00.01"
    code, out = gpu_verify(str(HOPPER_REPORT), "--cert-chain", str(HOPPER_CHAIN), "--nonce", "00" * 32, "--at", "2024-06-01")
    assert (code, out["valid"]) == (1, False)
    assert out["errors"][0].startswith("NonceMismatch:")


def test_cli_without_json_prints_readable_lines():
    args = [str(HOPPER_REPORT), "--cert-chain", str(HOPPER_CHAIN), "--nonce", sample_nonce(HOPPER_REPORT).hex(), "--at", "2024-06-01"]
    out = subprocess.run([str(TEE_NODE), "gpu", "verify", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert "valid: yes" in lines and "accepted: no" in lines and "vbios version: 96.00.9F.00.01" in lines
    assert "errors: none" in lines and "policy errors:" in lines
    assert not any(repr_ in out.stdout for repr_ in ("['", "None", "True", "False"))


def test_cli_unreadable_report(tmp_path):
    bad = tmp_path / "bad.hex"
    bad.write_text("11e0")
    code, out = gpu_verify(str(bad), "--cert-chain", str(HOPPER_CHAIN), "--nonce", "00" * 32)
    assert code == 2 and out["errors"][0].startswith("ParseError:")


def test_nvdec0_measurement_is_compared_while_nvdec0_is_enabled():
    report = report_bytes()
    nvdec = struct.pack("<HH", spdm.OpaqueField.NVDEC0_STATUS, 1) + bytes([spdm.NVDEC0_DISABLED])
    at = report.index(nvdec, offsets(report)["opaque"]) + spdm.TLV_HEADER_SIZE
    enabled = report[:at] + b"\xaa" + report[at + 1:]
    chain = throwaway_device_chain()  # the edited report needs a new signature, so a key we hold
    resigned = resign_report(enabled, sample_nonce(), chain[0])
    result = verify(resigned, b"".join(a.pem() for a in chain), rims=RIM_PAIR, device_roots=[chain[-1].cert])
    assert result.valid, result.errors
    assert (result.measurements_checked, result.measurements) == (33, "match")


def test_cli_accepts_under_a_policy_and_exits_0(tmp_path):
    policy = tmp_path / "gpu.toml"
    policy.write_text('[gpu]\nallow_ocsp_unknown = true\nmin_driver_version = "545.00"\nallowed_vbios_versions = ["96.00.5E.00.01"]\n')
    args = [str(TEST_REPORT), "--cert-chain", str(TEST_CHAIN), "--nonce", sample_nonce().hex(), "--at", "2024-06-01",
            "--rim", str(DRIVER_RIM), "--rim", str(VBIOS_RIM)]
    code, out = gpu_verify(*args, "--policy", str(policy))
    assert (code, out["valid"], out["accepted"], out["policy_errors"], out["ocsp"]) == (0, True, True, [], "unknown")
    policy.write_text('[gpu]\nallow_ocsp_unknown = true\nmin_driver_version = "550.54.15"\n')
    code, out = gpu_verify(*args, "--policy", str(policy))
    assert (code, out["accepted"]) == (1, False)
    assert out["policy_errors"] == [
        "gpu 0 driver_version 545.00 is below the policy minimum 550.54.15: have the node's NVIDIA driver updated"
    ]
    policy.write_text("[gpu]\nmin_driver = 1\n")  # a misspelt key is an error, never ignored
    code, out = gpu_verify(*args, "--policy", str(policy))
    assert code == 2 and out["errors"][0].startswith("PolicyError: unknown key(s) in [gpu]")
