"""Appraisal: the one place that decides whether verified claims describe a node to trust.

Verifiers establish that evidence is authentic and turn it into claims (attestation.claims);
`appraise(claims, policy)` applies the policy of PROTOCOL.md part C, default-deny. Every refusal
is a sentence that names the claim and says what the caller can do about it. Policies come
from TOML files (`load_policy`, format in docs/policy.md) or from code.
"""

from __future__ import annotations

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

TDX_PINS = ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id", "mr_owner", "mr_seam")
SNP_PINS = ("measurement", "host_data")
SNP_TCB_PARTS = ("bootloader", "tee", "snp", "microcode", "fmc")
TEE_TYPES = frozenset({"tdx", "sev-snp"})


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
    allowed_tcb_status: frozenset[str] = frozenset({UP_TO_DATE})
    allow_debug: bool = False

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> "TdxPolicy":
        _no_unknown(table, {*TDX_PINS, "allowed_tcb_status", "allow_debug"}, "[tdx]")
        kwargs: dict[str, Any] = {k: _pins(table[k], f"tdx.{k}", MEASUREMENT_HEX) for k in TDX_PINS if k in table}
        if "allowed_tcb_status" in table:
            kwargs["allowed_tcb_status"] = _statuses(table["allowed_tcb_status"], "tdx.allowed_tcb_status")
        if "allow_debug" in table:
            kwargs["allow_debug"] = _bool(table["allow_debug"], "tdx.allow_debug")
        return cls(**kwargs)


