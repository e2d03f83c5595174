"""Vendor collateral for the node's own evidence: fetched from Intel PCS / AMD KDS, or read from a directory.

The node bundles it in every attestation document (`collateral.intel` / `collateral.amd`,
docs/protocol.md) so clients appraise offline. Collateral is vendor-signed: the node only
fetches and caches it, it never vouches for it. Once it is past its `nextUpdate` the node stops
shipping it (clients then see TCB status `Unknown`) until a refresh succeeds.
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from .. import sevsnp, tdx, trust
from ..collateral import AmdCollateral, intel_from_directory
from ..errors import AttestationError
from ..intel import IntelCollateral, PckExtensions

log = logging.getLogger("tee_node.collateral")

# Intel PCS v4 (TDX) and AMD KDS paths, below the configured base URLs.
PCS_TCB_INFO = "/tdx/certification/v4/tcb"
PCS_QE_IDENTITY = "/tdx/certification/v4/qe/identity"
PCS_PCK_CRL = "/sgx/certification/v4/pckcrl"
PCS_TCB_INFO_CHAIN_HEADER = "TCB-Info-Issuer-Chain"
PCS_QE_IDENTITY_CHAIN_HEADER = "SGX-Enclave-Identity-Issuer-Chain"
PCS_PCK_CRL_CHAIN_HEADER = "SGX-PCK-CRL-Issuer-Chain"
# Which PCK CA issued the platform's certificate decides which PCK CRL applies.
_PCK_CA = {"Intel SGX PCK Platform CA": "platform", "Intel SGX PCK Processor CA": "processor"}


class CollateralUnavailable(AttestationError):
    """A vendor service did not answer with usable collateral (the node keeps what it has)."""


@dataclass(frozen=True)
class Platform:
    """What the collateral services need to know about this machine, read from its own evidence."""

    tee: str
    fmspc: str | None = None  # TDX: from the PCK certificate
    pck_ca: str | None = None  # TDX: "platform" or "processor"
    product: str | None = None  # SEV-SNP: Milan, Genoa, Turin
    hwid: str | None = None  # SEV-SNP: CHIP_ID (8 bytes on Turin)
    tcb: dict[str, int] | None = None  # SEV-SNP: REPORTED_TCB as KDS query parameters

    @classmethod
    def from_evidence(cls, tee: str, quote: bytes, certificates: str | None) -> "Platform":
        if tee == "tdx":
            parsed = tdx.TdxQuote.from_bytes(quote)
            chain = trust.load_certificates(parsed.signature_data.certification.pck_chain_pem)
            ca = _PCK_CA.get(trust.common_name(chain[1]))
            return cls(tee=tee, fmspc=PckExtensions.from_certificate(chain[0]).fmspc.hex(), pck_ca=ca)
        report = sevsnp.SnpReport.from_bytes(quote)
        certs = sevsnp.load_amd_certificates(certificates.encode()) if certificates else []
        leaf = next((c for c in certs if trust.common_name(c) in ("SEV-VCEK", "SEV-VLEK")), None)
        product = sevsnp.product_of(leaf, report) if leaf is not None else _product_from_cpuid(report)
        tcb = sevsnp.decode_tcb(report.reported_tcb.raw, product)
        params = {"blSPL": tcb.bootloader, "teeSPL": tcb.tee, "snpSPL": tcb.snp, "ucodeSPL": tcb.microcode}
        if tcb.fmc is not None:
            params["fmcSPL"] = tcb.fmc
        hwid = report.chip_id[:8] if product == "Turin" else report.chip_id
        return cls(tee=tee, product=product, hwid=hwid.hex(), tcb=params)


def _product_from_cpuid(report: sevsnp.SnpReport) -> str:
    product = sevsnp.CPUID_PRODUCT.get((report.cpuid_fam_id, report.cpuid_mod_id >> 4))
    if product is None:
        raise CollateralUnavailable("the SEV-SNP report names no known chip family and the host gave no VCEK")
    return product


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[bytes, Any]:
    try:
        async with session.get(url) as response:
            body = await response.read()
            if response.status != 200:
                raise CollateralUnavailable(f"{url.split('?')[0]} answered HTTP {response.status}")
            return body, response.headers
    except aiohttp.ClientError as exc:
        raise CollateralUnavailable(f"{url.split('?')[0]} is unreachable ({type(exc).__name__})") from None


def _chain_header(headers: Any, name: str) -> str:
    value = headers.get(name)
    if not value:
        raise CollateralUnavailable(f"the PCS response has no {name} header")
    return urllib.parse.unquote(value)


async def fetch_intel(session: aiohttp.ClientSession, platform: Platform, pcs_url: str, root_crl_url: str) -> tuple[IntelCollateral, str]:
    """TCB info, QE identity, PCK and root CRLs (with issuer chains) for the platform's FMSPC."""
    base = pcs_url.rstrip("/")
    tcb_info, headers = await _get(session, f"{base}{PCS_TCB_INFO}?fmspc={platform.fmspc}")
    tcb_chain = _chain_header(headers, PCS_TCB_INFO_CHAIN_HEADER)
    qe_identity, headers = await _get(session, f"{base}{PCS_QE_IDENTITY}")
    if _chain_header(headers, PCS_QE_IDENTITY_CHAIN_HEADER) != tcb_chain:
        raise CollateralUnavailable("PCS signed TCB info and QE identity with different chains")
    pck_crl, headers = await _get(session, f"{base}{PCS_PCK_CRL}?ca={platform.pck_ca or 'platform'}&encoding=der")
    pck_crl_chain = _chain_header(headers, PCS_PCK_CRL_CHAIN_HEADER)
    root_crl, _ = await _get(session, root_crl_url)
    collateral = IntelCollateral(
        pck_crl=pck_crl, root_crl=root_crl, tcb_info=tcb_info, qe_identity=qe_identity, tcb_signing_chain=tcb_chain.encode()
    )
    return collateral, pck_crl_chain


