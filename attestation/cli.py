"""`tee-node quote verify FILE` and `tee-node policy from-quote FILE`: evidence checked offline.

`quote verify` says whether the evidence is authentic (`valid`) and whether the policy accepts
its claims (`accepted`, `policy_errors`); it exits 0 only when both hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence, TextIO

from . import sevsnp, tdx, trust
from .appraisal import Policy, PolicyError, appraise, appraised_claims, load_policy, policy_from_claims
from .claims import Claims
from .collateral import AmdCollateral
from .errors import AttestationError
from .intel import IntelCollateral

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2

ACCEPT_ANY_WARNING = (
    "WARNING: --accept-any-measurement: the node's code is not pinned; any software on genuine "
    "TEE hardware will be trusted with your data\n"
)


def _tdx_fields(quote: tdx.TdxQuote) -> dict[str, Any]:
    body = quote.body
    return {
        "tee": "tdx",
        "version": quote.header.version,
        "body_type": quote.body_type,
        "measurement": body.mr_td.hex(),
        "report_data": body.report_data.hex(),
        "rtmrs": [r.hex() for r in body.rtmrs],
        "mr_config_id": body.mr_config_id.hex(),
        "mr_owner": body.mr_owner.hex(),
        "mr_seam": body.mr_seam.hex(),
        "td_attributes": body.td_attributes.hex(),
        "xfam": body.xfam.hex(),
    }


def _snp_fields(report: sevsnp.SnpReport) -> dict[str, Any]:
    return {
        "tee": "sev-snp",
        "version": report.version,
        "measurement": report.measurement.hex(),
        "report_data": report.report_data.hex(),
        "chip_id": report.chip_id.hex(),
        "reported_tcb": report.reported_tcb.raw,
    }


def readable(out: dict[str, Any]) -> str:
    """The result of a `verify` command as lines for a person: `key: value`, lists one item per
    line, nested objects indented, `yes`/`no`/`none` for booleans and nulls (`--json` is for
    programs)."""
    lines: list[str] = []

    def scalar(value: Any) -> str:
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)

    def emit(key: str, value: Any, indent: str) -> None:
        label = key.replace("_", " ")
        if isinstance(value, dict):
            lines.append(f"{indent}{label}:" + ("" if value else " none"))
            for sub_key, sub_value in value.items():
                emit(str(sub_key), sub_value, indent + "  ")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{indent}{label}:" + ("" if value else " none"))
            for item in value:
                if isinstance(item, dict):
                    lines.append(f"{indent}  -")
                    for sub_key, sub_value in item.items():
                        emit(str(sub_key), sub_value, indent + "    ")
                else:
                    lines.append(f"{indent}  - {scalar(item)}")
        else:
            lines.append(f"{indent}{label}: {scalar(value)}")

    for key, value in out.items():
        emit(key, value, "")
    return "\n".join(lines) + "\n"


def verify_file(
    path: str | Path,
    *,
    at: datetime | None = None,
    certs: Sequence[str | Path] = (),
    collateral: str | Path | None = None,
    out: dict[str, Any],
) -> Claims:
    """Parse and verify raw evidence, filling `out` with what it says; raise when it is not authentic."""
    data = Path(path).read_bytes()
    if tdx.looks_like_tdx_quote(data):
        quote = tdx.TdxQuote.from_bytes(data)
        out.update(_tdx_fields(quote))
        intel = IntelCollateral.from_directory(collateral) if collateral else None
        result = tdx.verify_quote(quote, at=at, collateral=intel)
        out.update(debug=result.claims.debug, fmspc=result.claims.fmspc.hex() if result.claims.fmspc else None)
        return Claims(tee="simulated" if result.simulated else "tdx", simulated=result.simulated, cpu=result.claims)
    if sevsnp.looks_like_snp_report(data):
        report = sevsnp.SnpReport.from_bytes(data)
        out.update(_snp_fields(report))
        chain = [c for p in certs for c in sevsnp.load_amd_certificates(Path(p).read_bytes())]
        amd = AmdCollateral.from_directory(collateral) if collateral else None
        if amd is not None:
            chain += amd.certificates()
        result = sevsnp.verify_report(report, chain, at=at, crl=amd.crl if amd else None)
        out["debug"] = result.claims.debug
        return Claims(tee="sev-snp", simulated=False, cpu=result.claims)
    raise ValueError("not a TDX quote (version 4/5, TEE type 0x81) or a SEV-SNP report (1184 bytes, version >= 2)")


def quote_verify(
    path: str | Path,
    *,
    policy: Policy | None = None,
    at: datetime | None = None,
    as_json: bool = False,
    certs: Sequence[str | Path] = (),
    collateral: str | Path | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Print what the evidence says, whether it verifies and whether the policy accepts it; return the exit code."""
    stdout = stdout or sys.stdout
    policy = policy or Policy()
    out: dict[str, Any] = {
        "file": str(path),
        "simulated": False,
        "valid": False,
        "errors": [],
        "tcb_status": None,
        "claims": None,
        "accepted": False,
        "policy_errors": [],
        "policy_warnings": [],
    }
    code = EXIT_INVALID
    try:
        claims = verify_file(path, at=at, certs=certs, collateral=collateral, out=out)
    except OSError as exc:
        out["errors"].append(f"cannot read {exc.filename}: {exc.strerror}")
        code = EXIT_UNREADABLE
    except ValueError as exc:  # neither format
        out["errors"].append(str(exc))
        code = EXIT_UNREADABLE
    except AttestationError as exc:
        out["errors"].append(f"{type(exc).__name__}: {exc}")
    else:
        verdict = appraise(claims, policy)
        claims = appraised_claims(claims, verdict)
        out.update(
            simulated=claims.simulated,
            valid=True,
            tcb_status=claims.cpu.tcb_status,
            claims=claims.cpu.as_json(),
            accepted=verdict.accepted,
            policy_errors=list(verdict.errors),
            policy_warnings=list(verdict.warnings),
        )
        if verdict.accepted:
            code = EXIT_VALID
    if as_json:
        stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        stdout.write(readable({key: value for key, value in out.items() if key != "claims"}))
    return code