@dataclass(frozen=True)
class SnpPolicy:
    measurement: frozenset[str] = frozenset()
    host_data: frozenset[str] = frozenset()
    min_reported_tcb: Mapping[str, int] = field(default_factory=dict)  # bootloader, tee, snp, microcode, fmc
    vmpl: int | None = None
    allowed_tcb_status: frozenset[str] = frozenset({UP_TO_DATE})
    allow_debug: bool = False

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> "SnpPolicy":
        _no_unknown(table, {*SNP_PINS, "min_reported_tcb", "vmpl", "allowed_tcb_status", "allow_debug"}, "[sev_snp]")
        kwargs: dict[str, Any] = {}
        kwargs["measurement"] = _pins(table.get("measurement", []), "sev_snp.measurement", MEASUREMENT_HEX)
        kwargs["host_data"] = _pins(table.get("host_data", []), "sev_snp.host_data", DIGEST_HEX)
        if "min_reported_tcb" in table:
            tcb = table["min_reported_tcb"]
            if not isinstance(tcb, Mapping):
                raise PolicyError("sev_snp.min_reported_tcb must be a table of security patch levels")
            _no_unknown(tcb, set(SNP_TCB_PARTS), "[sev_snp.min_reported_tcb]")
            for k, v in tcb.items():
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 255:
                    raise PolicyError(f"sev_snp.min_reported_tcb.{k} must be an integer 0-255")
            kwargs["min_reported_tcb"] = dict(tcb)
        if "vmpl" in table:
            vmpl = table["vmpl"]
            if not isinstance(vmpl, int) or isinstance(vmpl, bool) or not 0 <= vmpl <= 3:
                raise PolicyError("sev_snp.vmpl must be an integer 0-3")
            kwargs["vmpl"] = vmpl
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
    def from_table(cls, table: Mapping[str, Any]) -> "GpuPolicy":
        _no_unknown(table, {"min_driver_version", "allowed_vbios_versions", "allow_ocsp_unknown"}, "[gpu]")
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
class Policy:
    """What a client accepts. The default accepts no real node (nothing is pinned) and no simulated one."""

    tdx: TdxPolicy = field(default_factory=TdxPolicy)
    sev_snp: SnpPolicy = field(default_factory=SnpPolicy)
    config_digest: frozenset[str] = frozenset()
    allowed_tees: frozenset[str] = TEE_TYPES
    allow_simulated: bool = False
    accept_any_measurement: bool = False
    require_gpu: bool = False
    gpu: GpuPolicy = field(default_factory=GpuPolicy)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "Policy":
        top = {"tdx", "sev_snp", "gpu", "config_digest", "allowed_tees", "allow_simulated", "accept_any_measurement", "require_gpu"}
        _no_unknown(data, top, "the policy")
        kwargs: dict[str, Any] = {}
        for key, kind in (("tdx", TdxPolicy), ("sev_snp", SnpPolicy), ("gpu", GpuPolicy)):
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
        for key in ("allow_simulated", "accept_any_measurement", "require_gpu"):
            if key in data:
                kwargs[key] = _bool(data[key], key)
        return cls(**kwargs)

    def with_measurements(self, measurements: Iterable[str]) -> "Policy":
        """Pin MRTD (TDX, simulated) and MEASUREMENT (SEV-SNP) to these 48-byte hex values."""
        pins = _pins(list(measurements), "measurement", MEASUREMENT_HEX)
        return replace(self, tdx=replace(self.tdx, mr_td=pins), sev_snp=replace(self.sev_snp, measurement=pins))


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
    """A policy from a TOML file (docs/policy.md)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {path} is not valid TOML: {exc}") from None
    return Policy.from_mapping(data)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def _masked_equal(value: bytes, expected: bytes, mask: bytes) -> bool:
    return len(value) == len(expected) == len(mask) and all((v & m) == (e & m) for v, e, m in zip(value, expected, mask))


def _check_pin(errors: list[str], name: str, value: bytes, allowed: frozenset[str], table: str) -> None:
    if allowed and value.hex() not in allowed:
        errors.append(
            f"{name} differs from policy: the node reports {value.hex()}; "
            f"if you trust what it measures, add it to {table} {name}"
        )


def _check_tcb_status(errors: list[str], status: str, allowed: frozenset[str], table: str, advisories: tuple[str, ...] = ()) -> None:
    if status == REVOKED:
        errors.append("tcb_status is Revoked: the vendor revoked this platform's TCB and no policy can accept it; refuse this node")
    elif status not in allowed:
        if status == TCB_UNKNOWN:
            errors.append(
                "tcb_status is Unknown: no current vendor collateral came with the evidence; give collateral "
                f"(--collateral DIR) or, knowingly, list 'Unknown' in {table} allowed_tcb_status"
            )
        else:
            seen = f" (advisories: {', '.join(advisories)})" if advisories else ""
            errors.append(
                f"tcb_status {status} is not allowed by policy{seen}: have the platform updated, or, after reading "
                f"its advisories, list {status!r} in {table} allowed_tcb_status"
            )


def _appraise_tdx(claims: TdxClaims, policy: Policy, simulated: bool, errors: list[str]) -> bool:
    """Returns whether the policy pins the TD's measurement."""
    pol = policy.tdx
    if claims.debug and not pol.allow_debug:
        errors.append(
            "debug is set in td_attributes: the host can read and change this TD; refuse it, "
            "or set [tdx] allow_debug = true for a test system only"
        )
    if not simulated:
        # The quoting enclave's identity is Intel's fact about who signed the quote, not the policy's.
        if claims.qe_vendor_id != INTEL_QE_VENDOR_ID:
            errors.append(f"qe_vendor_id {claims.qe_vendor_id.hex()} is not Intel's quoting enclave vendor: refuse this quote")
        if claims.qe_mr_signer != INTEL_TD_QE_MR_SIGNER or claims.qe_isv_prod_id != INTEL_TD_QE_ISV_PROD_ID:
            errors.append("qe_mr_signer/qe_isv_prod_id are not Intel's TD quoting enclave: refuse this quote")
        if not _masked_equal(claims.qe_attributes, INTEL_TD_QE_ATTRIBUTES, INTEL_TD_QE_ATTRIBUTES_MASK) or (
            claims.qe_misc_select & INTEL_TD_QE_MISC_SELECT_MASK
        ) != INTEL_TD_QE_MISC_SELECT:
            errors.append("qe_attributes/qe_misc_select do not match Intel's TD quoting enclave (e.g. a debug QE): refuse this quote")
        _check_tcb_status(errors, claims.tcb_status, pol.allowed_tcb_status, "[tdx]", claims.advisory_ids)
    registers = {
        "mr_td": claims.mr_td,
        **{f"rtmr{i}": claims.rtmrs[i] for i in range(4)},
        "mr_config_id": claims.mr_config_id,
        "mr_owner": claims.mr_owner,
        "mr_seam": claims.mr_seam,
    }
    for name, value in registers.items():
        _check_pin(errors, name, value, getattr(pol, name), "[tdx]")
    return bool(pol.mr_td)


def _appraise_snp(claims: SnpClaims, policy: Policy, errors: list[str]) -> bool:
    pol = policy.sev_snp
    if claims.debug and not pol.allow_debug:
        errors.append(
            "debug is allowed by the guest policy: the host can read and change this guest; refuse it, "
            "or set [sev_snp] allow_debug = true for a test system only"
        )
    _check_tcb_status(errors, claims.tcb_status, pol.allowed_tcb_status, "[sev_snp]")
    _check_pin(errors, "measurement", claims.measurement, pol.measurement, "[sev_snp]")
    _check_pin(errors, "host_data", claims.host_data, pol.host_data, "[sev_snp]")
    if pol.vmpl is not None and claims.vmpl != pol.vmpl:
        errors.append(f"vmpl {claims.vmpl} differs from policy {pol.vmpl}: the report was requested at another privilege level")
    for part, minimum in sorted(pol.min_reported_tcb.items()):
        have = getattr(claims.reported_tcb, part)
        if have is None or have < minimum:
            errors.append(
                f"reported_tcb.{part} {have} is below the policy minimum {minimum}: have the host's firmware updated"
            )
    return bool(pol.measurement)


