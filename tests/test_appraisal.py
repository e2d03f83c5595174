"""Appraisal: default-deny policy, policy files, `quote verify` and `policy from-quote`.

On the real samples with the sample Intel collateral at fixed times.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from attestation import cli, sevsnp, tdx
from attestation.appraisal import (
    INTEL_TD_QE_MR_SIGNER,
    TDX_PINS,
    GpuPolicy,
    Policy,
    PolicyError,
    SnpPolicy,
    TdxPolicy,
    appraise,
    appraise_gpu,
    load_policy,
    policy_from_claims,
)
from attestation.claims import Claims, GpuClaims
from attestation.intel import IntelCollateral

TESTDATA = Path(__file__).resolve().parent / "data"
TDX = TESTDATA / "tdx"
SNP = TESTDATA / "sev-snp"
SAMPLE = TDX / "tdx_prod_quote_SPR_E4.dat"
COLLATERAL_AT = "2023-06-20T00:00:00Z"  # inside the sample collateral's validity
EXPIRED_AT = "2023-07-20T00:00:00Z"  # after every sample collateral's nextUpdate (CRLs, QE identity, TCB info)
CHAIN_AT = datetime(2026, 6, 1, tzinfo=timezone.utc)


def sample_claims(collateral: bool = True) -> Claims:
    at = datetime(2023, 6, 20, tzinfo=timezone.utc) if collateral else CHAIN_AT
    result = tdx.verify_quote(SAMPLE.read_bytes(), at=at, collateral=IntelCollateral.from_directory(TDX) if collateral else None)
    return Claims(tee="tdx", simulated=False, cpu=result.claims)


def pinned_policy(path: Path, extra: str = "") -> Path:
    """A policy written by `tee-node policy from-quote` for the sample, plus `extra` lines in [tdx].

    The sample's TD runs without SEPT_VE_DISABLE: from-quote says so in a comment, and the policy
    accepts it here (allow_sept_ve) so that each test sees only the refusal it is about."""
    out = io.StringIO()
    assert cli.policy_from_quote(SAMPLE, at=datetime(2023, 6, 20, tzinfo=timezone.utc), collateral=TDX, stdout=out) == 0
    assert "# allow_sept_ve = true" in out.getvalue()
    path.write_text(out.getvalue().replace("[tdx]\n", f"[tdx]\nallow_sept_ve = true\n{extra}"))
    return path


def verify(capsys, *argv) -> tuple[int, dict, str]:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    code = cli.run(parser.parse_args([*map(str, argv), "--json"]))
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


# --- the real samples, through `tee-node quote verify` ---


def test_sample_tcb_status_is_computed_and_refused_by_default(capsys, tmp_path):
    policy = pinned_policy(tmp_path / "p.toml")
    code, out, _ = verify(capsys, SAMPLE, "--collateral", TDX, "--at", COLLATERAL_AT, "--policy", policy)
    assert out["valid"] is True and out["tcb_status"] == "TCBNotSupported"
    assert code == 1 and out["accepted"] is False
    assert out["policy_errors"] == [
        "tcb_status TCBNotSupported is not allowed by policy: have the platform updated, or, after reading "
        "its advisories, list 'TCBNotSupported' in [tdx] allowed_tcb_status"
    ]


def test_a_policy_listing_the_status_accepts(capsys, tmp_path):
    policy = pinned_policy(tmp_path / "p.toml")
    policy.write_text(policy.read_text().replace('allowed_tcb_status = ["UpToDate"]', 'allowed_tcb_status = ["UpToDate", "TCBNotSupported"]'))
    code, out, err = verify(capsys, SAMPLE, "--collateral", TDX, "--at", COLLATERAL_AT, "--policy", policy)
    assert (code, out["valid"], out["accepted"], out["policy_errors"]) == (0, True, True, [])
    assert err == ""  # no warning: everything is pinned


@pytest.mark.parametrize("register", TDX_PINS)
def test_a_wrong_pin_of_any_register_refuses_and_names_it(capsys, tmp_path, register):
    policy = pinned_policy(tmp_path / "p.toml")
    text = policy.read_text().replace('allowed_tcb_status = ["UpToDate"]', 'allowed_tcb_status = ["TCBNotSupported"]')
    size = 8 if register in ("td_attributes", "xfam") else 48
    lines = [f'{register} = ["{"ab" * size}"]' if line.startswith(f"{register} = ") else line for line in text.splitlines()]
    policy.write_text("\n".join(lines) + "\n")
    code, out, _ = verify(capsys, SAMPLE, "--collateral", TDX, "--at", COLLATERAL_AT, "--policy", policy)
    assert code == 1 and out["valid"] is True and out["accepted"] is False
    assert len(out["policy_errors"]) == 1
    assert out["policy_errors"][0].startswith(f"{register} differs from policy: the node reports ")


def test_expired_collateral_refuses(capsys, tmp_path):
    policy = pinned_policy(tmp_path / "p.toml", 'allowed_tcb_status = ["TCBNotSupported"]\n')
    policy.write_text(policy.read_text().replace('allowed_tcb_status = ["UpToDate"]\n', ""))
    code, out, _ = verify(capsys, SAMPLE, "--collateral", TDX, "--at", EXPIRED_AT, "--policy", policy)
    assert code == 1 and out["valid"] is False and out["accepted"] is False
    assert "not current at 2023-07-20" in out["errors"][0]


def test_an_unpinned_real_quote_is_refused_without_accept_any_measurement(capsys, tmp_path):
    policy = tmp_path / "tcb-only.toml"
    policy.write_text('[tdx]\nallowed_tcb_status = ["TCBNotSupported"]\nallow_sept_ve = true\n')
    code, out, err = verify(capsys, SAMPLE, "--collateral", TDX, "--at", COLLATERAL_AT, "--policy", policy)
    assert code == 1 and out["valid"] is True
    assert out["policy_errors"] == [
        "mr_td, rtmr0, rtmr1, rtmr2, rtmr3 are not pinned by the policy, so any code could be running: pin them "
        "all (tee-node policy from-quote prints them; --pin NAME=HEX on attest and chat; or a [release] whose "
        "reference_values pin them), or pass --accept-any-measurement"
    ]
    assert err == ""
    for _ in range(2):  # the warning comes on every use
        code, out, err = verify(capsys, SAMPLE, "--collateral", TDX, "--at", COLLATERAL_AT, "--policy", policy, "--accept-any-measurement")
        assert code == 0 and out["accepted"] is True
        assert err == cli.ACCEPT_ANY_WARNING
        assert out["policy_warnings"] == [
            "mr_td, rtmr0, rtmr1, rtmr2, rtmr3 are not pinned: any code on this TEE is accepted (accept_any_measurement)"
        ]


def test_without_collateral_the_status_is_unknown_and_refused(capsys, tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text("[tdx]\nallow_sept_ve = true\n")
    code, out, _ = verify(capsys, SAMPLE, "--at", "2026-06-01T00:00:00Z", "--accept-any-measurement", "--policy", policy)
    assert code == 1 and out["valid"] is True and out["tcb_status"] == "Unknown"
    assert out["policy_errors"] == [
        "tcb_status is Unknown: no Intel collateral came with the evidence; give current Intel collateral signed by "
        "Intel's TCB Signing certificate (--collateral DIR with tcb_signing_chain.pem) or, knowingly, list 'Unknown' "
        "in [tdx] allowed_tcb_status"
    ]


# --- appraise on claims ---


def test_revoked_is_refused_even_when_listed():
    claims = sample_claims()
    revoked = dataclasses.replace(claims, cpu=dataclasses.replace(claims.cpu, tcb_status="Revoked"))
    policy = Policy(accept_any_measurement=True, tdx=TdxPolicy(allow_sept_ve=True, allowed_tcb_status=frozenset({"Revoked", "UpToDate"})))
    verdict = appraise(revoked, policy)
    assert not verdict.accepted and verdict.errors[0].startswith("tcb_status is Revoked")


def test_the_quoting_enclave_identity_is_checked_without_collateral():
    claims = sample_claims(collateral=False)
    assert claims.cpu.qe_mr_signer == INTEL_TD_QE_MR_SIGNER
    lenient = Policy(accept_any_measurement=True, tdx=TdxPolicy(allow_sept_ve=True, allowed_tcb_status=frozenset({"Unknown"})))
    assert appraise(claims, lenient).accepted
    for change, named in (
        ({"qe_mr_signer": bytes(32)}, "qe_mr_signer"),
        ({"qe_isv_prod_id": 1}, "qe_isv_prod_id"),
        ({"qe_attributes": bytes.fromhex("13") + claims.cpu.qe_attributes[1:]}, "qe_attributes"),  # DEBUG QE
        ({"qe_vendor_id": bytes(16)}, "qe_vendor_id"),
    ):
        verdict = appraise(dataclasses.replace(claims, cpu=dataclasses.replace(claims.cpu, **change)), lenient)
        assert not verdict.accepted and named in verdict.errors[0]


def test_a_debug_td_is_refused_unless_allowed():
    claims = sample_claims()
    debug = dataclasses.replace(claims, cpu=dataclasses.replace(claims.cpu, td_attributes=b"\x01" + claims.cpu.td_attributes[1:]))
    assert debug.cpu.debug and not claims.cpu.debug
    policy = Policy(accept_any_measurement=True, tdx=TdxPolicy(allow_sept_ve=True, allowed_tcb_status=frozenset({"TCBNotSupported"})))
    assert appraise(claims, policy).accepted
    assert appraise(debug, policy).errors[0].startswith("debug is set in td_attributes")
    assert appraise(debug, dataclasses.replace(policy, tdx=dataclasses.replace(policy.tdx, allow_debug=True))).accepted


def test_snp_sample_is_appraised_on_its_own_claims():
    result = sevsnp.verify_report(SNP.joinpath("attestation.bin").read_bytes(),
                                  sevsnp.load_amd_certificates(SNP.joinpath("vcek.testcer").read_bytes()), at=CHAIN_AT)
    claims = Claims(tee="sev-snp", simulated=False, cpu=result.claims)
    assert [e.split(":")[0] for e in appraise(claims, Policy()).errors] == [
        "debug is allowed by the guest policy",
        "tcb_status is Unknown",
        "measurement is not pinned by the policy, so any code could be running",
    ]
    good = Policy(sev_snp=SnpPolicy(
        measurement=frozenset({claims.cpu.measurement.hex()}), allow_debug=True, vmpl=frozenset({0}),
        allowed_tcb_status=frozenset({"Unknown"}), min_reported_tcb={"bootloader": 2, "snp": 5, "microcode": 0x44},
    ))
    assert appraise(claims, good).accepted
    stricter = dataclasses.replace(good, sev_snp=dataclasses.replace(good.sev_snp, min_reported_tcb={"snp": 8}, vmpl=frozenset({1})))
    verdict = appraise(claims, stricter)
    assert verdict.tcb_status == "OutOfDate"
    assert verdict.errors == (
        "reported_tcb.snp 5 is below the policy minimum 8: have the host's firmware updated",
        "vmpl 0 is not allowed by policy (1): the report was requested at another privilege level than the guest's own "
        "(VMPL 0 unless an SVSM runs below it); refuse it, or, if the guest runs under an SVSM, list 0 in [sev_snp] vmpl",
    )


def test_config_digest_pin():
    claims = dataclasses.replace(sample_claims(), config_digest=b"\x01" * 32, kem_public_key=b"\x02" * 1184)
    base = Policy(accept_any_measurement=True, tdx=TdxPolicy(allow_sept_ve=True, allowed_tcb_status=frozenset({"TCBNotSupported"})))
    assert appraise(claims, dataclasses.replace(base, config_digest=frozenset({"01" * 32}))).accepted
    assert appraise(claims, dataclasses.replace(base, config_digest=frozenset({"02" * 32}))).errors[0].startswith(
        "config_digest differs from policy"
    )
    bare = dataclasses.replace(claims, config_digest=None)
    assert "bare evidence carries none" in appraise(bare, dataclasses.replace(base, config_digest=frozenset({"01" * 32}))).errors[0]


def test_require_gpu_refuses_a_node_without_gpus():
    base = Policy(accept_any_measurement=True, tdx=TdxPolicy(allow_sept_ve=True, allowed_tcb_status=frozenset({"TCBNotSupported"})))
    assert appraise(sample_claims(), base).accepted
    assert "sent none" in appraise(sample_claims(), dataclasses.replace(base, require_gpu=True)).errors[0]


# --- policy files ---


def test_policy_file_round_trip_and_strictness(tmp_path):
    path = pinned_policy(tmp_path / "p.toml")
    policy = load_policy(path)
    assert policy.tdx.mr_td == frozenset({sample_claims().cpu.mr_td.hex()}) and not policy.allow_simulated
    assert load_policy(path) == Policy.from_mapping(__import__("tomllib").loads(path.read_text()))
    for text, message in (
        ('[tdx]\nmr_tdd = ["00"]\n', "unknown key"),
        ('mr_td = "00"\n', "unknown key"),
        ('[tdx]\nmr_td = "abc"\n', "96 hex"),
        ('[sev_snp]\nhost_data = ["' + "00" * 48 + '"]\n', "64 hex"),
        ('[sev_snp]\nvmpl = 4\n', "0-3"),
        ('[sev_snp]\nmin_reported_tcb = { sn = 1 }\n', "unknown key"),
        ("allow_simulated = 1\n", "true or false"),
        ('allowed_tees = ["sgx"]\n', "allowed_tees"),
        ("[tdx\n", "not valid TOML"),
    ):
        path.write_text(text)
        with pytest.raises(PolicyError, match=message):
            load_policy(path)


def test_policy_from_claims_pins_snp_registers():
    result = sevsnp.verify_report(SNP.joinpath("attestation.bin").read_bytes(),
                                  sevsnp.load_amd_certificates(SNP.joinpath("vcek.testcer").read_bytes()), at=CHAIN_AT)
    claims = Claims(tee="sev-snp", simulated=False, cpu=result.claims)
    policy = Policy.from_mapping(__import__("tomllib").loads(policy_from_claims(claims)))
    assert policy.sev_snp.measurement == frozenset({claims.cpu.measurement.hex()})
    assert policy.sev_snp.min_reported_tcb == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 0x44}
    assert policy.sev_snp.vmpl == frozenset({0})


def test_from_quote_refuses_evidence_that_does_not_verify(tmp_path):
    data = bytearray(SAMPLE.read_bytes())
    data[200] ^= 1
    (tmp_path / "bad.dat").write_bytes(bytes(data))
    out, err = io.StringIO(), io.StringIO()
    assert cli.policy_from_quote(tmp_path / "bad.dat", at=CHAIN_AT, stdout=out, stderr=err) == 1
    assert out.getvalue() == "" and "does not verify" in err.getvalue()


def test_verifiers_do_not_import_the_simulated_tee():
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    probe = "import sys, attestation.document, attestation.cli, node.client; print(sorted(m for m in sys.modules if 'producers' in m))"
    loaded = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert loaded.stdout.strip() == "[]"
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter), "--contract", "verifiers-without-producers"], env=env, capture_output=True, text=True, cwd=root)
    assert result.returncode == 0 and "KEPT" in result.stdout, result.stdout + result.stderr


# --- GPUs ---

GPU = GpuClaims(
    device=1, model="GH100", driver_version="550.90.07", vbios_version="96.00.9F.00.01", measurements="match",
    measurements_checked=33, measurements_mismatched=(), ocsp="good", cc_mode="on", ready=True,
)


def gpu_errors(gpu: GpuClaims = GPU, **gpu_policy) -> list[str]:
    base = Policy(accept_any_measurement=True, tdx=TdxPolicy(allow_sept_ve=True, allowed_tcb_status=frozenset({"TCBNotSupported"})))
    claims = dataclasses.replace(sample_claims(), gpu_evidence=1, gpus=(gpu,))
    return list(appraise(claims, dataclasses.replace(base, gpu=GpuPolicy(**gpu_policy))).errors)


def test_gpu_appraisal_rules():
    assert gpu_errors() == []
    assert gpu_errors(min_driver_version="550.90.07", allowed_vbios_versions=frozenset({"96.00.9F.00.01"})) == []
    (error,) = gpu_errors(allowed_vbios_versions=frozenset({"96.00.5E.00.01"}))
    assert error.startswith("gpu 1 vbios_version 96.00.9F.00.01 is not in [gpu] allowed_vbios_versions")
    assert "below the policy minimum 550.100" in gpu_errors(min_driver_version="550.100")[0]  # numbers, not text
    assert "differ from NVIDIA's RIMs at indices [4, 9]" in gpu_errors(
        dataclasses.replace(GPU, measurements="mismatch", measurements_mismatched=(4, 9))
    )[0]
    assert "were not checked" in gpu_errors(dataclasses.replace(GPU, measurements="not_checked", measurements_checked=0))[0]
    unknown = dataclasses.replace(GPU, ocsp="unknown", ocsp_missing=("NVIDIA GH100 Identity",))
    assert "ocsp status is unknown" in gpu_errors(unknown)[0] and "NVIDIA GH100 Identity" in gpu_errors(unknown)[0]
    assert gpu_errors(unknown, allow_ocsp_unknown=True) == []
    for cc_mode in ("devtools", None):
        assert "cc_mode is" in gpu_errors(dataclasses.replace(GPU, cc_mode=cc_mode))[0]
    assert "not reported ready" in gpu_errors(dataclasses.replace(GPU, ready=None))[0]
    # A bare report (tee-node gpu verify) has no node to report CC mode and readiness.
    assert appraise_gpu(dataclasses.replace(GPU, cc_mode=None, ready=None), Policy(), bare=True) == []


def test_gpu_policy_table_is_strict():
    assert Policy.from_mapping({"gpu": {"allowed_vbios_versions": ["96.00.9f.00.01"]}}).gpu.allowed_vbios_versions == {
        "96.00.9F.00.01"
    }
    for table in ({"min_driver": "550"}, {"min_driver_version": 550}, {"min_driver_version": "r550"}, {"allow_ocsp_unknown": "yes"}):
        with pytest.raises(PolicyError):
            Policy.from_mapping({"gpu": table})