def policy_from_quote(
    path: str | Path,
    *,
    at: datetime | None = None,
    certs: Sequence[str | Path] = (),
    collateral: str | Path | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Print a policy pinning the registers of authentic, known-good evidence."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        claims = verify_file(path, at=at, certs=certs, collateral=collateral, out={})
    except OSError as exc:
        stderr.write(f"error: cannot read {exc.filename}: {exc.strerror}\n")
        return EXIT_UNREADABLE
    except (ValueError, AttestationError) as exc:
        stderr.write(f"error: the evidence does not verify, so nothing in it can be pinned: {exc}\n")
        return EXIT_INVALID
    if claims.cpu.debug:
        stderr.write("warning: this evidence is from a debug TEE; the policy printed still refuses debug\n")
    stdout.write(policy_from_claims(claims))
    return EXIT_VALID


def iso_time(text: str) -> datetime:
    try:
        return trust.as_utc(datetime.fromisoformat(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


def command_group(parser: argparse.ArgumentParser, dest: str) -> Any:
    """Subcommands of a `tee-node` command group: called without one, it prints its help and says
    "COMMAND" (argparse would name `dest`, an internal name)."""
    return parser.add_subparsers(dest=dest, required=True, metavar="COMMAND", title="commands")


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """--policy, --accept-any-measurement and --allow-simulated: shared by quote verify, attest and chat."""
    parser.add_argument("--policy", type=Path, metavar="FILE", help="TOML appraisal policy (docs/policy.md)")
    parser.add_argument(
        "--accept-any-measurement",
        action="store_true",
        help="accept a real TEE whose measurements the policy does not pin (prints a warning every time)",
    )
    parser.add_argument("--allow-simulated", action="store_true", help="accept the simulated TEE (never a real TEE)")


def policy_from_args(args: argparse.Namespace, err: TextIO | None = None) -> Policy:
    """The policy file (or the default policy) with the command line's overrides; warns on stderr."""
    policy = load_policy(args.policy) if getattr(args, "policy", None) else Policy()
    if getattr(args, "allow_simulated", False):
        policy = replace(policy, allow_simulated=True)
    if getattr(args, "accept_any_measurement", False):
        policy = replace(policy, accept_any_measurement=True)
    if policy.accept_any_measurement:
        (err or sys.stderr).write(ACCEPT_ANY_WARNING)
    return policy


def _add_evidence_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="raw TDX quote or SEV-SNP attestation report")
    parser.add_argument("--at", type=iso_time, default=None, help="verify certificates and collateral at this ISO time (default: now)")
    parser.add_argument("--certs", nargs="+", default=[], metavar="FILE", help="SEV-SNP VCEK/VLEK, ASK, ARK (PEM or DER)")
    parser.add_argument("--collateral", metavar="DIR", help="collateral directory: Intel PCS and AMD KDS files (docs/policy.md)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_evidence_arguments(parser)
    add_policy_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def add_from_quote_arguments(parser: argparse.ArgumentParser) -> None:
    _add_evidence_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        policy = policy_from_args(args)
    except (OSError, PolicyError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_UNREADABLE
    return quote_verify(args.file, policy=policy, at=args.at, as_json=args.json, certs=args.certs, collateral=args.collateral)


def run_from_quote(args: argparse.Namespace) -> int:
    return policy_from_quote(args.file, at=args.at, certs=args.certs, collateral=args.collateral)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attestation.cli", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
