"""`tee-node quote verify FILE`: check a raw TDX quote or SEV-SNP report offline."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from . import sevsnp, tdx, trust
from .errors import AttestationError, SimulatedNotAllowed
from .intel import IntelCollateral

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2


def _tdx_fields(quote: tdx.TdxQuote) -> dict[str, Any]:
    return {
        "tee": "tdx",
        "version": quote.header.version,
        "body_type": quote.body_type,
        "measurement": quote.body.mr_td.hex(),
        "report_data": quote.body.report_data.hex(),
        "rtmrs": [r.hex() for r in quote.body.rtmrs],
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


def quote_verify(
    path: str | Path,
    *,
    allow_simulated: bool = False,
    at: datetime | None = None,
    as_json: bool = False,
    certs: Sequence[str | Path] = (),
    collateral: str | Path | None = None,
) -> int:
    """Print what the evidence says and whether it verifies; return the process exit code."""
    out: dict[str, Any] = {"file": str(path), "simulated": False, "valid": False, "errors": []}
    code = EXIT_INVALID
    try:
        data = Path(path).read_bytes()
        if tdx.looks_like_tdx_quote(data):
            quote = tdx.TdxQuote.from_bytes(data)
            out.update(_tdx_fields(quote))
            result = tdx.verify_quote(
                quote,
                at=at,
                allow_simulated=allow_simulated,
                collateral=IntelCollateral.from_directory(collateral) if collateral else None,
            )
            out.update(simulated=result.simulated, valid=True, tcb_status=result.tcb_status)
        elif sevsnp.looks_like_snp_report(data):
            report = sevsnp.SnpReport.from_bytes(data)
            out.update(_snp_fields(report))
            chain = [c for p in certs for c in sevsnp.load_amd_certificates(Path(p).read_bytes())]
            sevsnp.verify_report(report, chain, at=at)
            out["valid"] = True
        else:
            out["errors"].append("not a TDX quote (version 4/5, TEE type 0x81) or a SEV-SNP report (1184 bytes, version >= 2)")
            code = EXIT_UNREADABLE
    except OSError as exc:
        out["errors"].append(f"cannot read {exc.filename}: {exc.strerror}")
        code = EXIT_UNREADABLE
    except AttestationError as exc:
        out["errors"].append(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, SimulatedNotAllowed):
            out["simulated"] = True
    if out["valid"]:
        code = EXIT_VALID
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
    return code


def _iso_time(text: str) -> datetime:
    try:
        return trust.as_utc(datetime.fromisoformat(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="raw TDX quote or SEV-SNP attestation report")
    parser.add_argument("--allow-simulated", action="store_true", help="accept the simulated TEE (never a real TEE)")
    parser.add_argument("--at", type=_iso_time, default=None, help="verify certificates at this ISO time (default: now)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--certs", nargs="+", default=[], metavar="FILE", help="SEV-SNP VCEK/VLEK, ASK, ARK (PEM or DER)")
    parser.add_argument("--collateral", metavar="DIR", help="Intel PCS collateral directory (CRLs, TCB info, QE identity)")


def run(args: argparse.Namespace) -> int:
    return quote_verify(
        args.file,
        allow_simulated=args.allow_simulated,
        at=args.at,
        as_json=args.json,
        certs=args.certs,
        collateral=args.collateral,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attestation.cli", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
