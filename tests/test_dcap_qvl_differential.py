"""A second opinion: Phala's dcap-qvl (Rust, PyPI) against our TDX parser, verifier and TCB evaluation.

dcap-qvl parses the same real samples and verifies them with the same sample Intel collateral;
its claims must equal ours field for field, and its verdicts (accept, refuse, and why) must
agree with ours at the same verification times.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import dcap_qvl
import pytest

from attestation import tdx
from attestation.appraisal import Policy, appraise
from attestation.claims import Claims
from attestation.errors import AttestationError
from attestation.intel import IntelCollateral
from intel_pki import AT as PKI_AT
from intel_pki import IntelTestPki, Platform, module_identity, qe_identity, tcb_info, tcb_level

TDX = Path(__file__).resolve().parent / "data" / "tdx"
SAMPLES = ("tdx_prod_quote_SPR_E4.dat", "cos-113-tdx-quote.dat", "quote_v5_sample.dat")
CHAIN_AT = datetime(2026, 6, 1, tzinfo=timezone.utc)  # every sample's PCK chain is valid
COLLATERAL_AT = datetime(2023, 6, 20, tzinfo=timezone.utc)  # the sample collateral is current
EXPIRED_AT = datetime(2023, 7, 20, tzinfo=timezone.utc)
_SIGNED = re.compile(r'\{"(?:tcbInfo|enclaveIdentity)":(\{.*\}),"signature":"([0-9a-fA-F]{128})"\}\s*', re.S)


def _split(path: Path) -> tuple[str, bytes]:
    match = _SIGNED.fullmatch(path.read_text())
    assert match is not None
    return match.group(1), bytes.fromhex(match.group(2))


def dcap_collateral(quote: bytes) -> "dcap_qvl.QuoteCollateralV3":
    tcb_info, tcb_sig = _split(TDX / "sample_tcbInfo_response")
    qe_identity, qe_sig = _split(TDX / "sample_qeIdentity_response")
    chain = (TDX / "tcb_signing_chain.pem").read_text()
    pem = dcap_qvl.parse_quote(quote).cert_chain_pem_bytes().decode()
    pck_issuer = "".join(re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", pem, re.S)[1:])
    return dcap_qvl.QuoteCollateralV3(
        pck_issuer, (TDX / "rootcrl.der").read_bytes(), (TDX / "pckcrl").read_bytes(),
        chain, tcb_info, tcb_sig, chain, qe_identity, qe_sig,
    )


@pytest.mark.parametrize("name", SAMPLES)
def test_claims_agree_with_dcap_qvl(name):
    raw = (TDX / name).read_bytes()
    ours = tdx.verify_quote(raw, at=CHAIN_AT).claims
    theirs = dcap_qvl.parse_quote(raw)
    header, report = theirs.header, theirs.report
    assert header.version == tdx.TdxQuote.from_bytes(raw).header.version
    assert bytes(header.qe_vendor_id) == ours.qe_vendor_id
    assert bytes(report.mr_td) == ours.mr_td
    assert [bytes(report.rt_mr0), bytes(report.rt_mr1), bytes(report.rt_mr2), bytes(report.rt_mr3)] == list(ours.rtmrs)
    for field in ("mr_config_id", "mr_owner", "mr_owner_config", "mr_seam", "mr_signer_seam", "td_attributes", "xfam",
                  "tee_tcb_svn", "report_data"):
        assert bytes(getattr(report, field)) == getattr(ours, field), field
    assert theirs.fmspc().lower() == ours.fmspc.hex()
    assert theirs.ca() == "platform"


def _ours(raw: bytes, at: datetime) -> str:
    try:
        return tdx.verify_quote(raw, at=at, collateral=IntelCollateral.from_directory(TDX)).claims.tcb_status
    except AttestationError as exc:
        return f"refused: {type(exc).__name__}"


def _theirs(raw: bytes, at: datetime) -> str:
    try:
        return dcap_qvl.verify(raw, dcap_collateral(raw), int(at.timestamp())).status
    except ValueError as exc:
        return f"refused: {str(exc).splitlines()[0]}"


def test_tcb_verdict_on_the_production_sample_agrees():
    raw = (TDX / "tdx_prod_quote_SPR_E4.dat").read_bytes()
    # The platform is below every level of the sample TCB info (evaluation data number 15):
    # we call that TCBNotSupported (Intel's name for it), dcap-qvl refuses for the same reason.
    assert _ours(raw, COLLATERAL_AT) == "TCBNotSupported"
    assert _theirs(raw, COLLATERAL_AT) == "refused: Verification failed: No matching TCB level found"


@pytest.mark.parametrize("name", SAMPLES)
def test_expired_collateral_is_refused_by_both(name):
    raw = (TDX / name).read_bytes()
    assert _ours(raw, EXPIRED_AT).startswith("refused")
    assert _theirs(raw, EXPIRED_AT).startswith("refused")


@pytest.mark.parametrize("name", ("cos-113-tdx-quote.dat", "quote_v5_sample.dat"))
def test_samples_newer_than_the_collateral_are_refused_by_both(name):
    # Their PCK certificates were issued after the sample collateral expired: no time makes both valid.
    raw = (TDX / name).read_bytes()
    for at in (COLLATERAL_AT, CHAIN_AT):
        assert _ours(raw, at).startswith("refused: ")
        assert _theirs(raw, at).startswith("refused: ")


def test_a_flipped_byte_is_refused_by_both():
    raw = bytearray((TDX / "tdx_prod_quote_SPR_E4.dat").read_bytes())
    raw[48 + tdx.TD_MR_TD] ^= 1
    assert _ours(bytes(raw), COLLATERAL_AT) == "refused: SignatureInvalid"
    assert _theirs(bytes(raw), COLLATERAL_AT).startswith("refused: ")


# --- TCB info v3 where the TDX module decides, signed by a test root for both verifiers ---
#
# Intel's sample collateral has no `tdxModuleIdentities`, and no one but Intel can sign a changed
# one. intel_pki makes a root, PCK chain, TCB Signing certificate, CRLs and quotes of its own;
# both verifiers take that root in place of Intel's (ours: trusted_roots, dcap-qvl: verify_with_root_ca).

REFUSED = "refused"
MODULE_01 = module_identity("TDX_01", [(5, "UpToDate", ()), (2, "OutOfDate", ("INTEL-SA-01111",))])


def _both(pki: IntelTestPki, tee_tcb_svn: list[int], levels, identities, **quote) -> tuple[tuple, tuple]:
    raw = pki.quote(tee_tcb_svn=bytes(tee_tcb_svn + [0] * (16 - len(tee_tcb_svn))), **quote)
    ours_collateral, theirs_collateral = pki.collateral(tcb_info(levels, identities), qe_identity())
    try:
        claims = tdx.verify_quote(raw, at=PKI_AT, trusted_roots=(pki.root,), collateral=ours_collateral).claims
        ours = (claims.tcb_status, list(claims.advisory_ids))
    except AttestationError:
        ours = (REFUSED,)
    try:
        report = dcap_qvl.verify_with_root_ca(raw, theirs_collateral, pki.root_der, int(PKI_AT.timestamp()))
        theirs = (report.status, list(report.advisory_ids))
    except ValueError:
        theirs = (REFUSED,)
    return ours, theirs


@pytest.fixture(scope="module")
def pki() -> IntelTestPki:
    return IntelTestPki()


def _platform(tdx_svns: list[int], status: str = "UpToDate") -> list[dict]:
    return [tcb_level(Platform().components, Platform().pce_svn, tdx_svns + [0] * (16 - len(tdx_svns)), status)]


@pytest.mark.parametrize("case, tee_tcb_svn, levels, identities, expected", [
    # TDX 1.0: no module identity; every TEE_TCB_SVN byte is compared with tdxtcbcomponents.
    ("tdx-1.0", [0, 0, 2], _platform([0, 0, 2]), None, ("UpToDate", [])),
    ("tdx-1.0 below the platform level", [0, 0, 2], _platform([1, 0, 2]), None, "below"),
    # TDX 1.5: TDX_01's levels decide by TEE_TCB_SVN[0]; bytes 0-1 are not the platform's to judge.
    ("module up to date", [5, 1, 2], _platform([0, 0, 2]), [MODULE_01], ("UpToDate", [])),
    ("module out of date", [3, 1, 2], _platform([0, 0, 2]), [MODULE_01], ("OutOfDate", ["INTEL-SA-01111"])),
    ("module below its levels", [1, 1, 2], _platform([0, 0, 2]), [MODULE_01], "below"),
    ("platform bytes 0-1 above the quote's", [5, 1, 2], _platform([9, 9, 2]), [MODULE_01], ("UpToDate", [])),
    ("platform byte 2 above the quote's", [5, 1, 2], _platform([0, 0, 3]), [MODULE_01], "below"),
    ("platform out of date, module up to date", [5, 1, 2], _platform([0, 0, 2], "OutOfDate"), [MODULE_01], ("OutOfDate", [])),
    ("no identity for the module", [5, 3, 2], _platform([0, 0, 2]), [MODULE_01], (REFUSED,)),
    ("identity of another signer", [5, 1, 2], _platform([0, 0, 2]),
     [module_identity("TDX_01", [(5, "UpToDate", ())], mrsigner=bytes(48))], (REFUSED,)),
])
def test_tdx_module_tcb_agrees_with_dcap_qvl(pki, case, tee_tcb_svn, levels, identities, expected):
    ours, theirs = _both(pki, tee_tcb_svn, levels, identities)
    if expected == "below":
        # Below every level: we name it TCBNotSupported (a status a policy can refuse), dcap-qvl refuses.
        assert (ours, theirs) == (("TCBNotSupported", []), (REFUSED,)), case
    else:
        assert ours == theirs == expected, case


def test_module_decides_the_appraisal(pki):
    """End to end: the platform is up to date, the TDX module is not, and appraise refuses naming it."""
    raw = pki.quote(tee_tcb_svn=bytes([3, 1, 2] + [0] * 13))
    collateral, _ = pki.collateral(tcb_info(_platform([0, 0, 2]), [MODULE_01]), qe_identity())
    claims = tdx.verify_quote(raw, at=PKI_AT, trusted_roots=(pki.root,), collateral=collateral).claims
    assert "TDX module TDX_01: OutOfDate" in claims.collateral_notes and "TCB info: UpToDate" in claims.collateral_notes
    verdict = appraise(Claims(tee="tdx", simulated=False, cpu=claims), Policy(accept_any_measurement=True))
    assert verdict.errors == (
        "tcb_status OutOfDate is not allowed by policy (advisories: INTEL-SA-01111): have the platform updated, "
        "or, after reading its advisories, list 'OutOfDate' in [tdx] allowed_tcb_status",
    )
