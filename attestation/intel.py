"""Intel PCS collateral for TDX quotes: CRLs, QE identity and TCB info, giving a TCB status string.

The JSON bodies are matched against the quote and the PCK certificate, as Intel's QVL does (TCB
info v3: the TDX module's identity and TCB levels from `tdxModuleIdentities` for TDX 1.5 and
later). Only collateral whose signature verifies under the Intel SGX TCB Signing chain (which PCS
sends in a response header, not in the body) yields a status: without that chain, the TCB info or
the QE identity, the status is `Unknown` and `missing` says what was absent. Whether a status is
acceptable is decided by `appraise`, not here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from . import der, trust
from .claims import TCB_UNKNOWN
from .errors import CollateralInvalid


class TdxQuoteParts(Protocol):
    """What the collateral checks read of a TDX quote (`tdx.TdxQuote` has it): named by shape,
    so that this module, which `tdx` imports, needs nothing of `tdx`'s."""

    @property
    def body(self) -> Any: ...

    @property
    def signature_data(self) -> Any: ...


OID_SGX_EXTENSIONS = "1.2.840.113741.1.13.1"
OID_SGX_TCB = OID_SGX_EXTENSIONS + ".2"
OID_SGX_PCESVN = OID_SGX_TCB + ".17"
OID_SGX_CPUSVN = OID_SGX_TCB + ".18"
OID_SGX_PCEID = OID_SGX_EXTENSIONS + ".3"
OID_SGX_FMSPC = OID_SGX_EXTENSIONS + ".4"
TCB_COMPONENT_COUNT = 16
TCB_SIGNING_COMMON_NAME = "Intel SGX TCB Signing"
# PCS signs the exact bytes of the inner object: {"<name>":<signed bytes>,"signature":"<hex r||s>"}.
_SIGNED_JSON = re.compile(rb'\{"(tcbInfo|enclaveIdentity)":(\{.*\}),"signature":"([0-9a-fA-F]{128})"\}\s*', re.S)

# Worst last; the overall status is the worst of the platform (TCB info) and QE (QE identity) statuses.
_STATUS_ORDER = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "TCBNotSupported",  # the platform is below every level the collateral lists
    "Revoked",
)


@dataclass(frozen=True)
class PckExtensions:
    fmspc: bytes
    pce_id: bytes
    pce_svn: int
    cpu_svn: bytes
    sgx_components: tuple[int, ...]

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> "PckExtensions":
        try:
            raw = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_SGX_EXTENSIONS)).value.value
        except x509.ExtensionNotFound:
            raise CollateralInvalid("PCK certificate has no SGX extensions") from None
        tag, body, _ = der.read_tlv(raw)
        items = dict(_oid_items(body))
        if tag != der.TAG_SEQUENCE or OID_SGX_TCB not in items or OID_SGX_FMSPC not in items:
            raise CollateralInvalid("PCK certificate SGX extensions are incomplete")
        tcb = dict(_oid_items(items[OID_SGX_TCB][1]))
        comps = tuple(
            int.from_bytes(tcb[f"{OID_SGX_TCB}.{i}"][1], "big") for i in range(1, TCB_COMPONENT_COUNT + 1)
        )
        return cls(
            fmspc=items[OID_SGX_FMSPC][1],
            pce_id=items[OID_SGX_PCEID][1],
            pce_svn=int.from_bytes(tcb[OID_SGX_PCESVN][1], "big"),
            cpu_svn=tcb[OID_SGX_CPUSVN][1],
            sgx_components=comps,
        )


def _oid_items(body: bytes):
    """SEQUENCE { SEQUENCE { OID, value } ... } -> (dotted OID, (tag, value))."""
    for tag, entry in der.iter_elements(body):
        if tag != der.TAG_SEQUENCE:
            raise CollateralInvalid("PCK SGX extension entry is not a SEQUENCE")
        elements = list(der.iter_elements(entry))
        if len(elements) != 2 or elements[0][0] != der.TAG_OID:
            raise CollateralInvalid("PCK SGX extension entry is malformed")
        yield der.decode_oid(elements[0][1]), elements[1]


@dataclass(frozen=True)
class CollateralResult:
    status: str
    advisory_ids: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  # why the status is Unknown
    tcb_info_evaluation_data_number: int | None = None
    qe_identity_evaluation_data_number: int | None = None


NO_COLLATERAL = CollateralResult(status=TCB_UNKNOWN, missing=("no Intel collateral came with the evidence",))


def _parse_time(value: str) -> datetime:
    return trust.as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))


def _check_current(body: dict[str, Any], what: str, at: datetime) -> None:
    if not _parse_time(body["issueDate"]) <= at <= _parse_time(body["nextUpdate"]):
        raise CollateralInvalid(f"{what} is not current at {at.isoformat()}")


