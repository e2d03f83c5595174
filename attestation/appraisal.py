"""Appraisal: the one place that decides whether verified claims describe a node to trust.

Verifiers establish that evidence is authentic and turn it into claims (attestation.claims);
`appraise(claims, policy)` applies the policy of docs/policy.md, default-deny. Every refusal
is a sentence that names the claim and says what the caller can do about it. Policies come
from TOML files (`load_policy`, format in docs/policy.md) or from code.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from .claims import (
    GPU_CC_MODE_ON,
    MEASUREMENTS_MISMATCH,
    MEASUREMENTS_NOT_CHECKED,
    OCSP_GOOD,
    TCB_UNKNOWN,
    Claims,
    GpuClaims,
    SnpClaims,
    TdxClaims,
)
from .collateral import LocalCollateral

UP_TO_DATE = "UpToDate"
REVOKED = "Revoked"

# Intel's TD quoting enclave and QE vendor, built in so that a quote made by any other enclave
# is refused even without collateral. Values from Intel's PCS QE identity for TD_QE (the same
# as tests/data/tdx/sample_qeIdentity_response) and the Intel QE vendor ID of the DCAP library.
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
INTEL_TD_QE_MR_SIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
INTEL_TD_QE_ISV_PROD_ID = 2
INTEL_TD_QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
INTEL_TD_QE_ATTRIBUTES_MASK = bytes.fromhex("fbffffffffffffff0000000000000000")
INTEL_TD_QE_MISC_SELECT = 0
INTEL_TD_QE_MISC_SELECT_MASK = 0xFFFFFFFF

MEASUREMENT_HEX = 96  # 48-byte registers
DIGEST_HEX = 64  # 32-byte values: HOST_DATA, config digest
ATTRIBUTES_HEX = 16  # 8-byte fields: TD_ATTRIBUTES, XFAM

TDX_REGISTER_PINS = ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id", "mr_owner", "mr_seam")
TDX_ATTRIBUTE_PINS = ("td_attributes", "xfam")
TDX_PINS = (*TDX_REGISTER_PINS, *TDX_ATTRIBUTE_PINS)
# MRTD measures only the TD's firmware; kernel, initrd, command line and application are in the RTMRs.
TDX_REQUIRED_PINS = ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
SNP_PINS = ("measurement", "host_data")
SNP_TCB_PARTS = ("bootloader", "tee", "snp", "microcode", "fmc")
TEE_TYPES = frozenset({"tdx", "sev-snp"})
DEFAULT_VMPL = frozenset({0})

# What a release's `reference_values` may set: the policy file's keys that narrow what is
# accepted (pins and minimums). Keys that widen it (allow_*, allowed_tcb_status) stay the client's.
REFERENCE_TDX_KEYS = frozenset({*TDX_PINS, "min_tcb_evaluation_data_number"})
REFERENCE_SNP_KEYS = frozenset({*SNP_PINS, "min_reported_tcb", "vmpl"})
REFERENCE_GPU_KEYS = frozenset({"min_driver_version", "allowed_vbios_versions"})
REFERENCE_TOP_KEYS = frozenset({"tdx", "sev_snp", "gpu", "config_digest"})


class PolicyError(ValueError):
    """A policy file or value is malformed (unknown key, wrong type, bad hex)."""


def _pins(value: Any, name: str, size_hex: int) -> frozenset[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in values):
        raise PolicyError(f"{name} must be a hex string or a list of hex strings")
    out = set()
    for v in values:
        v = v.strip().lower()
        if len(v) != size_hex or any(c not in "0123456789abcdef" for c in v):
            raise PolicyError(f"{name} value {v[:16]!r}... must be {size_hex} hex characters")
        out.add(v)
    return frozenset(out)


def _statuses(value: Any, name: str) -> frozenset[str]:
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{name} must be a list of TCB status strings")
    return frozenset(value)


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PolicyError(f"{name} must be an integer {low}-{high}")
    return value


@dataclass(frozen=True)
class TdxPolicy:
    """Pins are allow lists of lowercase hex (empty: not pinned)."""

    mr_td: frozenset[str] = frozenset()
    rtmr0: frozenset[str] = frozenset()
    rtmr1: frozenset[str] = frozenset()
    rtmr2: frozenset[str] = frozenset()
    rtmr3: frozenset[str] = frozenset()
    mr_config_id: frozenset[str] = frozenset()
    mr_owner: frozenset[str] = frozenset()
    mr_seam: frozenset[str] = frozenset()
    td_attributes: frozenset[str] = frozenset()
    xfam: frozenset[str] = frozenset()
    allowed_tcb_status: frozenset[str] = frozenset({UP_TO_DATE})
    allow_debug: bool = False
    allow_sept_ve: bool = False  # accept a real TD without TD_ATTRIBUTES.SEPT_VE_DISABLE
    min_tcb_evaluation_data_number: int | None = None  # of the TCB info and QE identity

    @classmethod
    def from_table(cls, table: Mapping[str, Any], known: Iterable[str] | None = None, where: str = "[tdx]") -> "TdxPolicy":
        keys = {*TDX_PINS, "allowed_tcb_status", "allow_debug", "allow_sept_ve", "min_tcb_evaluation_data_number"}
        _no_unknown(table, set(known) if known is not None else keys, where)
        kwargs: dict[str, Any] = {k: _pins(table[k], f"tdx.{k}", MEASUREMENT_HEX) for k in TDX_REGISTER_PINS if k in table}
        kwargs.update({k: _pins(table[k], f"tdx.{k}", ATTRIBUTES_HEX) for k in TDX_ATTRIBUTE_PINS if k in table})
        if "allowed_tcb_status" in table:
            kwargs["allowed_tcb_status"] = _statuses(table["allowed_tcb_status"], "tdx.allowed_tcb_status")
        for key in ("allow_debug", "allow_sept_ve"):
            if key in table:
                kwargs[key] = _bool(table[key], f"tdx.{key}")
        if "min_tcb_evaluation_data_number" in table:
            kwargs["min_tcb_evaluation_data_number"] = _int(
                table["min_tcb_evaluation_data_number"], "tdx.min_tcb_evaluation_data_number", 0, 2**32 - 1
            )
        return cls(**kwargs)


@dataclass(frozen=True)
class SnpPolicy:
    measurement: frozenset[str] = frozenset()
    host_data: frozenset[str] = frozenset()
    min_reported_tcb: Mapping[str, int] = field(default_factory=dict)  # bootloader, tee, snp, microcode, fmc
    vmpl: frozenset[int] | None = None  # allowed VMPLs; None: the default, VMPL 0 only
    allowed_tcb_status: frozenset[str] = frozenset({UP_TO_DATE})
    allow_debug: bool = False

    @classmethod
    def from_table(cls, table: Mapping[str, Any], known: Iterable[str] | None = None, where: str = "[sev_snp]") -> "SnpPolicy":
        keys = {*SNP_PINS, "min_reported_tcb", "vmpl", "allowed_tcb_status", "allow_debug"}
        _no_unknown(table, set(known) if known is not None else keys, where)
        kwargs: dict[str, Any] = {}
        kwargs["measurement"] = _pins(table.get("measurement", []), "sev_snp.measurement", MEASUREMENT_HEX)
        kwargs["host_data"] = _pins(table.get("host_data", []), "sev_snp.host_data", DIGEST_HEX)
        if "min_reported_tcb" in table:
            tcb = table["min_reported_tcb"]
            if not isinstance(tcb, Mapping):
                raise PolicyError("sev_snp.min_reported_tcb must be a table of security patch levels")
            _no_unknown(tcb, set(SNP_TCB_PARTS), "[sev_snp.min_reported_tcb]")
            kwargs["min_reported_tcb"] = {k: _int(v, f"sev_snp.min_reported_tcb.{k}", 0, 255) for k, v in tcb.items()}
        if "vmpl" in table:
            vmpl = table["vmpl"]
            levels = vmpl if isinstance(vmpl, (list, tuple)) else [vmpl]
            kwargs["vmpl"] = frozenset(_int(v, "sev_snp.vmpl", 0, 3) for v in levels)
            if not kwargs["vmpl"]:
                raise PolicyError("sev_snp.vmpl must name at least one VMPL 0-3")
        if "allowed_tcb_status" in table:
            kwargs["allowed_tcb_status"] = _statuses(table["allowed_tcb_status"], "sev_snp.allowed_tcb_status")
        if "allow_debug" in table:
            kwargs["allow_debug"] = _bool(table["allow_debug"], "sev_snp.allow_debug")
        return cls(**kwargs)


def _driver_version(value: Any, name: str) -> tuple[int, ...]:
    """NVIDIA driver versions compare part by part as numbers: 550.90.07 > 550.54.15 > 545.00."""
    try:
        if not isinstance(value, str):
            raise ValueError
        return tuple(int(part) for part in value.split("."))
    except ValueError:
        raise PolicyError(f"{name} must be a driver version such as \"550.90.07\"") from None


@dataclass(frozen=True)
class GpuPolicy:
    """The `[gpu]` table: what is accepted of each NVIDIA GPU whose evidence verified."""

    min_driver_version: str | None = None
    allowed_vbios_versions: frozenset[str] = frozenset()  # uppercase, as NVIDIA writes them; empty: any
    allow_ocsp_unknown: bool = False

    @classmethod
    def from_table(cls, table: Mapping[str, Any], known: Iterable[str] | None = None, where: str = "[gpu]") -> "GpuPolicy":
        keys = {"min_driver_version", "allowed_vbios_versions", "allow_ocsp_unknown"}
        _no_unknown(table, set(known) if known is not None else keys, where)
        kwargs: dict[str, Any] = {}
        if "min_driver_version" in table:
            _driver_version(table["min_driver_version"], "gpu.min_driver_version")
            kwargs["min_driver_version"] = table["min_driver_version"]
        if "allowed_vbios_versions" in table:
            versions = _statuses(table["allowed_vbios_versions"], "gpu.allowed_vbios_versions")
            kwargs["allowed_vbios_versions"] = frozenset(v.upper() for v in versions)
        if "allow_ocsp_unknown" in table:
            kwargs["allow_ocsp_unknown"] = _bool(table["allow_ocsp_unknown"], "gpu.allow_ocsp_unknown")
        return cls(**kwargs)


@dataclass(frozen=True)
class ReferenceValues:
    """Pins from somewhere other than the policy file, e.g. a verified release (`source` "release 1.4.0").

    Only the narrowing keys are set (REFERENCE_*_KEYS); `appraise` checks them beside the policy's
    own pins, both must hold, and a refusal names `source`.
    """

    source: str
    tdx: TdxPolicy = field(default_factory=TdxPolicy)
    sev_snp: SnpPolicy = field(default_factory=SnpPolicy)
    config_digest: frozenset[str] = frozenset()
    gpu: GpuPolicy = field(default_factory=GpuPolicy)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> "ReferenceValues":
        """`reference_values` as a release carries them: exactly the policy file's keys, as JSON."""
        if not isinstance(values, Mapping):
            raise PolicyError(f"{source}: reference_values must be an object")
        _no_unknown(values, set(REFERENCE_TOP_KEYS), f"{source} reference_values")
        kwargs: dict[str, Any] = {}
        for key, kind, known in (("tdx", TdxPolicy, REFERENCE_TDX_KEYS), ("sev_snp", SnpPolicy, REFERENCE_SNP_KEYS),
                                 ("gpu", GpuPolicy, REFERENCE_GPU_KEYS)):
            if key in values:
                if not isinstance(values[key], Mapping):
                    raise PolicyError(f"{source} reference_values.{key} must be an object")
                kwargs[key] = kind.from_table(values[key], known, f"{source} reference_values.{key}")
        if "config_digest" in values:
            kwargs["config_digest"] = _pins(values["config_digest"], "config_digest", DIGEST_HEX)
        return cls(source=source, **kwargs)


