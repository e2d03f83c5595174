"""The appraisal's holes, each shown closed on the real samples in tests/data (and its refusal read).

1. pinned means MRTD and RTMR0-3 on TDX; 2. SEV-SNP TCB judged against min_reported_tcb, VMPL 0;
3. the TDX module's TCB (test_dcap_qvl_differential.py, with dcap-qvl); 4. only signed, complete
collateral yields a status; 5. min_tcb_evaluation_data_number; 6. td_attributes and xfam pins,
SEPT_VE_DISABLE; 7. require_post_quantum (and test_attestation_document.py on a whole document).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import pytest

from attestation import cli, sevsnp, tdx
from attestation.appraisal import Policy, PolicyError, ReferenceValues, SnpPolicy, TdxPolicy, appraise, load_policy
from attestation.claims import Claims, SnpTcb
from attestation.document import build_document, verify_document, verify_evidence
from attestation.errors import CollateralInvalid, PolicyRefused
from attestation.evidence import FORMAT_TDX, CpuEvidence
from attestation.intel import IntelCollateral
from attestation.producers.simulated import SimulatedTdx
from intel_pki import AT as PKI_AT
from intel_pki import IntelTestPki, Platform, module_identity, qe_identity, tcb_info, tcb_level

TESTDATA = Path(__file__).resolve().parent / "data"
TDX = TESTDATA / "tdx"
SNP = TESTDATA / "sev-snp"
COS = TDX / "cos-113-tdx-quote.dat"
SPR = TDX / "tdx_prod_quote_SPR_E4.dat"
CHAIN_AT = datetime(2026, 6, 1, tzinfo=timezone.utc)
COLLATERAL_AT = datetime(2023, 6, 20, tzinfo=timezone.utc)
# These quotes come without current collateral: their status is Unknown, accepted here so that each
# test sees only the refusal it is about.
UNKNOWN_OK = TdxPolicy(allowed_tcb_status=frozenset({"Unknown"}))


def cos_claims() -> Claims:
    return Claims(tee="tdx", simulated=False, cpu=tdx.verify_quote(COS.read_bytes(), at=CHAIN_AT).claims)


def spr_claims() -> Claims:
    result = tdx.verify_quote(SPR.read_bytes(), at=COLLATERAL_AT, collateral=IntelCollateral.from_directory(TDX))
    return Claims(tee="tdx", simulated=False, cpu=result.claims)


def snp_claims() -> Claims:
    result = sevsnp.verify_report((SNP / "attestation.bin").read_bytes(),
                                  sevsnp.load_amd_certificates((SNP / "vcek.testcer").read_bytes()), at=CHAIN_AT)
    return Claims(tee="sev-snp", simulated=False, cpu=result.claims)


def all_five(claims: Claims) -> dict[str, str]:
    return {"mr_td": claims.cpu.mr_td.hex(), **{f"rtmr{i}": r.hex() for i, r in enumerate(claims.cpu.rtmrs)}}


# --- 1. pinned means MRTD and RTMR0-3 ---


def test_cos_quote_with_only_its_mrtd_pinned_is_refused_naming_the_rtmrs():
    claims = cos_claims()
    verdict = appraise(claims, Policy(tdx=UNKNOWN_OK).with_measurements([claims.cpu.mr_td.hex()]))
    assert verdict.errors == (
        "rtmr0, rtmr1, rtmr2, rtmr3 are not pinned by the policy, so any code could be running: pin them all "
        "(tee-node policy from-quote prints them; --pin NAME=HEX on attest and chat; or a [release] whose "
        "reference_values pin them), or pass --accept-any-measurement",
    )


def test_cos_quote_with_all_five_pinned_is_accepted_and_other_rtmrs_are_refused():
    claims = cos_claims()
    assert appraise(claims, Policy(tdx=UNKNOWN_OK).with_pins(all_five(claims))).accepted
    # The same MRTD with the kernel and command line of another image (different RTMR1 and RTMR2).
    other = {**all_five(claims), "rtmr1": "11" * 48, "rtmr2": "22" * 48}
    verdict = appraise(claims, Policy(tdx=UNKNOWN_OK).with_pins(other))
    assert [e.split(":")[0] for e in verdict.errors] == ["rtmr1 differs from policy", "rtmr2 differs from policy"]
    assert verdict.errors[0] == (
        f"rtmr1 differs from policy: the node reports {claims.cpu.rtmrs[1].hex()}; if you trust what it measures, "
        "add it to [tdx] rtmr1"
    )


def test_a_pin_lists_every_value_it_allows():
    claims = cos_claims()
    pins = {name: [value, "ab" * 48] for name, value in all_five(claims).items()}
    assert appraise(claims, Policy(tdx=UNKNOWN_OK).with_pins(pins)).accepted
    with pytest.raises(PolicyError, match="no register named 'rtmr4'"):
        Policy().with_pins({"rtmr4": "00" * 48})


def test_release_reference_values_pin_beside_the_policy():
    claims = cos_claims()
    rtmrs = {f"rtmr{i}": [r.hex()] for i, r in enumerate(claims.cpu.rtmrs)}
    # The policy pins MRTD, a release the RTMRs: together the node is pinned.
    policy = Policy(tdx=UNKNOWN_OK).with_measurements([claims.cpu.mr_td.hex()])
    assert appraise(claims, policy.with_reference_values({"tdx": rtmrs}, "release 1.4.0")).accepted
    other = {"tdx": {**rtmrs, "rtmr3": ["33" * 48]}}
    verdict = appraise(claims, policy.with_reference_values(other, "release 1.4.0"))
    assert verdict.errors == (
        f"rtmr3 differs from release 1.4.0: the node reports {claims.cpu.rtmrs[3].hex()}, which the release does not "
        "list; the node does not run this release: refuse it, or pin the release the node runs",
    )
    # A release only narrows: keys that widen the policy are not reference values.
    with pytest.raises(PolicyError, match="release 1.4.0 reference_values.tdx: allow_debug"):
        ReferenceValues.from_mapping({"tdx": {"allow_debug": True}}, "release 1.4.0")


def test_policy_from_quote_prints_all_five_and_the_attributes(tmp_path):
    out = io.StringIO()
    assert cli.policy_from_quote(COS, at=CHAIN_AT, stdout=out) == 0
    policy = Policy.from_mapping(tomllib.loads(out.getvalue()))
    claims = cos_claims()
    for name, value in all_five(claims).items():
        assert getattr(policy.tdx, name) == frozenset({value})
    assert policy.tdx.td_attributes == frozenset({"0000001000000000"}) and policy.tdx.xfam == frozenset({"e700060000000000"})
    lenient = dataclasses.replace(policy, tdx=dataclasses.replace(policy.tdx, allowed_tcb_status=frozenset({"Unknown"})))
    assert appraise(claims, lenient).accepted


def test_the_simulated_td_registers_are_pinnable(tmp_path):
    sim = SimulatedTdx.from_seed(b"pin-test-seed-0123456789abcdef!!")
    (tmp_path / "sim.dat").write_bytes(sim.quote(bytes(64), b"code+config"))
    out = io.StringIO()
    assert cli.policy_from_quote(tmp_path / "sim.dat", at=CHAIN_AT, stdout=out) == 0
    policy = Policy.from_mapping(tomllib.loads(out.getvalue()))
    assert policy.allow_simulated and policy.tdx.mr_td == frozenset({hashlib.sha384(b"code+config").hexdigest()})
    # The simulated TD extends no RTMR: all four are zero, and pinned as such.
    assert [getattr(policy.tdx, f"rtmr{i}") for i in range(4)] == [frozenset({"00" * 48})] * 4
    claims = Claims(tee="simulated", simulated=True, cpu=tdx.verify_quote(sim.quote(bytes(64), b"code+config"), at=CHAIN_AT).claims)
    assert appraise(claims, policy).accepted
    verdict = appraise(claims, policy.with_pins({"rtmr0": "01" * 48}))
    assert verdict.errors[0].startswith("rtmr0 differs from policy")


# --- 2. SEV-SNP: TCB against min_reported_tcb, VMPL 0 ---

def snp_policy(**snp) -> Policy:
    claims = snp_claims()
    base = dict(measurement=frozenset({claims.cpu.measurement.hex()}), allow_debug=True)  # the sample's guest allows debug
    return Policy(sev_snp=SnpPolicy(**{**base, **snp}))


def test_snp_status_is_unknown_without_a_minimum():
    verdict = appraise(snp_claims(), snp_policy())
    assert verdict.tcb_status == "Unknown"
    assert verdict.errors == (
        "tcb_status is Unknown: AMD publishes no TCB status, and neither the policy nor a release gives a "
        "min_reported_tcb; set [sev_snp] min_reported_tcb (tee-node policy from-quote prints the report's) or, "
        "knowingly, list 'Unknown' in [sev_snp] allowed_tcb_status",
    )


def test_snp_status_is_judged_against_the_minimum_and_the_crl():
    claims = snp_claims()  # REPORTED_TCB bootloader 2, tee 0, snp 5, microcode 68; no AMD CRL given
    met = {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}
    verdict = appraise(claims, snp_policy(min_reported_tcb=met))
    assert verdict.tcb_status == "Unknown" and "no current AMD CRL came with the evidence" in verdict.errors[0]
    with_crl = dataclasses.replace(claims, cpu=dataclasses.replace(claims.cpu, crl_checked=True))
    verdict = appraise(with_crl, snp_policy(min_reported_tcb=met))
    assert (verdict.accepted, verdict.tcb_status) == (True, "UpToDate")
    verdict = appraise(with_crl, snp_policy(min_reported_tcb={**met, "snp": 8}))
    assert verdict.tcb_status == "OutOfDate"
    assert verdict.errors == ("reported_tcb.snp 5 is below the policy minimum 8: have the host's firmware updated",)
    # A release's minimum holds beside the policy's.
    release = snp_policy(min_reported_tcb=met).with_reference_values({"sev_snp": {"min_reported_tcb": {"microcode": 200}}}, "release 2.0")
    assert appraise(with_crl, release).errors == (
        "reported_tcb.microcode 68 is below the minimum of release 2.0 200: have the host's firmware updated",
    )


def test_an_all_zero_reported_tcb_is_refused_under_any_minimum():
    claims = snp_claims()
    zero = dataclasses.replace(claims, cpu=dataclasses.replace(
        claims.cpu, crl_checked=True, reported_tcb=SnpTcb(raw=0, bootloader=0, tee=0, snp=0, microcode=0)))
    verdict = appraise(zero, snp_policy(min_reported_tcb={"bootloader": 0}))
    assert verdict.tcb_status == "OutOfDate" and verdict.errors == (
        "reported_tcb is all zero: no firmware reports that, so it is not a level to trust; refuse this node",
    )


def test_snp_vmpl_0_is_required_by_default():
    claims = snp_claims()
    lenient = dict(allowed_tcb_status=frozenset({"Unknown"}))
    assert claims.cpu.vmpl == 0 and appraise(claims, snp_policy(**lenient)).accepted
    vmpl2 = dataclasses.replace(claims, cpu=dataclasses.replace(claims.cpu, vmpl=2))
    assert appraise(vmpl2, snp_policy(**lenient)).errors == (
        "vmpl 2 is not allowed by policy (0): the report was requested at another privilege level than the guest's "
        "own (VMPL 0 unless an SVSM runs below it); refuse it, or, if the guest runs under an SVSM, list 2 in [sev_snp] vmpl",
    )
    assert appraise(vmpl2, snp_policy(vmpl=frozenset({0, 2}), **lenient)).accepted


def test_snp_verifier_reports_facts_only():
    claims = snp_claims().cpu
    assert (claims.tcb_status, claims.crl_checked) == ("Unknown", False)


# --- 4. only signed, complete collateral yields a status ---


def test_unsigned_collateral_is_refused_naming_what_is_missing(tmp_path):
    for name in ("pckcrl", "rootcrl.der", "sample_tcbInfo_response", "sample_qeIdentity_response"):
        (tmp_path / name).write_bytes((TDX / name).read_bytes())  # everything but tcb_signing_chain.pem
    claims = tdx.verify_quote(SPR.read_bytes(), at=COLLATERAL_AT, collateral=IntelCollateral.from_directory(tmp_path)).claims
    assert claims.tcb_status == "Unknown"
    policy = Policy(tdx=TdxPolicy(allow_sept_ve=True), accept_any_measurement=True)
    assert appraise(Claims(tee="tdx", simulated=False, cpu=claims), policy).errors == (
        "tcb_status is Unknown: no TCB Signing chain (tcb_signing_chain.pem), so the TCB info and QE identity are "
        "unsigned; give current Intel collateral signed by Intel's TCB Signing certificate (--collateral DIR with "
        "tcb_signing_chain.pem) or, knowingly, list 'Unknown' in [tdx] allowed_tcb_status",
    )
    (tmp_path / "tcb_signing_chain.pem").write_bytes((TDX / "tcb_signing_chain.pem").read_bytes())
    (tmp_path / "sample_qeIdentity_response").unlink()
    claims = tdx.verify_quote(SPR.read_bytes(), at=COLLATERAL_AT, collateral=IntelCollateral.from_directory(tmp_path)).claims
    assert claims.tcb_status == "Unknown" and claims.collateral_missing == ("no QE identity (qeIdentity.json)",)


# --- 5. min_tcb_evaluation_data_number ---


def test_collateral_older_than_the_minimum_evaluation_number_is_refused():
    claims = spr_claims()  # the sample TCB info and QE identity both carry tcbEvaluationDataNumber 15
    base = TdxPolicy(allow_sept_ve=True, allowed_tcb_status=frozenset({"TCBNotSupported"}))
    policy = Policy(tdx=dataclasses.replace(base, min_tcb_evaluation_data_number=15), accept_any_measurement=True)
    assert appraise(claims, policy).accepted
    policy = Policy(tdx=dataclasses.replace(base, min_tcb_evaluation_data_number=17), accept_any_measurement=True)
    fix = "the collateral predates a TCB recovery; give current collateral from Intel PCS (--collateral DIR)"
    assert appraise(claims, policy).errors == (
        f"tcb_evaluation_data_number of the TCB info 15 is below the policy minimum 17: {fix}",
        f"tcb_evaluation_data_number of the QE identity 15 is below the policy minimum 17: {fix}",
    )
    # Without signed collateral there is no number to compare: refused, not skipped.
    bare = Claims(tee="tdx", simulated=False, cpu=tdx.verify_quote(SPR.read_bytes(), at=CHAIN_AT).claims)
    errors = appraise(bare, dataclasses.replace(policy, tdx=dataclasses.replace(policy.tdx, allowed_tcb_status=frozenset({"Unknown"})))).errors
    assert errors[0].startswith("tcb_evaluation_data_number of the TCB info is unknown: no signed TCB info came with the evidence")


def test_min_tcb_evaluation_data_number_in_a_policy_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[tdx]\nmin_tcb_evaluation_data_number = 17\n")
    assert load_policy(path).tdx.min_tcb_evaluation_data_number == 17
    path.write_text('[tdx]\nmin_tcb_evaluation_data_number = "17"\n')
    with pytest.raises(PolicyError, match="min_tcb_evaluation_data_number must be an integer"):
        load_policy(path)


# --- 6. td_attributes, xfam, SEPT_VE_DISABLE, DEBUG ---


def test_sept_ve_disable_is_required_on_real_tdx():
    claims = spr_claims()  # this production sample's TD runs without SEPT_VE_DISABLE
    assert not claims.cpu.sept_ve_disable and cos_claims().cpu.sept_ve_disable
    policy = Policy(tdx=TdxPolicy(allowed_tcb_status=frozenset({"TCBNotSupported"})), accept_any_measurement=True)
    assert appraise(claims, policy).errors == (
        "td_attributes.sept_ve_disable is not set: the TD takes #VE on secure EPT violations, which the host can "
        "induce to steer the guest kernel; run the TD with SEPT_VE_DISABLE, or, knowingly, set [tdx] allow_sept_ve = true",
    )
    assert appraise(claims, dataclasses.replace(policy, tdx=dataclasses.replace(policy.tdx, allow_sept_ve=True))).accepted


def test_td_attributes_and_xfam_pins():
    claims = cos_claims()
    pinned = Policy(tdx=UNKNOWN_OK).with_pins(all_five(claims))
    assert appraise(claims, pinned.with_pins({"td_attributes": "0000001000000000", "xfam": "e700060000000000"})).accepted
    verdict = appraise(claims, pinned.with_pins({"td_attributes": "0000001040000000", "xfam": "e702060000000000"}))
    assert [e.split(":")[0] for e in verdict.errors] == ["td_attributes differs from policy", "xfam differs from policy"]
    with pytest.raises(PolicyError, match="16 hex"):
        Policy.from_mapping({"tdx": {"xfam": ["e7"]}})


def test_the_default_policy_still_refuses_debug():
    claims = cos_claims()
    debug = dataclasses.replace(claims, cpu=dataclasses.replace(claims.cpu, td_attributes=b"\x01" + claims.cpu.td_attributes[1:]))
    errors = appraise(debug, Policy(tdx=UNKNOWN_OK).with_pins(all_five(claims))).errors
    assert errors == (
        "debug is set in td_attributes: the host can read and change this TD; refuse it, or set [tdx] allow_debug = "
        "true for a test system only",
    )


# --- 7. require_post_quantum ---


def test_a_document_without_a_kem_key_is_refused_by_default():
    claims = cos_claims()
    policy = Policy(tdx=UNKNOWN_OK).with_pins(all_five(claims))
    document = dataclasses.replace(claims, config_digest=bytes(32))
    assert appraise(document, policy).errors == (
        "kem_public_key is missing: the node offers no ML-KEM-768 key, so requests would be protected by X25519 alone "
        "(not post-quantum); refuse it, or, knowingly, pass --allow-classical (require_post_quantum = false)",
    )
    assert appraise(dataclasses.replace(document, kem_public_key=bytes(1184)), policy).accepted
    assert appraise(document, dataclasses.replace(policy, require_post_quantum=False)).accepted
    assert appraise(claims, policy).accepted  # bare evidence (quote verify) has no keys to judge
    assert Policy().require_post_quantum and Policy.from_mapping({"require_post_quantum": False}).require_post_quantum is False


# --- a client's own collateral (--collateral DIR), with a document under a test Intel root ---


class _TestTdx:
    """A TD whose quotes a test Intel PKI signs: a real-shaped document without Intel's keys."""

    tee = "tdx"

    def __init__(self, pki):
        self.pki = pki

    def get_evidence(self, report_data: bytes):
        quote = self.pki.quote(tee_tcb_svn=bytes([5, 1, 2] + [0] * 13), report_data=report_data)
        return CpuEvidence(tee="tdx", format=FORMAT_TDX, quote=quote, certificates=None, simulated=False)


