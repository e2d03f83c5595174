"""`tee-node gpu verify REPORT`: check an NVIDIA GPU attestation report offline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..appraisal import Policy, PolicyError, appraise_gpu, load_policy
from ..cli import EXIT_INVALID, EXIT_UNREADABLE, EXIT_VALID, iso_time, readable
from ..errors import AttestationError
from .spdm import NONCE_SIZE, parse_report_text
from .verify import verify_gpu_report


def _nonce(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != NONCE_SIZE:
        raise argparse.ArgumentTypeError(f"the nonce must be {NONCE_SIZE * 2} hex characters")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", help="GPU attestation report (NVML's SPDM request and response), hex text or raw bytes")
    parser.add_argument("--cert-chain", required=True, metavar="PEM", help="the GPU's attestation certificate chain, leaf first")
    parser.add_argument("--nonce", required=True, type=_nonce, metavar="HEX", help="the nonce the report must answer (32 bytes)")
    parser.add_argument("--rim", action="append", default=[], metavar="FILE", help="driver or VBIOS RIM (SWID tag); repeatable")
    parser.add_argument("--ocsp", action="append", default=[], metavar="FILE", help="DER OCSP response for a chain certificate; repeatable")
    parser.add_argument("--at", type=iso_time, default=None, help="verify at this ISO time (default: now)")
    parser.add_argument("--policy", type=Path, metavar="FILE", help="TOML appraisal policy; its [gpu] table applies (docs/policy.md)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def gpu_verify(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {
        "report": str(args.report),
        "valid": False,
        "driver_version": None,
        "vbios_version": None,
        "measurements_checked": 0,
        "measurements_matched": 0,
        "measurements_mismatched": [],
        "ocsp": None,
        "accepted": False,
        "policy_errors": [],
        "errors": [],
    }
    code = EXIT_INVALID
    try:
        policy = load_policy(args.policy) if args.policy else Policy()
        report = parse_report_text(Path(args.report).read_bytes())
        result = verify_gpu_report(
            report,
            Path(args.cert_chain).read_bytes(),
            nonce=args.nonce,
            rims=[Path(p).read_bytes() for p in args.rim],
            ocsp_responses=[Path(p).read_bytes() for p in args.ocsp],
            at=args.at,
        )
    except OSError as exc:
        out["errors"].append(f"cannot read {exc.filename}: {exc.strerror}")
        code = EXIT_UNREADABLE
    except (AttestationError, PolicyError) as exc:
        out["errors"].append(f"{type(exc).__name__}: {exc}")
        code = EXIT_UNREADABLE
    else:
        # A bare report: no node reports the CC mode and ready state, so only the report is judged.
        policy_errors = appraise_gpu(result.claims(0), policy, bare=True) if result.valid else []
        out.update(
            valid=result.valid,
            model=result.model,
            driver_version=result.driver_version,
            vbios_version=result.vbios_version,
            measurements=result.measurements,
            measurements_checked=result.measurements_checked,
            measurements_matched=result.measurements_matched,
            measurements_mismatched=list(result.measurements_mismatched),
            ocsp=result.ocsp,
            accepted=result.valid and not policy_errors,
            policy_errors=policy_errors,
            errors=list(result.errors),
            notes=list(result.notes),
        )
        if out["accepted"]:
            code = EXIT_VALID
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(readable(out), end="")
    return code
