"""Vendor collateral: fetched from a local fake Intel PCS / AMD KDS (127.0.0.1) serving the sample
files, retried after a failure, cached, bundled in the document's shape and checked by clients."""

from __future__ import annotations

import logging
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding

from attestation import sevsnp, tdx, trust
from attestation.collateral import AmdCollateral
from attestation.errors import CollateralInvalid
from attestation.intel import IntelCollateral
from attestation.producers.collateral import CollateralCache, CollateralUnavailable, Platform, fetch_amd
from node.server.attestation import AttestationService
from server_support import echo_config

TESTDATA = Path(__file__).resolve().parent / "data"
TDX = TESTDATA / "tdx"
SNP = TESTDATA / "sev-snp"
SAMPLE = (TDX / "tdx_prod_quote_SPR_E4.dat").read_bytes()
IN_VALIDITY = datetime(2023, 6, 20, tzinfo=timezone.utc)
EXPIRED = datetime(2023, 7, 20, tzinfo=timezone.utc)


def pck_issuer_chain() -> str:
    chain = trust.load_certificates(tdx.TdxQuote.from_bytes(SAMPLE).signature_data.certification.pck_chain_pem)
    return "".join(c.public_bytes(Encoding.PEM).decode() for c in chain[1:])


class FakeVendors:
    """Intel PCS and AMD KDS answering from tests/data; `failures` answers 503 that many times first."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.requests: list[str] = []
        tcb_chain = urllib.parse.quote((TDX / "tcb_signing_chain.pem").read_text())
        self.app = web.Application()
        self.app.router.add_get("/tdx/certification/v4/tcb", self._file(TDX / "sample_tcbInfo_response", {"TCB-Info-Issuer-Chain": tcb_chain}))
        self.app.router.add_get(
            "/tdx/certification/v4/qe/identity",
            self._file(TDX / "sample_qeIdentity_response", {"SGX-Enclave-Identity-Issuer-Chain": tcb_chain}),
        )
        self.app.router.add_get(
            "/sgx/certification/v4/pckcrl", self._file(TDX / "pckcrl", {"SGX-PCK-CRL-Issuer-Chain": urllib.parse.quote(pck_issuer_chain())})
        )
        self.app.router.add_get("/IntelSGXRootCA.der", self._file(TDX / "rootcrl.der", {}))
        vcek = sevsnp.load_amd_certificates((SNP / "vcek.testcer").read_bytes())[0].public_bytes(Encoding.DER)
        self.app.router.add_get("/vcek/v1/Milan/cert_chain", self._bytes((SNP / "milan.testcer").read_bytes()))
        self.app.router.add_get("/vcek/v1/Milan/crl", self._bytes(b"CRL bytes"))
        self.app.router.add_get("/vcek/v1/Milan/{hwid}", self._bytes(vcek))

    def _answer(self, request: web.Request, body: bytes, headers: dict[str, str]) -> web.Response:
        self.requests.append(str(request.rel_url))
        if self.failures:
            self.failures -= 1
            return web.Response(status=503)
        return web.Response(body=body, headers=headers)

    def _file(self, path: Path, headers: dict[str, str]):
        async def handler(request: web.Request) -> web.Response:
            return self._answer(request, path.read_bytes(), headers)

        return handler

    def _bytes(self, body: bytes):
        async def handler(request: web.Request) -> web.Response:
            return self._answer(request, body, {})

        return handler


@pytest.fixture
async def vendors(aiohttp_server):
    async def start(failures: int = 0) -> tuple[FakeVendors, str]:
        fake = FakeVendors(failures)
        server = await aiohttp_server(fake.app, host="127.0.0.1")
        return fake, f"http://127.0.0.1:{server.port}"

    return start


def service(url: str) -> AttestationService:
    config = echo_config(attestation={"pcs_url": url, "intel_root_crl_url": f"{url}/IntelSGXRootCA.der", "kds_url": url,
                                      "collateral_retry": 7.0, "simulated_seed": "11" * 32})
    return AttestationService(config)


async def test_intel_collateral_is_fetched_retried_and_bundled(vendors, caplog):
    fake, url = await vendors(failures=1)
    platform = Platform.from_evidence("tdx", SAMPLE, None)
    assert (platform.fmspc, platform.pck_ca) == ("50806f000000", "platform")
    attestation = service(url)
    async with aiohttp.ClientSession() as session:
        with caplog.at_level(logging.WARNING, logger="tee_node.collateral"):
            assert await attestation.refresh_collateral(session, platform) == 7.0  # failed: retry soon
        assert "collateral fetch failed" in caplog.text and "HTTP 503" in caplog.text
        assert attestation.cpu_collateral.intel is None and attestation.cpu_collateral.document()["intel"] is None
        await attestation.refresh_collateral(session, platform)
    assert fake.requests[1] == "/tdx/certification/v4/tcb?fmspc=50806f000000"
    assert "/sgx/certification/v4/pckcrl?ca=platform&encoding=der" in fake.requests

    bundled = attestation.cpu_collateral.document(now=IN_VALIDITY)
    intel = bundled["intel"]
    assert set(intel) == {"tcb_info", "tcb_info_issuer_chain", "qe_identity", "qe_identity_issuer_chain",
                          "pck_crl", "pck_crl_issuer_chain", "root_ca_crl"}
    assert intel["tcb_info"] == (TDX / "sample_tcbInfo_response").read_text()  # the exact PCS body
    assert intel["pck_crl_issuer_chain"] == pck_issuer_chain()
    # A client appraises offline from what the document carries.
    result = tdx.verify_quote(SAMPLE, at=IN_VALIDITY, collateral=IntelCollateral.from_document(intel))
    assert result.claims.tcb_status == "TCBNotSupported"
    assert "TCB info: TCBNotSupported" in result.claims.collateral_notes  # signed: no "NOT verified"
    # Past nextUpdate the node stops shipping it: clients then compute Unknown.
    assert attestation.cpu_collateral.document(now=EXPIRED)["intel"] is None
    assert attestation.cpu_collateral.next_update() == datetime(2023, 7, 8, 7, 24, 59, tzinfo=timezone.utc)  # the QE identity's


def test_tampered_bundled_collateral_is_refused():
    cache = CollateralCache()
    cache.load_directory(TDX)
    intel = cache.document(now=IN_VALIDITY)["intel"]
    tampered = dict(intel, tcb_info=intel["tcb_info"].replace('"tcbStatus":"OutOfDate"', '"tcbStatus":"UpToDate"', 1))
    with pytest.raises(CollateralInvalid, match="signature does not verify"):
        tdx.verify_quote(SAMPLE, at=IN_VALIDITY, collateral=IntelCollateral.from_document(tampered))
    with pytest.raises(CollateralInvalid, match="shape"):
        IntelCollateral.from_document({**intel, "pck_crl": "not base64!"})


async def test_amd_collateral_is_fetched_for_the_chip_and_its_tcb(vendors):
    fake, url = await vendors()
    certs = (SNP / "vcek.testcer").read_bytes()
    pem = sevsnp.load_amd_certificates(certs)[0].public_bytes(Encoding.PEM).decode()
    platform = Platform.from_evidence("sev-snp", (SNP / "attestation.bin").read_bytes(), pem)
    assert platform.product == "Milan" and platform.tcb == {"blSPL": 2, "teeSPL": 0, "snpSPL": 5, "ucodeSPL": 68}
    async with aiohttp.ClientSession() as session:
        amd = await fetch_amd(session, platform, url)
    assert fake.requests[0] == f"/vcek/v1/Milan/{platform.hwid}?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68"
    shipped = AmdCollateral.from_document(amd.to_document())
    # The bundled VCEK and chain alone verify the report (the CRL here is a stand-in: not checked).
    result = sevsnp.verify_report((SNP / "attestation.bin").read_bytes(), shipped.certificates(), at=datetime(2026, 6, 1, tzinfo=timezone.utc))
    assert [trust.common_name(c) for c in result.chain] == ["SEV-VCEK", "SEV-Milan", "ARK-Milan"]


async def test_an_unreachable_vendor_is_a_collateral_failure():
    platform = Platform.from_evidence("tdx", SAMPLE, None)
    cache = CollateralCache()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(CollateralUnavailable, match="unreachable"):
            await cache.refresh(session, platform, pcs_url="http://127.0.0.1:9", root_crl_url="http://127.0.0.1:9/x", kds_url="")
    assert cache.intel is None


async def test_the_node_reads_its_collateral_directory_and_ships_only_current_collateral(make_node):
    from server_support import wait_for

    node = await make_node(attestation={"collateral_dir": str(TDX)})
    await wait_for(lambda: node.state.attestation.cpu_collateral.intel is not None, what="collateral loaded")
    cache = node.state.attestation.cpu_collateral
    assert cache.document(now=IN_VALIDITY)["intel"] is not None
    response = await node.client.get(f"/v1/attestation?nonce={'00' * 32}")
    doc = await response.json()
    # The sample collateral expired in 2023: today the node ships none, and clients see Unknown.
    assert doc["collateral"] == {"intel": None, "amd": None, "nvidia": None}