def test_a_client_brings_its_own_collateral(tmp_path):
    pki = IntelTestPki()
    nonce = bytes(range(32))
    doc = build_document(_TestTdx(pki), None, nonce=nonce, dh_public_key=bytes(32), signing_public_key=bytes(32),
                         key_epoch=1, measured_config={"tee_mode": "tdx"}, kem_public_key=bytes(1184))
    claims = verify_evidence(doc, expected_nonce=nonce, at=PKI_AT, trusted_roots=(pki.root,)).claims
    pins = {**all_five(claims), "td_attributes": claims.cpu.td_attributes.hex(), "xfam": claims.cpu.xfam.hex()}
    policy = Policy().with_pins(pins)

    def verify(policy: Policy):
        return verify_document(doc, expected_nonce=nonce, policy=policy, at=PKI_AT, trusted_roots=(pki.root,))

    # The node ships no collateral: Unknown, refused.
    with pytest.raises(PolicyRefused, match="tcb_status is Unknown: no Intel collateral came with the evidence"):
        verify(policy)
    levels = [tcb_level(Platform().components, Platform().pce_svn, [0, 0, 2] + [0] * 13, "UpToDate")]
    identities = [module_identity("TDX_01", [(5, "UpToDate", ())])]
    directory = pki.write_directory(tmp_path / "pcs", tcb_info(levels, identities, evaluation=18), qe_identity(evaluation=18))
    verified = verify(policy.with_collateral(directory))
    assert verified.tcb_status == "UpToDate"
    assert (verified.claims.cpu.tcb_info_evaluation_data_number, verified.claims.cpu.qe_identity_evaluation_data_number) == (18, 18)
    # The same collateral under a minimum evaluation number above it: refused, naming both numbers.
    strict = dataclasses.replace(policy, tdx=dataclasses.replace(policy.tdx, min_tcb_evaluation_data_number=19))
    with pytest.raises(PolicyRefused) as refused:
        verify(strict.with_collateral(directory))
    assert refused.value.errors[0].startswith("tcb_evaluation_data_number of the TCB info 18 is below the policy minimum 19")
    with pytest.raises(CollateralInvalid, match="does not exist"):
        policy.with_collateral(tmp_path / "missing")


def test_one_unpinned_register_is_named_alone():
    claims = cos_claims()
    pins = {k: v for k, v in all_five(claims).items() if k != "rtmr3"}
    assert appraise(claims, Policy(tdx=UNKNOWN_OK).with_pins(pins)).errors == (
        "rtmr3 is not pinned by the policy, so any code could be running: pin it (tee-node policy from-quote prints "
        "it; --pin NAME=HEX on attest and chat; or a [release] whose reference_values pin it), or pass "
        "--accept-any-measurement",
    )