@dataclass(frozen=True)
class ReleasePolicy:
    """The `[release]` table: the node must serve a release signed by this CI identity (docs/releases.md)."""

    issuer: str
    identity: str | None = None  # exact
    identity_pattern: str | None = None  # a regular expression matched in full
    trusted_root: Path | None = None  # a Sigstore trusted root JSON; None: Sigstore's public-good root

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> "ReleasePolicy":
        _no_unknown(table, {"identity", "identity_pattern", "issuer", "trusted_root"}, "[release]")
        for key in ("identity", "identity_pattern", "issuer", "trusted_root"):
            if key in table and (not isinstance(table[key], str) or not table[key]):
                raise PolicyError(f"release.{key} must be a non-empty string")
        if ("identity" in table) == ("identity_pattern" in table):
            raise PolicyError("[release] needs exactly one of identity (exact) and identity_pattern (a regular expression)")
        if "issuer" not in table:
            raise PolicyError("[release] needs issuer: the OIDC issuer of the release's signer, e.g. https://token.actions.githubusercontent.com")
        if "identity_pattern" in table:
            try:
                re.compile(table["identity_pattern"])
            except re.error as exc:
                raise PolicyError(f"release.identity_pattern is not a regular expression: {exc}") from None
        root = table.get("trusted_root")
        return cls(
            issuer=table["issuer"],
            identity=table.get("identity"),
            identity_pattern=table.get("identity_pattern"),
            trusted_root=Path(root) if root is not None else None,
        )

    @property
    def signer(self) -> str:
        return self.identity if self.identity is not None else f"identity matching {self.identity_pattern!r}"


