"""TDX quote parsing and verification against the real samples in tests/data."""

import dataclasses
import base64
import json
import re
import struct
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from attestation import tdx, trust
from attestation.errors import (
    CertificateRevoked,
    ChainInvalid,
    CollateralInvalid,
    ParseError,
    ReportDataMismatch,
    SignatureInvalid,
)
from attestation.intel import IntelCollateral, PckExtensions
from attestation.producers.simulated import SimulatedTdx

TESTDATA = Path(__file__).resolve().parent / "data"
TDX = TESTDATA / "tdx"
AT = datetime(2026, 6, 1, tzinfo=timezone.utc)  # inside every sample chain's validity
COLLATERAL_AT = datetime(2023, 6, 20, tzinfo=timezone.utc)  # inside the sample collateral's validity
TCB_SIGNING_CHAIN = TESTDATA / "tdx" / "tcb_signing_chain.pem"

SAMPLES = {
    # file: (version, body type, MRTD prefix, REPORTDATA prefix, TEE_TCB_SVN prefix), read with xxd
    "tdx_prod_quote_SPR_E4.dat": (4, 2, "6363b8043668a3ad953278e10389574d", "6c62dec1b8191749a31dab490be532a3", "03000400"),
    "cos-113-tdx-quote.dat": (4, 2, "dae67181d3d65e073ad8f95b7907d5e9", "00000000000000000000000000000000", "04010700"),
    "quote_v5_sample.dat": (5, 3, "7348651a34b2d2d3462822e3a750ec61", "945eaacf5abc1f719d8666a942fda03d", "0b010400"),
}
V4_SIG_OFFSET = 636  # 48 header + 584 body + 4 length
QE_REPORT_OFFSET = V4_SIG_OFFSET + 64 + 64 + 6


def read(name: str) -> bytes:
    return (TDX / name).read_bytes()


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def tamper_certificate(quote: bytes, index: int) -> bytes:
    """Flip the last byte of certificate `index` of the embedded PEM chain, keeping the quote's layout."""
    blocks = list(re.finditer(rb"-----BEGIN CERTIFICATE-----\n?(.*?)-----END CERTIFICATE-----", quote, re.S))
    body = blocks[index].group(1)
    lines = body.split(b"\n")
    der = bytearray(base64.b64decode(b"".join(lines)))
    der[-3] ^= 0x01  # inside the signature's s value: DER stays well-formed
    encoded = base64.b64encode(bytes(der))
    rewrapped, pos = [], 0
    for line in lines:
        rewrapped.append(encoded[pos:pos + len(line)])
        pos += len(line)
    new_body = b"\n".join(rewrapped)
    assert len(new_body) == len(body)
    start, end = blocks[index].span(1)
    return quote[:start] + new_body + quote[end:]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_parse_to_the_expected_fields(name):
    version, body_type, mrtd, report_data, tcb_svn = SAMPLES[name]
    quote = tdx.TdxQuote.from_bytes(read(name))
    assert quote.header.version == version
    assert quote.header.tee_type == tdx.TEE_TYPE_TDX
    assert quote.header.attestation_key_type == tdx.ATTESTATION_KEY_ECDSA_P256
    assert quote.header.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"  # Intel's QE
    assert quote.body_type == body_type
    assert quote.body.mr_td.hex().startswith(mrtd)
    assert quote.body.report_data.hex().startswith(report_data)
    assert quote.body.tee_tcb_svn.hex().startswith(tcb_svn)
    assert len(quote.body.rtmrs) == 4
    qe = quote.signature_data.certification.qe_report
    assert qe.isv_prod_id == 2
    assert qe.mr_signer.hex().startswith("dc9e2a7c6f948f17")
    assert quote.signature_data.certification.pck_chain_pem.count(b"BEGIN CERTIFICATE") == 3
    if body_type == tdx.BODY_TYPE_TD_REPORT15:
        assert quote.body.mr_service_td is not None and len(quote.body.tee_tcb_svn2) == 16
    else:
        assert quote.body.mr_service_td is None