def _masked_equal(value: bytes, expected_hex: str, mask_hex: str) -> bool:
    expected, mask = bytes.fromhex(expected_hex), bytes.fromhex(mask_hex)
    if not len(value) == len(expected) == len(mask):
        return False
    return all((v & m) == (e & m) for v, e, m in zip(value, expected, mask))


def _worst(*statuses: str) -> str:
    def rank(s: str) -> int:
        return _STATUS_ORDER.index(s) if s in _STATUS_ORDER else len(_STATUS_ORDER)

    return max(statuses, key=rank)


@dataclass(frozen=True)
class IntelCollateral:
    """Raw PCS responses; any of them may be absent."""

    pck_crl: bytes | None = None  # issued by the PCK Platform/Processor CA
    root_crl: bytes | None = None  # issued by the Intel SGX Root CA
    tcb_info: bytes | None = None  # body of /tdx/certification/v4/tcb
    qe_identity: bytes | None = None  # body of /tdx/certification/v4/qe/identity
    tcb_signing_chain: bytes | None = None  # PEM issuer chain header of those two responses

    @classmethod
    def from_directory(cls, path: str | Path) -> "IntelCollateral":
        """Files named like the testdata (pckcrl, rootcrl.der, sample_tcbInfo_response, sample_qeIdentity_response)
        or tcbInfo.json / qeIdentity.json, plus tcb_signing_chain.pem when the issuer chain was saved."""
        base = Path(path)

        def read(*names: str) -> bytes | None:
            for name in names:
                if (base / name).is_file():
                    return (base / name).read_bytes()
            return None

        return cls(
            pck_crl=read("pckcrl", "pckcrl.der"),
            root_crl=read("rootcrl.der", "rootcrl"),
            tcb_info=read("tcbInfo.json", "sample_tcbInfo_response"),
            qe_identity=read("qeIdentity.json", "sample_qeIdentity_response"),
            tcb_signing_chain=read("tcb_signing_chain.pem"),
        )

    @classmethod
    def from_document(cls, intel: dict[str, Any]) -> "IntelCollateral":
        """The `collateral.intel` object of an attestation document v2 (docs/protocol.md)."""
        try:
            texts = {k: intel[k] for k in ("tcb_info", "tcb_info_issuer_chain", "qe_identity", "qe_identity_issuer_chain")}
            if not all(isinstance(v, str) for v in texts.values()):
                raise TypeError
            if texts["tcb_info_issuer_chain"] != texts["qe_identity_issuer_chain"]:
                raise CollateralInvalid("collateral.intel: TCB info and QE identity must be signed by the same TCB Signing chain")
            pck_crl = base64.b64decode(intel["pck_crl"], validate=True)
            root_crl = base64.b64decode(intel["root_ca_crl"], validate=True)
        except (KeyError, TypeError, binascii.Error, ValueError):
            raise CollateralInvalid("collateral.intel is not in the shape of the attestation document (docs/protocol.md)") from None
        return cls(
            pck_crl=pck_crl,
            root_crl=root_crl,
            tcb_info=texts["tcb_info"].encode(),
            qe_identity=texts["qe_identity"].encode(),
            tcb_signing_chain=texts["tcb_info_issuer_chain"].encode(),
        )

    def to_document(self, pck_crl_issuer_chain: str) -> dict[str, Any] | None:
        """`collateral.intel` for the attestation document, or None unless every part is at hand."""
        parts = (self.pck_crl, self.root_crl, self.tcb_info, self.qe_identity, self.tcb_signing_chain)
        if any(part is None for part in parts):
            return None
        chain = self.tcb_signing_chain.decode()  # type: ignore[union-attr]
        return {
            "tcb_info": self.tcb_info.decode(),  # type: ignore[union-attr]
            "tcb_info_issuer_chain": chain,
            "qe_identity": self.qe_identity.decode(),  # type: ignore[union-attr]
            "qe_identity_issuer_chain": chain,
            "pck_crl": base64.b64encode(self.pck_crl).decode(),  # type: ignore[arg-type]
            "pck_crl_issuer_chain": pck_crl_issuer_chain,
            "root_ca_crl": base64.b64encode(self.root_crl).decode(),  # type: ignore[arg-type]
        }

    def next_update(self) -> datetime | None:
        """The earliest `nextUpdate` of the parts present: after it this collateral proves nothing."""
        times: list[datetime] = []
        for raw in (self.pck_crl, self.root_crl):
            if raw is not None:
                crl = trust.load_crl(raw)
                if crl.next_update_utc is not None:
                    times.append(crl.next_update_utc)
        for raw, name in ((self.tcb_info, "tcbInfo"), (self.qe_identity, "enclaveIdentity")):
            if raw is not None:
                try:
                    times.append(_parse_time(json.loads(raw)[name]["nextUpdate"]))
                except (KeyError, TypeError, ValueError):
                    raise CollateralInvalid(f"{name} collateral has no readable nextUpdate") from None
        return min(times) if times else None

    def evaluate(self, quote: TdxQuoteParts, chain: Sequence[x509.Certificate], at: datetime) -> CollateralResult:
        notes: list[str] = []
        leaf, intermediate, root = chain[0], chain[1], chain[-1]
        signer = self._tcb_signer(root, at) if self.tcb_signing_chain is not None else None
        if self.root_crl is not None:
            # The root CRL covers every certificate the root issued: PCK CAs and the TCB Signing certificate.
            issued = [*chain[1:-1], *([signer] if signer is not None else [])]
            trust.check_crl(trust.load_crl(self.root_crl), root, issued, at)
            notes.append("root CRL checked")
        if self.pck_crl is not None:
            trust.check_crl(trust.load_crl(self.pck_crl), intermediate, [leaf], at)
            notes.append("PCK CRL checked")
        missing = [what for what, part in (
            ("TCB Signing chain (tcb_signing_chain.pem), so the TCB info and QE identity are unsigned", self.tcb_signing_chain),
            ("TCB info (tcbInfo.json)", self.tcb_info),
            ("QE identity (qeIdentity.json)", self.qe_identity),
            ("PCK CRL (pckcrl)", self.pck_crl),
            ("Root CA CRL (rootcrl.der)", self.root_crl),
        ) if part is None]
        if missing or signer is None:
            # Unsigned JSON proves nothing; a platform level without the QE's (or the reverse), or a
            # status for a PCK whose revocation is unknown, is half a status.
            return CollateralResult(status=TCB_UNKNOWN, notes=tuple(notes), missing=tuple(f"no {what}" for what in missing))
        try:
            qe_body = self._body(self.qe_identity, "enclaveIdentity", signer)  # type: ignore[arg-type]
            qe_level = self._qe_level(qe_body, quote, at)
            tcb_body = self._body(self.tcb_info, "tcbInfo", signer)  # type: ignore[arg-type]
            platform = self._tcb_level(tcb_body, quote, PckExtensions.from_certificate(leaf), at)
            levels = [("QE identity", qe_level), ("TCB info", platform.level)]
            if platform.module_id is not None:  # below every level of the module's: TCBNotSupported
                levels.append((f"TDX module {platform.module_id}", platform.module))
            statuses = [_level_status(level) for _, level in levels]
            advisories = [a for _, level in levels for a in _advisories(level)]
            notes += [f"{what}: {status}" for (what, _), status in zip(levels, statuses)]
            numbers = int(tcb_body["tcbEvaluationDataNumber"]), int(qe_body["tcbEvaluationDataNumber"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CollateralInvalid(f"collateral JSON is malformed: {type(exc).__name__}") from None
        return CollateralResult(
            status=_worst(*statuses),
            advisory_ids=tuple(dict.fromkeys(advisories)),
            notes=tuple(notes),
            tcb_info_evaluation_data_number=numbers[0],
            qe_identity_evaluation_data_number=numbers[1],
        )

    def _tcb_signer(self, root: x509.Certificate, at: datetime) -> x509.Certificate:
        """The TCB Signing certificate, chained to the same pinned root as the quote's PCK chain."""
        chain = trust.load_certificates(self.tcb_signing_chain)
        if trust.common_name(chain[0]) != TCB_SIGNING_COMMON_NAME:
            raise CollateralInvalid(f"collateral is signed by {trust.common_name(chain[0])!r}, not {TCB_SIGNING_COMMON_NAME!r}")
        trust.check_root(trust.verify_chain(chain, at), [root], simulated_ok=False)
        return chain[0]

    @staticmethod
    def _body(raw: bytes, name: str, signer: x509.Certificate) -> dict[str, Any]:
        match = _SIGNED_JSON.fullmatch(raw)
        if match is None or match.group(1).decode() != name:
            raise CollateralInvalid(f"collateral is not a signed {name} response")
        signature = bytes.fromhex(match.group(3).decode())
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        try:
            signer.public_key().verify(encode_dss_signature(r, s), match.group(2), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CollateralInvalid(f"{name} signature does not verify under the TCB Signing certificate") from None
        return json.loads(match.group(2))

    def _qe_level(self, body: dict[str, Any], quote: TdxQuoteParts, at: datetime) -> dict[str, Any] | None:
        qe = quote.signature_data.certification.qe_report
        _check_current(body, "QE identity", at)
        if bytes.fromhex(body["mrsigner"]) != qe.mr_signer:
            raise CollateralInvalid("QE MRSIGNER does not match the QE identity")
        if int(body["isvprodid"]) != qe.isv_prod_id:
            raise CollateralInvalid("QE ISVPRODID does not match the QE identity")
        if not _masked_equal(qe.misc_select.to_bytes(4, "big"), body["miscselect"], body["miscselectMask"]):
            raise CollateralInvalid("QE MISCSELECT does not match the QE identity")
        if not _masked_equal(qe.attributes, body["attributes"], body["attributesMask"]):
            raise CollateralInvalid("QE ATTRIBUTES do not match the QE identity")
        for level in body["tcbLevels"]:
            if qe.isv_svn >= int(level["tcb"]["isvsvn"]):
                return level
        return None

    def _tcb_level(self, body: dict[str, Any], quote: TdxQuoteParts, pck: PckExtensions, at: datetime) -> "_PlatformLevel":
        if body.get("id") != "TDX" or int(body.get("version", 0)) < 3:
            raise CollateralInvalid("TCB info is not a TDX TCB info of version 3 or later")
        _check_current(body, "TCB info", at)
        if bytes.fromhex(body["fmspc"]) != pck.fmspc:
            raise CollateralInvalid(f"TCB info is for FMSPC {body['fmspc']}, the PCK certificate has {pck.fmspc.hex()}")
        if bytes.fromhex(body["pceId"]) != pck.pce_id:
            raise CollateralInvalid("TCB info PCE ID does not match the PCK certificate")
        report = quote.body
        module_id, module_level, first_component = _module_level(body, report)
        # Levels are listed newest first; the first one the platform meets gives the status.
        for level in body["tcbLevels"]:
            tcb = level["tcb"]
            sgx = [int(c["svn"]) for c in tcb["sgxtcbcomponents"]]
            tdx = [int(c["svn"]) for c in tcb["tdxtcbcomponents"]]
            if (
                all(have >= need for have, need in zip(pck.sgx_components, sgx))
                and pck.pce_svn >= int(tcb["pcesvn"])
                and all(have >= need for have, need in list(zip(report.tee_tcb_svn, tdx))[first_component:])
            ):
                return _PlatformLevel(level, module_id, module_level)
        return _PlatformLevel(None, module_id, module_level)


@dataclass(frozen=True)
class _PlatformLevel:
    level: dict[str, Any] | None  # None: below every level
    module_id: str | None = None  # e.g. "TDX_01" when the module's own identity decided
    module: dict[str, Any] | None = None  # the module's TCB level (None with module_id: below every level)


def _module_level(body: dict[str, Any], report: Any) -> tuple[str | None, dict[str, Any] | None, int]:
    """The TDX module's identity check and TCB level, as Intel's QVL reads TCB info v3.

    TEE_TCB_SVN[1] is the module's major version: 0 (TDX 1.0) is checked against `tdxModule` and
    every TEE_TCB_SVN byte against the platform's `tdxtcbcomponents`. From 1 (TDX 1.5) on, the
    `tdxModuleIdentities` entry `TDX_<version, 2 hex digits>` names the module's signer and
    attributes, its `tcbLevels` give the module's status by ISVSVN = TEE_TCB_SVN[0], and the
    platform's components are compared from byte 2 on.
    Returns (identity id or None, the module's TCB level, the first TEE_TCB_SVN byte to compare).
    """
    svn, version = report.tee_tcb_svn[0], report.tee_tcb_svn[1]
    if version == 0:
        module = body.get("tdxModule")
        if module is None:
            raise CollateralInvalid("TCB info has no tdxModule to check the TDX module against")
        _check_module(module, report, "tdxModule")
        return None, None, 0
    wanted = f"TDX_{version:02X}"
    identity = next((i for i in body.get("tdxModuleIdentities") or [] if str(i.get("id", "")).upper() == wanted), None)
    if identity is None:
        raise CollateralInvalid(
            f"TCB info lists no TDX module identity {wanted} for the quote's module (TEE_TCB_SVN[1] = {version})"
        )
    _check_module(identity, report, wanted)
    level = next((lv for lv in identity["tcbLevels"] if svn >= int(lv["tcb"]["isvsvn"])), None)
    return wanted, level, 2


def _check_module(module: dict[str, Any], report: Any, name: str) -> None:
    if bytes.fromhex(module["mrsigner"]) != report.mr_signer_seam:
        raise CollateralInvalid(f"TDX module MRSIGNERSEAM does not match the TCB info's {name}")
    if not _masked_equal(report.seam_attributes, module["attributes"], module["attributesMask"]):
        raise CollateralInvalid(f"TDX module SEAMATTRIBUTES do not match the TCB info's {name}")


def _level_status(level: dict[str, Any] | None) -> str:
    # Below every level the collateral lists: Intel's libraries report this as TCB_NOT_SUPPORTED.
    return "TCBNotSupported" if level is None else str(level["tcbStatus"])


def _advisories(level: dict[str, Any] | None) -> list[str]:
    return [str(a) for a in (level or {}).get("advisoryIDs", [])]