@dataclass(frozen=True)
class Policy:
    """What a client accepts. The default accepts no real node (nothing is pinned) and no simulated one."""

    tdx: TdxPolicy = field(default_factory=TdxPolicy)
    sev_snp: SnpPolicy = field(default_factory=SnpPolicy)
    config_digest: frozenset[str] = frozenset()
    allowed_tees: frozenset[str] = TEE_TYPES
    allow_simulated: bool = False
    accept_any_measurement: bool = False
    require_gpu: bool = False
    # A document without an ML-KEM key would get X25519 alone; False (--allow-classical) accepts that.
    require_post_quantum: bool = True
    gpu: GpuPolicy = field(default_factory=GpuPolicy)
    references: tuple[ReferenceValues, ...] = ()  # e.g. a verified release's reference_values
    # The client's own vendor collateral (`--collateral DIR`), used in place of the document's.
    collateral: LocalCollateral | None = None
    release: ReleasePolicy | None = None  # `[release]`: the node must serve a release of this signer

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "Policy":
        top = {"tdx", "sev_snp", "gpu", "config_digest", "allowed_tees", "allow_simulated", "accept_any_measurement",
               "require_gpu", "require_post_quantum", "release"}
        _no_unknown(data, top, "the policy")
        kwargs: dict[str, Any] = {}
        for key, kind in (("tdx", TdxPolicy), ("sev_snp", SnpPolicy), ("gpu", GpuPolicy), ("release", ReleasePolicy)):
            if key in data:
                if not isinstance(data[key], Mapping):
                    raise PolicyError(f"[{key}] must be a table")
                kwargs[key] = kind.from_table(data[key])
        if "config_digest" in data:
            kwargs["config_digest"] = _pins(data["config_digest"], "config_digest", DIGEST_HEX)
        if "allowed_tees" in data:
            tees = _statuses(data["allowed_tees"], "allowed_tees")
            if not tees <= TEE_TYPES:
                raise PolicyError(f"allowed_tees may list only {sorted(TEE_TYPES)}")
            kwargs["allowed_tees"] = tees
        for key in ("allow_simulated", "accept_any_measurement", "require_gpu", "require_post_quantum"):
            if key in data:
                kwargs[key] = _bool(data[key], key)
        return cls(**kwargs)

    def with_measurements(self, measurements: Iterable[str]) -> "Policy":
        """Pin MRTD (TDX, simulated) and MEASUREMENT (SEV-SNP) to these 48-byte hex values.

        On TDX this alone does not make the node pinned: RTMR0-3 must be pinned too (`with_pins`)."""
        pins = _pins(list(measurements), "measurement", MEASUREMENT_HEX)
        return replace(self, tdx=replace(self.tdx, mr_td=pins), sev_snp=replace(self.sev_snp, measurement=pins))

    def with_pins(self, pins: Mapping[str, Iterable[str]]) -> "Policy":
        """Pin registers by name (`--pin NAME=HEX`): the [tdx] pins (mr_td, rtmr0-3, mr_config_id,
        mr_owner, mr_seam, td_attributes, xfam) and the [sev_snp] ones (measurement, host_data).
        Each replaces that register's pins in the policy."""
        tdx, snp = {}, {}
        for name, values in pins.items():
            values = [values] if isinstance(values, str) else list(values)
            if name in TDX_REGISTER_PINS:
                tdx[name] = _pins(values, name, MEASUREMENT_HEX)
            elif name in TDX_ATTRIBUTE_PINS:
                tdx[name] = _pins(values, name, ATTRIBUTES_HEX)
            elif name in SNP_PINS:
                snp[name] = _pins(values, name, MEASUREMENT_HEX if name == "measurement" else DIGEST_HEX)
            else:
                raise PolicyError(f"no register named {name!r} to pin: use one of {', '.join((*TDX_PINS, *SNP_PINS))}")
        return replace(self, tdx=replace(self.tdx, **tdx), sev_snp=replace(self.sev_snp, **snp))

    def with_collateral(self, path: str | Path) -> "Policy":
        """Verify with the collateral files of this directory instead of those the node ships."""
        return replace(self, collateral=LocalCollateral.from_directory(path))

    def with_reference_values(self, values: Mapping[str, Any], source: str) -> "Policy":
        """This policy plus pins from `reference_values` (a release's, named `source` in refusals)."""
        return replace(self, references=(*self.references, ReferenceValues.from_mapping(values, source)))


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{name} must be true or false")
    return value


