"""SEV-SNP report parsing and verification against the real Milan sample."""

import dataclasses
import struct
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from attestation import sevsnp, trust
from attestation.errors import ChainInvalid, ParseError, SignatureInvalid

TESTDATA = Path(__file__).resolve().parent / "data"
SNP = TESTDATA / "sev-snp"
AT = datetime(2026, 6, 1, tzinfo=timezone.utc)  # the VCEK is valid 2022-09-24 .. 2029-09-24


def report_bytes() -> bytes:
    return (SNP / "attestation.bin").read_bytes()


def vcek():
    return sevsnp.load_amd_certificates((SNP / "vcek.testcer").read_bytes())[0]


def milan():
    return sevsnp.load_amd_certificates((SNP / "milan.testcer").read_bytes())  # ASK, ARK


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def test_sample_parses_to_the_expected_fields():
    report = sevsnp.SnpReport.from_bytes(report_bytes())
    assert report.version == 2
    assert report.report_data[:5] == bytes([1, 2, 3, 4, 5]) and not any(report.report_data[5:])
    assert report.measurement.hex().startswith("b07af9620f3b839b47996422ddec6058")
    assert report.signature_algo == sevsnp.SIGNATURE_ALGO_ECDSA_P384_SHA384
    assert report.policy == 0xB0000
    assert report.vmpl == 0
    assert report.signing_key == sevsnp.SIGNING_KEY_VCEK
    assert report.chip_id.hex().startswith("3ac3fe21e13fb099")
    assert report.report_id.hex().startswith("8edc638e1857c555")
    assert report.report_id_ma == b"\xff" * 32
    tcb = report.reported_tcb
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == (2, 0, 5, 0x44)
    assert report.current_version == (1, 0x31, 3)
    assert report.signature_r.to_bytes(72, "little")[:4] == bytes.fromhex("4f8e8b5a")


def test_sample_verifies_to_the_pinned_milan_ark():
    result = sevsnp.verify_report(report_bytes(), [vcek(), *milan()], at=AT)
    assert [trust.common_name(c) for c in result.chain] == ["SEV-VCEK", "SEV-Milan", "ARK-Milan"]
    assert trust.fingerprint(result.chain[-1]) == trust.AMD_ARK_MILAN_SHA256


def test_the_ark_may_come_from_the_pins():
    ask = milan()[0]
    result = sevsnp.verify_report(report_bytes(), [vcek(), ask], at=AT)
    assert trust.common_name(result.chain[-1]) == "ARK-Milan"


def test_vlek_chain_is_rooted_in_the_milan_ark():
    asvk, ark = sevsnp.load_amd_certificates((SNP / "milanvlek.testcer").read_bytes())
    assert trust.common_name(asvk) == "SEV-VLEK-Milan"
    root = trust.verify_chain([asvk, ark], AT)
    assert trust.check_root(root, trust.amd_roots(), simulated_ok=False) is False


@pytest.mark.parametrize(
    "offset",
    [
        sevsnp.MEASUREMENT + 3,
        sevsnp.REPORT_DATA,
        sevsnp.POLICY,
        sevsnp.CHIP_ID + 10,
        sevsnp.SIGNED_SIZE - 1,
        sevsnp.SIGNATURE_R + 1,
        sevsnp.SIGNATURE_S + 40,
    ],
)
def test_a_flipped_byte_fails(offset):
    with pytest.raises(SignatureInvalid, match="report signature"):
        sevsnp.verify_report(flip(report_bytes(), offset), [vcek(), *milan()], at=AT)


def test_a_flipped_certificate_byte_fails():
    der = bytearray(vcek().public_bytes(Encoding.DER))
    der[-3] ^= 0x01  # inside the RSA-PSS signature value
    bad = sevsnp.load_amd_certificates(bytes(der))[0]
    with pytest.raises(SignatureInvalid, match="is not signed by"):
        sevsnp.verify_report(report_bytes(), [bad, *milan()], at=AT)


def test_a_wrong_pinned_root_fails():
    with pytest.raises(ChainInvalid, match="not a pinned root"):
        sevsnp.verify_report(report_bytes(), [vcek(), *milan()], at=AT, trusted_roots=trust.intel_roots())
    # Without the Milan ARK in the pins and the ASK's issuer cannot be found at all.
    with pytest.raises(ChainInvalid, match="no issuer"):
        sevsnp.verify_report(report_bytes(), [vcek(), milan()[0]], at=AT, trusted_roots=[trust.pinned_root("amd_ark_genoa.pem")])