def test_cos_quote_report_data_is_the_nonce_file():
    quote = tdx.TdxQuote.from_bytes(read("cos-113-tdx-quote.dat"))
    assert quote.body.report_data == (TDX / "nonce.dat").read_bytes()
    # The file is a fixed 8000-byte buffer: the quote proper ends at the declared signature data.
    assert len(quote.raw) == 4935


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_verify_to_the_pinned_intel_root(name):
    result = tdx.verify_quote(read(name), at=AT)
    assert result.simulated is False
    assert trust.common_name(result.pck_chain[0]) == "Intel SGX PCK Certificate"
    assert trust.common_name(result.pck_chain[-1]) == "Intel SGX Root CA"
    assert trust.fingerprint(result.pck_chain[-1]) == trust.INTEL_SGX_ROOT_CA_SHA256
    assert result.claims.tcb_status == "Unknown"  # no collateral: nothing says how current the platform is


def test_pinned_roots_match_their_fingerprints_and_subjects():
    root = trust.pinned_root("intel_sgx_root_ca.pem")
    assert trust.common_name(root) == "Intel SGX Root CA"
    arks = trust.amd_roots()
    assert [trust.common_name(a) for a in arks] == ["ARK-Milan", "ARK-Genoa", "ARK-Turin"]
    assert [trust.fingerprint(a) for a in arks] == [
        trust.AMD_ARK_MILAN_SHA256, trust.AMD_ARK_GENOA_SHA256, trust.AMD_ARK_TURIN_SHA256
    ]
    for product, ark in zip(trust.AMD_PRODUCTS, arks):
        ark.verify_directly_issued_by(ark)  # self-signed, RSA-PSS
        ask = trust.amd_ask(product)
        assert trust.common_name(ask) == f"SEV-{product}"
        ask.verify_directly_issued_by(ark)  # each pinned ASK is AMD's: signed by its family's ARK


@pytest.mark.parametrize(
    "offset, message",
    [
        (48 + tdx.TD_MR_TD, "quote signature"),  # body
        (10, "quote signature"),  # header (PCE SVN)
        (V4_SIG_OFFSET + 5, "quote signature"),  # signature r
        (V4_SIG_OFFSET + 64 + 7, "attestation key|quote signature"),  # attestation key
        (QE_REPORT_OFFSET + tdx.QE_MR_SIGNER, "QE report signature"),  # QE report
        (QE_REPORT_OFFSET + tdx.QE_REPORT_SIZE + 3, "QE report signature"),  # QE report signature
    ],
)
def test_a_flipped_byte_fails(offset, message):
    data = flip(read("tdx_prod_quote_SPR_E4.dat"), offset)
    with pytest.raises(SignatureInvalid, match=message):
        tdx.verify_quote(data, at=AT)


def test_a_flipped_qe_auth_byte_breaks_the_attestation_key_binding():
    # QE auth data is outside the QE report: only the SHA-256 binding notices.
    auth_offset = QE_REPORT_OFFSET + tdx.QE_REPORT_SIZE + 64 + 2
    with pytest.raises(ReportDataMismatch, match="attestation key"):
        tdx.verify_quote(flip(read("tdx_prod_quote_SPR_E4.dat"), auth_offset), at=AT)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_flipped_certificate_byte_fails(index):
    data = tamper_certificate(read("quote_v5_sample.dat"), index)
    with pytest.raises(SignatureInvalid, match="is not signed by"):
        tdx.verify_quote(data, at=AT)


def test_v5_body_is_signed_with_its_descriptor():
    data = read("quote_v5_sample.dat")
    with pytest.raises(SignatureInvalid):
        tdx.verify_quote(flip(data, 54 + tdx.TD_MR_SERVICE_TD), at=AT)


def test_a_wrong_pinned_root_fails():
    with pytest.raises(ChainInvalid, match="not a pinned root"):
        tdx.verify_quote(read("tdx_prod_quote_SPR_E4.dat"), at=AT, trusted_roots=trust.amd_roots())