def _no_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    # A misspelt pin must not be ignored: that would silently accept what it meant to refuse.
    unknown = sorted(set(table) - known)
    if unknown:
        raise PolicyError(f"unknown key(s) in {where}: {', '.join(unknown)}")


def load_policy(path: str | Path) -> Policy:
    """A policy from a TOML file (docs/policy.md); a relative `[release] trusted_root` is read
    beside the policy file."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {path} is not valid TOML: {exc}") from None
    policy = Policy.from_mapping(data)
    if policy.release is not None and policy.release.trusted_root is not None:
        root = Path(path).parent / policy.release.trusted_root
        if not root.is_file():
            raise PolicyError(f"release.trusted_root {root} is not a file: give the Sigstore trusted root JSON (relative to the policy file)")
        policy = replace(policy, release=replace(policy.release, trusted_root=root))
    return policy


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    tcb_status: str | None = None  # the status appraised (SEV-SNP: decided here from min_reported_tcb)


def _masked_equal(value: bytes, expected: bytes, mask: bytes) -> bool:
    return len(value) == len(expected) == len(mask) and all((v & m) == (e & m) for v, e, m in zip(value, expected, mask))


@dataclass(frozen=True)
class _PinSource:
    """Where pins come from: the policy itself or one set of reference values (a release)."""

    tdx: TdxPolicy
    sev_snp: SnpPolicy
    config_digest: frozenset[str]
    gpu: GpuPolicy
    name: str  # "policy" or e.g. "release 1.4.0"
    is_policy: bool

    def differs(self, claim: str, have: str, key: str) -> str:
        if self.is_policy:
            return f"{claim} differs from policy: the node reports {have}; if you trust what it measures, add it to {key}"
        return (
            f"{claim} differs from {self.name}: the node reports {have}, which the release does not list; "
            "the node does not run this release: refuse it, or pin the release the node runs"
        )

    def below(self, claim: str, have: Any, minimum: Any, fix: str) -> str:
        where = "the policy minimum" if self.is_policy else f"the minimum of {self.name}"
        return f"{claim} {have} is below {where} {minimum}: {fix}"


def _sources(policy: Policy) -> list[_PinSource]:
    own = _PinSource(policy.tdx, policy.sev_snp, policy.config_digest, policy.gpu, "policy", True)
    return [own, *(_PinSource(r.tdx, r.sev_snp, r.config_digest, r.gpu, r.source, False) for r in policy.references)]


def _check_tcb_status(errors: list[str], status: str, allowed: frozenset[str], table: str, advisories: tuple[str, ...] = (),
                      unknown_because: str = "no current vendor collateral came with the evidence",
                      unknown_fix: str = "give collateral (--collateral DIR)") -> None:
    if status == REVOKED:
        errors.append("tcb_status is Revoked: the vendor revoked this platform's TCB and no policy can accept it; refuse this node")
    elif status not in allowed:
        if status == TCB_UNKNOWN:
            errors.append(
                f"tcb_status is Unknown: {unknown_because}; {unknown_fix} or, knowingly, list 'Unknown' in {table} allowed_tcb_status"
            )
        else:
            seen = f" (advisories: {', '.join(advisories)})" if advisories else ""
            errors.append(
                f"tcb_status {status} is not allowed by policy{seen}: have the platform updated, or, after reading "
                f"its advisories, list {status!r} in {table} allowed_tcb_status"
            )


def _tdx_registers(claims: TdxClaims) -> dict[str, bytes]:
    return {
        "mr_td": claims.mr_td,
        **{f"rtmr{i}": claims.rtmrs[i] for i in range(4)},
        "mr_config_id": claims.mr_config_id,
        "mr_owner": claims.mr_owner,
        "mr_seam": claims.mr_seam,
        "td_attributes": claims.td_attributes,
        "xfam": claims.xfam,
    }


def _appraise_tdx(claims: TdxClaims, policy: Policy, simulated: bool, errors: list[str]) -> list[str]:
    """Returns the registers of TDX_REQUIRED_PINS that neither the policy nor a reference pins."""
    pol = policy.tdx
    if claims.debug and not pol.allow_debug:
        errors.append(
            "debug is set in td_attributes: the host can read and change this TD; refuse it, "
            "or set [tdx] allow_debug = true for a test system only"
        )
    if not simulated:
        if not claims.sept_ve_disable and not pol.allow_sept_ve:
            errors.append(
                "td_attributes.sept_ve_disable is not set: the TD takes #VE on secure EPT violations, which the host "
                "can induce to steer the guest kernel; run the TD with SEPT_VE_DISABLE, or, knowingly, set "
                "[tdx] allow_sept_ve = true"
            )
        # The quoting enclave's identity is Intel's fact about who signed the quote, not the policy's.
        if claims.qe_vendor_id != INTEL_QE_VENDOR_ID:
            errors.append(f"qe_vendor_id {claims.qe_vendor_id.hex()} is not Intel's quoting enclave vendor: refuse this quote")
        if claims.qe_mr_signer != INTEL_TD_QE_MR_SIGNER or claims.qe_isv_prod_id != INTEL_TD_QE_ISV_PROD_ID:
            errors.append("qe_mr_signer/qe_isv_prod_id are not Intel's TD quoting enclave: refuse this quote")
        if not _masked_equal(claims.qe_attributes, INTEL_TD_QE_ATTRIBUTES, INTEL_TD_QE_ATTRIBUTES_MASK) or (
            claims.qe_misc_select & INTEL_TD_QE_MISC_SELECT_MASK
        ) != INTEL_TD_QE_MISC_SELECT:
            errors.append("qe_attributes/qe_misc_select do not match Intel's TD quoting enclave (e.g. a debug QE): refuse this quote")
        missing = ", ".join(claims.collateral_missing) or "no current vendor collateral came with the evidence"
        _check_tcb_status(errors, claims.tcb_status, pol.allowed_tcb_status, "[tdx]", claims.advisory_ids,
                          unknown_because=missing, unknown_fix="give current Intel collateral signed by Intel's TCB Signing "
                          "certificate (--collateral DIR with tcb_signing_chain.pem)")
    registers = _tdx_registers(claims)
    pinned: set[str] = set()
    for source in _sources(policy):
        for name, value in registers.items():
            allowed = getattr(source.tdx, name)
            if allowed:
                pinned.add(name)
                if value.hex() not in allowed:
                    errors.append(source.differs(name, value.hex(), f"[tdx] {name}"))
        minimum = source.tdx.min_tcb_evaluation_data_number
        if minimum is not None and not simulated:
            for what, have in (("TCB info", claims.tcb_info_evaluation_data_number),
                               ("QE identity", claims.qe_identity_evaluation_data_number)):
                if have is None:
                    errors.append(
                        f"tcb_evaluation_data_number of the {what} is unknown: no signed {what} came with the evidence, "
                        f"and {source.name} requires at least {minimum}; give current signed collateral (--collateral DIR)"
                    )
                elif have < minimum:
                    errors.append(source.below(
                        f"tcb_evaluation_data_number of the {what}", have, minimum,
                        "the collateral predates a TCB recovery; give current collateral from Intel PCS (--collateral DIR)",
                    ))
    return [name for name in TDX_REQUIRED_PINS if name not in pinned]


def _snp_tcb_status(claims: SnpClaims, minimums: list[tuple[_PinSource, Mapping[str, int]]], errors: list[str]) -> str:
    """AMD publishes no TCB status: REPORTED_TCB is judged against the minimums given (policy, release)."""
    if not minimums:
        return TCB_UNKNOWN
    status = UP_TO_DATE
    if claims.reported_tcb.raw == 0:
        errors.append(
            "reported_tcb is all zero: no firmware reports that, so it is not a level to trust; refuse this node"
        )
        status = "OutOfDate"
    for source, minimum in minimums:
        for part, need in sorted(minimum.items()):
            have = getattr(claims.reported_tcb, part)
            if have is None or have < need:
                errors.append(source.below(f"reported_tcb.{part}", have, need, "have the host's firmware updated"))
                status = "OutOfDate"
    if status == UP_TO_DATE and not claims.crl_checked:
        return TCB_UNKNOWN  # the firmware is recent enough, but nothing says the chain is not revoked
    return status


def _appraise_snp(claims: SnpClaims, policy: Policy, errors: list[str]) -> tuple[list[str], str]:
    """Returns the unpinned registers (MEASUREMENT) and the TCB status appraised."""
    pol = policy.sev_snp
    if claims.debug and not pol.allow_debug:
        errors.append(
            "debug is allowed by the guest policy: the host can read and change this guest; refuse it, "
            "or set [sev_snp] allow_debug = true for a test system only"
        )
    sources = _sources(policy)
    minimums = [(s, s.sev_snp.min_reported_tcb) for s in sources if s.sev_snp.min_reported_tcb]
    tcb_errors: list[str] = []
    status = _snp_tcb_status(claims, minimums, tcb_errors)
    if status != "OutOfDate":
        if not minimums:
            because = "AMD publishes no TCB status, and neither the policy nor a release gives a min_reported_tcb"
            fix = "set [sev_snp] min_reported_tcb (tee-node policy from-quote prints the report's)"
        else:
            because = "no current AMD CRL came with the evidence, so the chain's revocation is unknown"
            fix = "give AMD's CRL (--collateral DIR with amd_crl.der)"
        _check_tcb_status(errors, status, pol.allowed_tcb_status, "[sev_snp]", unknown_because=because, unknown_fix=fix)
    errors += tcb_errors
    pinned = False
    for source in sources:
        for name in SNP_PINS:
            allowed = getattr(source.sev_snp, name)
            if allowed:
                pinned = pinned or name == "measurement"
                value = getattr(claims, name).hex()
                if value not in allowed:
                    errors.append(source.differs(name, value, f"[sev_snp] {name}"))
        vmpls = source.sev_snp.vmpl if source.sev_snp.vmpl is not None else (DEFAULT_VMPL if source.is_policy else None)
        if vmpls is not None and claims.vmpl not in vmpls:
            errors.append(
                f"vmpl {claims.vmpl} is not allowed by {source.name} ({', '.join(map(str, sorted(vmpls)))}): the report was "
                "requested at another privilege level than the guest's own (VMPL 0 unless an SVSM runs below it); refuse it, "
                f"or, if the guest runs under an SVSM, list {claims.vmpl} in [sev_snp] vmpl"
            )
    return ([] if pinned else ["measurement"]), status


def _is_document(claims: Claims) -> bool:
    return claims.config_digest is not None  # bare evidence (`tee-node quote verify`) carries no document fields


def _with_release(claims: Claims, policy: Policy, errors: list[str]) -> Policy:
    """`[release]`: the node serves a release signed by the expected identity and issuer; the
    policy plus that release's reference values as pins (both must hold)."""
    wanted = policy.release
    if wanted is None:
        return policy
    release = claims.release
    if release is None:
        errors.append(
            "release is required by the policy ([release]) but the node serves no release bundle: refuse this "
            "node, or have its operator serve the bundle of the release it runs (attestation.release_bundle)"
        )
        return policy
    from .release import identity_policy, signer_mismatch

    signer = identity_policy(issuer=wanted.issuer, identity=wanted.identity, identity_pattern=wanted.identity_pattern)
    mismatch = signer_mismatch(release, signer)
    if mismatch is not None:
        errors.append(
            f"release {release.version} was not signed by {wanted.signer} with issuer {wanted.issuer} ({mismatch}): "
            "refuse this node, or add that signer to [release] if you trust its releases"
        )
        return policy
    # Well-formed: checked when the bundle was verified.
    return policy.with_reference_values(release.reference_values, f"release {release.version}")