def test_missing_vcek_is_reported():
    with pytest.raises(ChainInvalid, match="no VCEK supplied"):
        sevsnp.verify_report(report_bytes(), [], at=AT)
    with pytest.raises(ChainInvalid, match="no SEV-VCEK"):
        sevsnp.verify_report(report_bytes(), milan(), at=AT)


def test_vcek_must_match_the_chip_and_tcb():
    report = sevsnp.SnpReport.from_bytes(report_bytes())
    sevsnp._check_leaf_matches_report(vcek(), report, "Milan")
    with pytest.raises(ChainInvalid, match="another chip"):
        sevsnp._check_leaf_matches_report(vcek(), dataclasses.replace(report, chip_id=bytes(64)), "Milan")
    other_tcb = sevsnp.TcbVersion.from_int(report.reported_tcb.raw + 1)  # bootloader SPL 3
    with pytest.raises(ChainInvalid, match="bootloader SPL 2"):
        sevsnp._check_leaf_matches_report(vcek(), dataclasses.replace(report, reported_tcb=other_tcb), "Milan")


def test_vcek_tcb_extensions_must_be_present():
    # The ASK carries no SPL extensions: as a leaf it says nothing about the TCB it vouches for.
    report = sevsnp.SnpReport.from_bytes(report_bytes())
    with pytest.raises(ChainInvalid, match="has no bootloader SPL extension"):
        sevsnp._check_leaf_matches_report(milan()[0], report, "Milan")


def test_a_vcek_alone_verifies_through_the_pinned_ask():
    result = sevsnp.verify_report(report_bytes(), [vcek()], at=AT)
    assert [trust.common_name(c) for c in result.chain] == ["SEV-VCEK", "SEV-Milan", "ARK-Milan"]
    assert trust.fingerprint(result.chain[1]) == trust.AMD_ASK_MILAN_SHA256
    claims = result.claims
    assert claims.product == "Milan" and claims.signing_key == "vcek"
    assert claims.tcb_status == "Unknown"  # no AMD CRL given
    assert (claims.reported_tcb.bootloader, claims.reported_tcb.snp, claims.reported_tcb.microcode) == (2, 5, 0x44)
    assert claims.policy == 0xB0000 and claims.debug is True  # bit 19: this sample guest allows debugging
    assert claims.vmpl == 0


def test_the_ark_must_be_the_chip_familys():
    report = sevsnp.SnpReport.from_bytes(report_bytes())
    assert sevsnp.product_of(vcek(), report) == "Milan"
    # A version 3 report names its CPU: a Genoa CPUID with a Milan VCEK is refused.
    genoa = dataclasses.replace(report, cpuid_fam_id=0x19, cpuid_mod_id=0x11)
    with pytest.raises(ChainInvalid, match="not a Milan chip"):
        sevsnp.product_of(vcek(), genoa)
    # The Milan VCEK's chain cannot end in another family's ARK.
    with pytest.raises(ChainInvalid, match="no issuer"):
        sevsnp.verify_report(report_bytes(), [vcek(), milan()[0]], at=AT, trusted_roots=[trust.amd_ark("Turin")])
    with pytest.raises(ChainInvalid, match="no pinned ARK"):
        trust.amd_ark("Rome")


def test_a_crl_from_another_issuer_is_refused():
    from attestation.errors import CollateralInvalid

    intel_crl = (TESTDATA / "tdx" / "rootcrl.der").read_bytes()
    with pytest.raises(CollateralInvalid, match="issued by"):
        sevsnp.verify_report(report_bytes(), [vcek()], at=AT, crl=intel_crl)


def test_expired_certificates_fail_at_a_later_time():
    with pytest.raises(ChainInvalid, match="not valid at"):
        sevsnp.verify_report(report_bytes(), [vcek(), *milan()], at=datetime(2030, 1, 1, tzinfo=timezone.utc))


def test_bad_reports_are_parse_errors():
    data = report_bytes()
    for cut in (0, 100, sevsnp.SIGNED_SIZE, len(data) - 1):
        with pytest.raises(ParseError, match="1184"):
            sevsnp.SnpReport.from_bytes(data[:cut])
    with pytest.raises(ParseError, match="version 1"):
        sevsnp.SnpReport.from_bytes(struct.pack("<I", 1) + data[4:])
    with pytest.raises(ParseError, match="signature algorithm"):
        sevsnp.SnpReport.from_bytes(data[:0x34] + struct.pack("<I", 2) + data[0x38:])
    with pytest.raises(ParseError, match="VMPL"):
        sevsnp.SnpReport.from_bytes(data[:0x30] + struct.pack("<I", 9) + data[0x34:])
    assert sevsnp.looks_like_snp_report(data)
    assert not sevsnp.looks_like_snp_report(data + b"\x00")
