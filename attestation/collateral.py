"""Vendor collateral on disk and in the attestation document: Intel PCS and AMD KDS files.

A collateral directory (`attestation.collateral_dir`, `tee-node quote verify --collateral DIR`)
holds any of these files (docs/policy.md lists them):

  Intel: tcbInfo.json | sample_tcbInfo_response, qeIdentity.json | sample_qeIdentity_response,
         pckcrl, rootcrl.der, tcb_signing_chain.pem, pck_crl_issuer_chain.pem
  AMD:   vcek.der (or vcek.pem), amd_cert_chain.pem (ASK + ARK), amd_crl.der
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from . import trust
from .errors import CollateralInvalid, DocumentInvalid
from .intel import IntelCollateral
from .sevsnp import load_amd_certificates

AMD_VCEK_FILES = ("vcek.der", "vcek.pem")
AMD_CHAIN_FILE = "amd_cert_chain.pem"
AMD_CRL_FILE = "amd_crl.der"
PCK_CRL_ISSUER_CHAIN_FILE = "pck_crl_issuer_chain.pem"


def _read(base: Path, *names: str) -> bytes | None:
    for name in names:
        if (base / name).is_file():
            return (base / name).read_bytes()
    return None


@dataclass(frozen=True)
class AmdCollateral:
    """AMD KDS responses for one chip: its VCEK (DER), the ASK + ARK chain (PEM) and AMD's CRL (DER)."""

    vcek: bytes
    cert_chain: str
    crl: bytes | None = None

    @classmethod
    def from_directory(cls, path: str | Path) -> "AmdCollateral | None":
        base = Path(path)
        vcek = _read(base, *AMD_VCEK_FILES)
        chain = _read(base, AMD_CHAIN_FILE)
        if vcek is None or chain is None:
            return None
        (cert,) = load_amd_certificates(vcek)
        return cls(vcek=cert.public_bytes(Encoding.DER), cert_chain=chain.decode(), crl=_read(base, AMD_CRL_FILE))

    @classmethod
    def from_document(cls, amd: dict[str, Any]) -> "AmdCollateral":
        """The `collateral.amd` object of an attestation document v2 (docs/protocol.md)."""
        try:
            vcek = base64.b64decode(amd["vcek"], validate=True)
            crl = None if amd["crl"] is None else base64.b64decode(amd["crl"], validate=True)
            if not isinstance(amd["cert_chain"], str):
                raise TypeError
        except (KeyError, TypeError, binascii.Error, ValueError):
            raise DocumentInvalid("collateral.amd is not in the shape of the attestation document (docs/protocol.md)") from None
        return cls(vcek=vcek, cert_chain=amd["cert_chain"], crl=crl)

    def certificates(self) -> list[x509.Certificate]:
        return [*load_amd_certificates(self.vcek), *load_amd_certificates(self.cert_chain.encode())]

    def to_document(self) -> dict[str, Any]:
        return {
            "vcek": base64.b64encode(self.vcek).decode(),
            "cert_chain": self.cert_chain,
            "crl": base64.b64encode(self.crl).decode() if self.crl is not None else None,
        }

    def next_update(self) -> datetime | None:
        if self.crl is None:
            return None
        return trust.load_crl(self.crl).next_update_utc


def intel_from_directory(path: str | Path) -> tuple[IntelCollateral, str | None]:
    """Intel collateral and the PCK CRL issuer chain (PEM) if it was saved beside it."""
    chain = _read(Path(path), PCK_CRL_ISSUER_CHAIN_FILE)
    return IntelCollateral.from_directory(path), chain.decode() if chain is not None else None


@dataclass(frozen=True)
class LocalCollateral:
    """A client's own vendor collateral (`--collateral DIR`): checked like the document's (signatures,
    CRLs, freshness) and used in its place, vendor by vendor, so that a client holding fresher
    collateral does not depend on what the node chose to ship."""

    intel: IntelCollateral | None = None
    amd: AmdCollateral | None = None

    @classmethod
    def from_directory(cls, path: str | Path) -> "LocalCollateral":
        base = Path(path)
        if not base.is_dir():
            raise CollateralInvalid(f"collateral directory {path} does not exist")
        intel = IntelCollateral.from_directory(base)
        has_intel = any(getattr(intel, f.name) is not None for f in fields(intel))
        local = cls(intel=intel if has_intel else None, amd=AmdCollateral.from_directory(base))
        if local.intel is None and local.amd is None:
            raise CollateralInvalid(f"collateral directory {path} holds none of the files docs/policy.md lists")
        return local