def appraise(claims: Claims, policy: Policy) -> Verdict:
    """Every trust decision about verified claims, default-deny (docs/policy.md)."""
    errors: list[str] = []
    warnings: list[str] = []
    policy = _with_release(claims, policy, errors)
    if claims.simulated:
        if not policy.allow_simulated:
            errors.append("tee is simulated, which is not a TEE: pass --allow-simulated (allow_simulated = true) for testing only")
    elif claims.tee not in policy.allowed_tees:
        errors.append(f"tee {claims.tee} is not in the policy's allowed_tees {sorted(policy.allowed_tees)}: add it if you trust it")

    if isinstance(claims.cpu, TdxClaims):
        unpinned = _appraise_tdx(claims.cpu, policy, claims.simulated, errors)
        status = claims.cpu.tcb_status
        how = (
            "pin them all (tee-node policy from-quote prints them; --pin NAME=HEX on attest and chat; "
            "or a [release] whose reference_values pin them)"
        ) if len(unpinned) > 1 else (
            "pin it (tee-node policy from-quote prints it; --pin NAME=HEX on attest and chat; "
            "or a [release] whose reference_values pin it)"
        )
    else:
        unpinned, status = _appraise_snp(claims.cpu, policy, errors)
        how = "pin it (tee-node policy from-quote; --measurement HEX; or a [release] whose reference_values pin it)"
    # The simulated TEE is for tests (allow_simulated): its registers can be pinned, but need not be.
    if unpinned and not claims.simulated:
        names = ", ".join(unpinned)
        verb = "is" if len(unpinned) == 1 else "are"
        if policy.accept_any_measurement:
            warnings.append(f"{names} {verb} not pinned: any code on this TEE is accepted (accept_any_measurement)")
        else:
            errors.append(
                f"{names} {verb} not pinned by the policy, so any code could be running: {how}, "
                "or pass --accept-any-measurement"
            )

    for source in _sources(policy):
        if not source.config_digest:
            continue
        if claims.config_digest is None:
            errors.append(
                f"config_digest is pinned by {source.name} but bare evidence carries none: "
                "verify the node's attestation document (tee-node attest) instead"
            )
        elif claims.config_digest.hex() not in source.config_digest:
            errors.append(source.differs("config_digest", claims.config_digest.hex(), "config_digest"))

    if policy.require_post_quantum and _is_document(claims) and claims.kem_public_key is None:
        errors.append(
            "kem_public_key is missing: the node offers no ML-KEM-768 key, so requests would be protected by X25519 "
            "alone (not post-quantum); refuse it, or, knowingly, pass --allow-classical (require_post_quantum = false)"
        )

    if policy.require_gpu and not claims.gpus:
        errors.append("gpu evidence is required by the policy but the node sent none: refuse, or drop require_gpu")
    # Every GPU that came with the node is judged, required or not: it sees the same plaintext.
    for gpu in claims.gpus:
        errors += appraise_gpu(gpu, policy)
    return Verdict(accepted=not errors, errors=tuple(errors), warnings=tuple(warnings), tcb_status=status)