def test_certificates_are_checked_at_the_given_time():
    data = read("tdx_prod_quote_SPR_E4.dat")
    with pytest.raises(ChainInvalid, match="not valid at"):
        tdx.verify_quote(data, at=datetime(2030, 1, 1, tzinfo=timezone.utc))
    with pytest.raises(ChainInvalid, match="not valid at"):
        tdx.verify_quote(data, at=datetime(2022, 1, 1, tzinfo=timezone.utc))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_truncation_is_a_parse_error(name):
    data = tdx.TdxQuote.from_bytes(read(name)).raw
    for cut in (0, 20, 47, 100, 640, 700, 1200, len(data) - 1):
        with pytest.raises(ParseError):
            tdx.TdxQuote.from_bytes(data[:cut])


def test_bad_header_values_are_parse_errors():
    data = read("tdx_prod_quote_SPR_E4.dat")
    with pytest.raises(ParseError, match="version"):
        tdx.TdxQuote.from_bytes(struct.pack("<H", 3) + data[2:])
    with pytest.raises(ParseError, match="not TDX"):
        tdx.TdxQuote.from_bytes(data[:4] + struct.pack("<I", 0) + data[8:])
    with pytest.raises(ParseError, match="attestation key type"):
        tdx.TdxQuote.from_bytes(data[:2] + struct.pack("<H", 3) + data[4:])
    v5 = read("quote_v5_sample.dat")
    with pytest.raises(ParseError, match="body type 1"):
        tdx.TdxQuote.from_bytes(v5[:48] + struct.pack("<H", 1) + v5[50:])
    with pytest.raises(ParseError, match="declares"):
        tdx.TdxQuote.from_bytes(v5[:50] + struct.pack("<I", 584) + v5[54:])
    cert_type = V4_SIG_OFFSET + 128
    with pytest.raises(ParseError, match="certification data type 5"):
        tdx.TdxQuote.from_bytes(data[:cert_type] + struct.pack("<H", 5) + data[cert_type + 2:])


def test_v5_with_a_td_report_1_0_body_parses():
    # Body type 2 in a v5 quote: a TDX 1.0 report behind the v5 descriptor.
    v4 = tdx.TdxQuote.from_bytes(read("tdx_prod_quote_SPR_E4.dat"))
    sig = v4.raw[632:]
    header = struct.pack("<H", 5) + v4.raw[2:48]
    v5 = header + struct.pack("<HI", 2, 584) + v4.raw[48:632] + sig
    quote = tdx.TdxQuote.from_bytes(v5)
    assert quote.body_type == 2 and quote.body == v4.body
    with pytest.raises(SignatureInvalid):  # the signature covered the v4 layout
        tdx.verify_quote(quote, at=AT)


# --- collateral ---


def signed_collateral(**overrides) -> IntelCollateral:
    base = dict(
        pck_crl=(TDX / "pckcrl").read_bytes(),
        root_crl=(TDX / "rootcrl.der").read_bytes(),
        tcb_info=(TDX / "sample_tcbInfo_response").read_bytes(),
        qe_identity=(TDX / "sample_qeIdentity_response").read_bytes(),
        tcb_signing_chain=TCB_SIGNING_CHAIN.read_bytes(),
    )
    base.update(overrides)
    return IntelCollateral(**base)


def test_collateral_checks_crls_and_reports_tcb_status():
    collateral = IntelCollateral.from_directory(TDX)
    assert collateral.tcb_signing_chain is not None  # the directory holds the issuer chain too
    result = tdx.verify_quote(read("tdx_prod_quote_SPR_E4.dat"), at=COLLATERAL_AT, collateral=collateral)
    assert "root CRL checked" in result.claims.collateral_notes and "PCK CRL checked" in result.claims.collateral_notes
    assert "QE identity: UpToDate" in result.claims.collateral_notes
    # The sample TCB info (evaluation number 15) requires SGX SVNs 5,5,... and TDX SVN 5 at index 2;
    # this platform's PCK has 3,3,... and its TEE_TCB_SVN is 3,0,4: below every listed level.
    assert result.claims.tcb_status == "TCBNotSupported"


def test_signed_collateral_is_verified_to_the_intel_root():
    result = tdx.verify_quote(read("tdx_prod_quote_SPR_E4.dat"), at=COLLATERAL_AT, collateral=signed_collateral())
    assert "QE identity: UpToDate" in result.claims.collateral_notes and "TCB info: TCBNotSupported" in result.claims.collateral_notes
    assert result.claims.tcb_status == "TCBNotSupported"