async def fetch_amd(session: aiohttp.ClientSession, platform: Platform, kds_url: str) -> AmdCollateral:
    """The chip's VCEK at its REPORTED_TCB, the family's ASK + ARK and AMD's CRL."""
    base = f"{kds_url.rstrip('/')}/vcek/v1/{platform.product}"
    query = urllib.parse.urlencode(platform.tcb or {})
    vcek, _ = await _get(session, f"{base}/{platform.hwid}?{query}")
    chain, _ = await _get(session, f"{base}/cert_chain")
    crl, _ = await _get(session, f"{base}/crl")
    return AmdCollateral(vcek=vcek, cert_chain=chain.decode(), crl=crl)


class CollateralCache:
    """The collateral the node currently ships, from a directory or the vendors' services."""

    def __init__(self) -> None:
        self.intel: IntelCollateral | None = None
        self.pck_crl_issuer_chain: str | None = None
        self.amd: AmdCollateral | None = None

    def load_directory(self, path: str | Path) -> None:
        intel, chain = intel_from_directory(path)
        if intel.tcb_info is not None:
            self.intel, self.pck_crl_issuer_chain = intel, chain
        self.amd = AmdCollateral.from_directory(path) or self.amd

    async def refresh(self, session: aiohttp.ClientSession, platform: Platform, *, pcs_url: str, root_crl_url: str, kds_url: str) -> None:
        if platform.tee == "tdx":
            self.intel, self.pck_crl_issuer_chain = await fetch_intel(session, platform, pcs_url, root_crl_url)
        else:
            self.amd = await fetch_amd(session, platform, kds_url)

    def next_update(self) -> datetime | None:
        """When the earliest part of what is held stops being current."""
        times = [t for t in (self.intel.next_update() if self.intel else None, self.amd.next_update() if self.amd else None) if t]
        return min(times) if times else None

    def document(self, now: datetime | None = None) -> dict[str, Any]:
        """`collateral` for the attestation document: what is held and still current, else null."""
        now = trust.as_utc(now)
        intel = self.intel if self.intel is not None and _current(self.intel.next_update(), now) else None
        amd = self.amd if self.amd is not None and _current(self.amd.next_update(), now) else None
        return {
            "intel": intel.to_document(self.pck_crl_issuer_chain or "") if intel is not None else None,
            "amd": amd.to_document() if amd is not None else None,
            "nvidia": None,  # NvidiaCollateral fills it (node/server/attestation.py)
        }


def _current(next_update: datetime | None, now: datetime) -> bool:
    return next_update is None or now <= next_update