def appraise(claims: Claims, policy: Policy) -> Verdict:
    """Every trust decision about verified claims, default-deny (PROTOCOL.md part C, Appraisal)."""
    errors: list[str] = []
    warnings: list[str] = []
    if claims.simulated:
        if not policy.allow_simulated:
            errors.append("tee is simulated, which is not a TEE: pass --allow-simulated (allow_simulated = true) for testing only")
    elif claims.tee not in policy.allowed_tees:
        errors.append(f"tee {claims.tee} is not in the policy's allowed_tees {sorted(policy.allowed_tees)}: add it if you trust it")

    if isinstance(claims.cpu, TdxClaims):
        pinned = _appraise_tdx(claims.cpu, policy, claims.simulated, errors)
        register = "mr_td"
    else:
        pinned = _appraise_snp(claims.cpu, policy, errors)
        register = "measurement"
    if not pinned and not claims.simulated:
        if policy.accept_any_measurement:
            warnings.append(f"{register} is not pinned: any code on this TEE is accepted (accept_any_measurement)")
        else:
            errors.append(
                f"{register} is not pinned by the policy, so any code could be running: pin it "
                "(tee-node policy from-quote) or pass --accept-any-measurement"
            )

    if policy.config_digest and claims.config_digest is None:
        errors.append(
            "config_digest is pinned by the policy but bare evidence carries none: "
            "verify the node's attestation document (tee-node attest) instead"
        )
    elif claims.config_digest is not None and policy.config_digest and claims.config_digest.hex() not in policy.config_digest:
        errors.append(
            f"config_digest differs from policy: the node reports {claims.config_digest.hex()}; "
            "if you trust its measured_config, add the digest to config_digest"
        )

    if policy.require_gpu and not claims.gpus:
        errors.append("gpu evidence is required by the policy but the node sent none: refuse, or drop require_gpu")
    # Every GPU that came with the node is judged, required or not: it sees the same plaintext.
    for gpu in claims.gpus:
        errors += appraise_gpu(gpu, policy)
    return Verdict(accepted=not errors, errors=tuple(errors), warnings=tuple(warnings))


def appraise_gpu(gpu: GpuClaims, policy: Policy, *, bare: bool = False) -> list[str]:
    """Why the policy refuses one GPU (nothing when it accepts it).

    `bare`: a report verified on its own (`tee-node gpu verify`), where no node reports the CC mode
    and ready state; in an attestation document they are required.
    """
    errors: list[str] = []
    name = f"gpu {gpu.device}"
    pol = policy.gpu
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
    if gpu.ocsp != OCSP_GOOD and not pol.allow_ocsp_unknown:
        missing = f" ({', '.join(gpu.ocsp_missing)})" if gpu.ocsp_missing else ""
        errors.append(
            f"{name} ocsp status is {gpu.ocsp}: no current OCSP response for every certificate{missing}; give fresh "
            "responses (the node refreshes them), or knowingly set [gpu] allow_ocsp_unknown = true"
        )
    if pol.min_driver_version is not None:
        try:
            have = _driver_version(gpu.driver_version, f"{name} driver_version")
        except PolicyError:
            have = ()  # not a version NVIDIA writes: below any minimum
        if have < _driver_version(pol.min_driver_version, "gpu.min_driver_version"):
            errors.append(
                f"{name} driver_version {gpu.driver_version} is below the policy minimum {pol.min_driver_version}: "
                "have the node's NVIDIA driver updated"
            )
    if pol.allowed_vbios_versions and gpu.vbios_version.upper() not in pol.allowed_vbios_versions:
        errors.append(
            f"{name} vbios_version {gpu.vbios_version} is not in [gpu] allowed_vbios_versions: "
            "if you trust this VBIOS, add it"
        )
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
        lines.append(f"mr_td = {_toml_value([cpu.mr_td.hex()])}")
        for i, rtmr in enumerate(cpu.rtmrs):
            lines.append(f"rtmr{i} = {_toml_value([rtmr.hex()])}")
        for name in ("mr_config_id", "mr_owner", "mr_seam"):
            lines.append(f"{name} = {_toml_value([getattr(cpu, name).hex()])}")
        lines.append(f"allowed_tcb_status = {_toml_value([UP_TO_DATE])}")
        lines.append(f"# tcb_status of this evidence: {cpu.tcb_status}")
    else:
        lines += ["", "[sev_snp]"]
        lines.append(f"measurement = {_toml_value([cpu.measurement.hex()])}")
        lines.append(f"host_data = {_toml_value([cpu.host_data.hex()])}")
        lines.append(f"vmpl = {cpu.vmpl}")
        tcb = {p: getattr(cpu.reported_tcb, p) for p in SNP_TCB_PARTS if getattr(cpu.reported_tcb, p) is not None}
        lines.append(f"min_reported_tcb = {_toml_value(tcb)}")
        lines.append(f"allowed_tcb_status = {_toml_value([UP_TO_DATE])}")
        lines.append(f"# tcb_status of this evidence: {cpu.tcb_status}")
    return "\n".join(lines) + "\n"