def appraised_claims(claims: Claims, verdict: Verdict) -> Claims:
    """The claims with the TCB status `appraise` decided (SEV-SNP's comes from min_reported_tcb)."""
    if verdict.tcb_status is None or verdict.tcb_status == claims.cpu.tcb_status:
        return claims
    return replace(claims, cpu=replace(claims.cpu, tcb_status=verdict.tcb_status))


def appraise_gpu(gpu: GpuClaims, policy: Policy, *, bare: bool = False) -> list[str]:
    """Why the policy refuses one GPU (nothing when it accepts it).

    `bare`: a report verified on its own (`tee-node gpu verify`), where no node reports the CC mode
    and ready state; in an attestation document they are required.
    """
    errors: list[str] = []
    name = f"gpu {gpu.device}"
    if gpu.measurements == MEASUREMENTS_NOT_CHECKED:
        errors.append(
            f"{name} measurements were not checked: no driver and VBIOS RIM pair came with the evidence; "
            "give both RIMs (the node ships them in collateral.nvidia)"
        )
    elif gpu.measurements == MEASUREMENTS_MISMATCH:
        errors.append(
            f"{name} measurements differ from NVIDIA's RIMs at indices {list(gpu.measurements_mismatched)}: "
            "the GPU firmware or driver is not what NVIDIA published for these versions; refuse this node"
        )
    if gpu.ocsp != OCSP_GOOD and not policy.gpu.allow_ocsp_unknown:
        missing = f" ({', '.join(gpu.ocsp_missing)})" if gpu.ocsp_missing else ""
        errors.append(
            f"{name} ocsp status is {gpu.ocsp}: no current OCSP response for every certificate{missing}; give fresh "
            "responses (the node refreshes them), or knowingly set [gpu] allow_ocsp_unknown = true"
        )
    for source in _sources(policy):
        if source.gpu.min_driver_version is not None:
            try:
                have = _driver_version(gpu.driver_version, f"{name} driver_version")
            except PolicyError:
                have = ()  # not a version NVIDIA writes: below any minimum
            if have < _driver_version(source.gpu.min_driver_version, "gpu.min_driver_version"):
                errors.append(source.below(
                    f"{name} driver_version", gpu.driver_version, source.gpu.min_driver_version,
                    "have the node's NVIDIA driver updated",
                ))
        allowed = source.gpu.allowed_vbios_versions
        if allowed and gpu.vbios_version.upper() not in allowed:
            where = "[gpu] allowed_vbios_versions: if you trust this VBIOS, add it" if source.is_policy else (
                f"the allowed_vbios_versions of {source.name}: the node does not run this release's GPU firmware"
            )
            errors.append(f"{name} vbios_version {gpu.vbios_version} is not in {where}")
    if not bare:
        if gpu.cc_mode != GPU_CC_MODE_ON:
            errors.append(
                f"{name} cc_mode is {gpu.cc_mode!r}, not {GPU_CC_MODE_ON!r}: the GPU is not in confidential-computing "
                "mode (or the node does not say); refuse this node"
            )
        if gpu.ready is not True:
            errors.append(f"{name} is not reported ready for client work (NVML ready state): refuse, or retry later")
    return errors


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def policy_from_claims(claims: Claims) -> str:
    """A policy file (TOML) pinning every register of known-good evidence, for `tee-node policy from-quote`."""
    lines = [
        "# tee-node attestation policy (docs/policy.md), pinned from known-good evidence.",
        "# Review every value: a pin accepts exactly what the measured image does.",
    ]
    cpu = claims.cpu
    if claims.simulated:
        lines.append("allow_simulated = true  # this evidence is from the simulated TEE, which is not a TEE")
    if claims.config_digest is not None:
        lines.append(f"config_digest = {_toml_value([claims.config_digest.hex()])}")
    if isinstance(cpu, TdxClaims):
        lines += ["", "[tdx]"]
        for name, value in _tdx_registers(cpu).items():
            lines.append(f"{name} = {_toml_value([value.hex()])}")
        lines.append(f"allowed_tcb_status = {_toml_value([UP_TO_DATE])}")
        lines.append(f"# tcb_status of this evidence: {cpu.tcb_status}")
        for what, number in (("TCB info", cpu.tcb_info_evaluation_data_number),
                             ("QE identity", cpu.qe_identity_evaluation_data_number)):
            if number is not None:
                lines.append(f"# tcbEvaluationDataNumber of its {what}: {number} (min_tcb_evaluation_data_number refuses older)")
        if not claims.simulated and not cpu.sept_ve_disable:
            lines.append("# this TD does not set SEPT_VE_DISABLE, which the default refuses; to accept it knowingly:")
            lines.append("# allow_sept_ve = true")
    else:
        lines += ["", "[sev_snp]"]
        lines.append(f"measurement = {_toml_value([cpu.measurement.hex()])}")
        lines.append(f"host_data = {_toml_value([cpu.host_data.hex()])}")
        lines.append(f"vmpl = {_toml_value([cpu.vmpl])}")
        tcb = {p: getattr(cpu.reported_tcb, p) for p in SNP_TCB_PARTS if getattr(cpu.reported_tcb, p) is not None}
        lines.append(f"min_reported_tcb = {_toml_value(tcb)}")
        lines.append(f"allowed_tcb_status = {_toml_value([UP_TO_DATE])}")
    return "\n".join(lines) + "\n"