def test_tampered_signed_collateral_is_refused():
    body = (TDX / "sample_tcbInfo_response").read_bytes().replace(b'"tcbStatus":"OutOfDate"', b'"tcbStatus":"UpToDate"')
    with pytest.raises(CollateralInvalid, match="tcbInfo signature does not verify"):
        tdx.verify_quote(read("tdx_prod_quote_SPR_E4.dat"), at=COLLATERAL_AT, collateral=signed_collateral(tcb_info=body))
    pck_chain = tdx.TdxQuote.from_bytes(read("tdx_prod_quote_SPR_E4.dat")).signature_data.certification.pck_chain_pem
    with pytest.raises(CollateralInvalid, match="not 'Intel SGX TCB Signing'"):
        tdx.verify_quote(read("tdx_prod_quote_SPR_E4.dat"), at=COLLATERAL_AT, collateral=signed_collateral(tcb_signing_chain=pck_chain))


def _tcb_info_with_levels(levels):
    doc = json.loads((TDX / "sample_tcbInfo_response").read_bytes())
    doc["tcbInfo"]["tcbLevels"] = levels
    return json.dumps(doc).encode()


def _level(sgx, pcesvn, tdx_svns, status):
    return {
        "tcb": {
            "sgxtcbcomponents": [{"svn": s} for s in sgx],
            "pcesvn": pcesvn,
            "tdxtcbcomponents": [{"svn": s} for s in tdx_svns],
        },
        "tcbDate": "2023-01-01T00:00:00Z",
        "tcbStatus": status,
    }


def _platform_status(tcb_info: bytes, name: str = "tdx_prod_quote_SPR_E4.dat") -> str:
    """The TCB info's level matching alone (its signature cannot be remade for a changed body: the
    signed path with a test root is in test_tdx_module_tcb.py)."""
    quote = tdx.TdxQuote.from_bytes(read(name))
    pck = PckExtensions.from_certificate(trust.load_certificates(quote.signature_data.certification.pck_chain_pem)[0])
    level = IntelCollateral()._tcb_level(json.loads(tcb_info)["tcbInfo"], quote, pck, COLLATERAL_AT).level
    return "TCBNotSupported" if level is None else level["tcbStatus"]


def test_tcb_level_matching_uses_the_pck_extension_and_tee_tcb_svn():
    newer = _level([5, 5, 2, 2, 3, 1, 0, 3] + [0] * 8, 11, [3, 0, 5] + [0] * 13, "UpToDate")
    platform = _level([3, 3, 2, 2, 2, 1, 0, 2] + [0] * 8, 11, [3, 0, 4] + [0] * 13, "OutOfDate")
    assert _platform_status(_tcb_info_with_levels([newer, platform])) == "OutOfDate"
    # One PCE SVN above the platform's (11) and the level no longer matches.
    too_high = _level([3, 3, 2, 2, 2, 1, 0, 2] + [0] * 8, 12, [3, 0, 4] + [0] * 13, "UpToDate")
    assert _platform_status(_tcb_info_with_levels([too_high])) == "TCBNotSupported"
    # TDX 1.0 (TEE_TCB_SVN[1] = 0): every TEE_TCB_SVN byte counts, the module's SVN (byte 0) too.
    module_too_low = _level([3, 3, 2, 2, 2, 1, 0, 2] + [0] * 8, 11, [4, 0, 4] + [0] * 13, "UpToDate")
    assert _platform_status(_tcb_info_with_levels([module_too_low])) == "TCBNotSupported"


def test_unsigned_or_incomplete_collateral_gives_no_status():
    quote = read("tdx_prod_quote_SPR_E4.dat")
    unsigned = dataclasses.replace(IntelCollateral.from_directory(TDX), tcb_signing_chain=None)
    claims = tdx.verify_quote(quote, at=COLLATERAL_AT, collateral=unsigned).claims
    assert claims.tcb_status == "Unknown" and claims.tcb_info_evaluation_data_number is None
    assert claims.collateral_missing == (
        "no TCB Signing chain (tcb_signing_chain.pem), so the TCB info and QE identity are unsigned",
    )
    no_qe = dataclasses.replace(IntelCollateral.from_directory(TDX), qe_identity=None)
    claims = tdx.verify_quote(quote, at=COLLATERAL_AT, collateral=no_qe).claims
    assert (claims.tcb_status, claims.collateral_missing) == ("Unknown", ("no QE identity (qeIdentity.json)",))
    signed = tdx.verify_quote(quote, at=COLLATERAL_AT, collateral=IntelCollateral.from_directory(TDX)).claims
    assert (signed.tcb_status, signed.collateral_missing) == ("TCBNotSupported", ())
    assert (signed.tcb_info_evaluation_data_number, signed.qe_identity_evaluation_data_number) == (15, 15)


def test_pck_sgx_extension_is_decoded():
    result = tdx.verify_quote(read("tdx_prod_quote_SPR_E4.dat"), at=AT)
    pck = PckExtensions.from_certificate(result.pck_chain[0])
    assert pck.fmspc.hex() == "50806f000000"
    assert pck.pce_svn == 11
    assert pck.sgx_components[:8] == (3, 3, 2, 2, 2, 1, 0, 2)


def test_collateral_for_another_platform_is_refused():
    quote = tdx.TdxQuote.from_bytes(read("cos-113-tdx-quote.dat"))
    chain = trust.load_certificates(quote.signature_data.certification.pck_chain_pem)
    with pytest.raises(CollateralInvalid, match="FMSPC"):
        IntelCollateral.from_directory(TDX).evaluate(quote, chain, COLLATERAL_AT)


def test_stale_collateral_is_refused():
    collateral = IntelCollateral.from_directory(TDX)
    with pytest.raises(ChainInvalid, match="TCB Signing' is not valid"):
        tdx.verify_quote(read("tdx_prod_quote_SPR_E4.dat"), at=AT, collateral=collateral)
    # Unsigned bodies are not read at all, but the CRLs still are: expired, they refuse the quote.
    collateral = dataclasses.replace(collateral, tcb_signing_chain=None)
    with pytest.raises(CollateralInvalid, match="CRL of .* is not current"):
        tdx.verify_quote(read("tdx_prod_quote_SPR_E4.dat"), at=AT, collateral=collateral)


def test_qe_identity_mismatch_is_refused():
    doc = json.loads((TDX / "sample_qeIdentity_response").read_bytes())
    doc["enclaveIdentity"]["mrsigner"] = "00" * 32
    quote = tdx.TdxQuote.from_bytes(read("tdx_prod_quote_SPR_E4.dat"))
    with pytest.raises(CollateralInvalid, match="MRSIGNER"):
        IntelCollateral()._qe_level(doc["enclaveIdentity"], quote, COLLATERAL_AT)


def test_crl_from_the_wrong_issuer_is_refused():
    # The PCK CRL is signed by the PCK Platform CA, not by the root.
    collateral = IntelCollateral(root_crl=(TDX / "pckcrl").read_bytes())
    with pytest.raises(CollateralInvalid, match="issued by"):
        tdx.verify_quote(read("tdx_prod_quote_SPR_E4.dat"), at=COLLATERAL_AT, collateral=collateral)


def test_a_revoked_pck_is_refused():
    # No Intel key can sign a revoking CRL here, so revocation is shown on the simulated chain.
    sim = SimulatedTdx.from_seed(b"crl-test-seed-0123456789abcdef!!")
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(sim.root_certificate.subject)
        .last_update(now)
        .next_update(datetime(2027, 1, 1, tzinfo=timezone.utc))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(sim.pck_certificate.serial_number).revocation_date(now).build()
        )
        .sign(sim.root_key, hashes.SHA256())
    )
    collateral = IntelCollateral(pck_crl=crl.public_bytes(Encoding.DER))
    quote = sim.quote(bytes(64), b"m")
    with pytest.raises(CertificateRevoked, match="revoked"):
        tdx.verify_quote(quote, at=datetime(2026, 6, 1, tzinfo=timezone.utc), collateral=collateral)
