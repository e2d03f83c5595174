"""`tee-node release statement` and `tee-node release verify`: make a release's statement from
known-good evidence, and verify a release bundle offline (docs/releases.md).

`statement` prints the unsigned in-toto statement (the release pipeline signs it with keyless
Sigstore signing); `verify` checks a Sigstore bundle under a trusted root for an expected signer
and prints what it releases; it exits 0 only when the bundle is valid.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2
_SUBJECT = re.compile(r"^(?P<name>.+)=(?P<digest>[0-9a-fA-F]{64})$")


def _subject(value: str) -> tuple[str, str]:
    match = _SUBJECT.match(value)
    if not match:
        raise argparse.ArgumentTypeError(f"--subject takes NAME=<64 hex SHA-256>, got {value!r}")
    return match["name"], match["digest"].lower()


def add_release_parser(commands: Any) -> None:
    from attestation.cli import command_group, iso_time

    release = commands.add_parser("release", help="release statements and their Sigstore bundles (docs/releases.md)")
    sub = command_group(release, "release_command")

    statement = sub.add_parser(
        "statement",
        help="print a release's unsigned in-toto statement pinning the registers of known-good evidence",
        description="Verify known-good evidence (a raw quote, or a running node's attestation) and print the "
        "release statement whose reference_values pin what it measures, for the release pipeline to sign.",
    )
    source = statement.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-quote", metavar="FILE", help="a raw TDX quote or SEV-SNP report of the release's image")
    source.add_argument("--from-node", metavar="URL", help="a node running the release's image: its attestation document")
    statement.add_argument("--certs", nargs="+", default=[], metavar="FILE", help="with --from-quote: SEV-SNP VCEK/VLEK, ASK, ARK")
    statement.add_argument("--collateral", metavar="DIR", help="with --from-quote: a collateral directory (docs/policy.md)")
    statement.add_argument("--at", type=iso_time, default=None, help="with --from-quote: verify at this ISO time (default: now)")
    statement.add_argument("--allow-simulated", action="store_true", help="with --from-node: accept the simulated TEE (tests only)")
    statement.add_argument("--version", dest="release_version", default=None, metavar="V", help="the release's version (default: this tee-node's)")
    statement.add_argument("--repository", required=True, metavar="URL", help="the source repository, e.g. https://github.com/ORG/REPO")
    statement.add_argument("--commit", required=True, metavar="HEX", help="the source commit (40 hex)")
    statement.add_argument(
        "--subject", type=_subject, action="append", required=True, metavar="NAME=SHA256", help="the image released (repeatable)"
    )
    statement.set_defaults(func=run_statement)

    verify = sub.add_parser(
        "verify",
        help="verify a release's Sigstore bundle offline for an expected signer",
        description="Verify a Sigstore bundle offline (certificate chain, SCT, log inclusion proof, signed checkpoint or "
        "entry timestamp, DSSE signature) for the given signer, and that it signs a tee-node release. Exit 0 only when valid.",
    )
    verify.add_argument("bundle", help="the Sigstore bundle (JSON)")
    signer = verify.add_mutually_exclusive_group(required=True)
    signer.add_argument("--identity", help="the signer's exact identity (the certificate's SAN, e.g. the CI workflow's URI)")
    signer.add_argument("--identity-pattern", metavar="RE", help="a regular expression the signer's identity matches in full")
    verify.add_argument("--issuer", required=True, help="the signer's OIDC issuer, e.g. https://token.actions.githubusercontent.com")
    verify.add_argument("--trusted-root", metavar="FILE", help="a Sigstore trusted root JSON (default: Sigstore's public-good root)")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(func=run_verify)


def _claims_from_node(url: str, allow_simulated: bool, err: TextIO) -> Any:
    """The claims of a running node's attestation: verified authentic, measurements not pinned
    (they are what is being measured)."""
    from attestation.appraisal import Policy
    from attestation.document import verify_evidence

    from .client import Client

    policy = Policy(allow_simulated=allow_simulated, accept_any_measurement=True)
    with Client(url, policy=policy) as client:
        identity = client.attest()
    document = identity.document
    # The client verified this document for its own fresh nonce; read its claims back from it.
    return verify_evidence(document, expected_nonce=bytes.fromhex(document["nonce"]), tls_cert_sha256=identity.tls_cert_sha256).claims


def run_statement(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from attestation.cli import verify_file
    from attestation.errors import AttestationError
    from attestation.release import build_statement, reference_values_from_claims

    from .client import TeeNodeError

    out, err = out or sys.stdout, err or sys.stderr
    try:
        if args.from_quote:
            claims = verify_file(args.from_quote, at=args.at, certs=args.certs, collateral=args.collateral, out={})
        else:
            claims = _claims_from_node(args.from_node, args.allow_simulated, err)
    except OSError as exc:
        err.write(f"error: cannot read {exc.filename}: {exc.strerror}\n")
        return EXIT_UNREADABLE
    except (ValueError, AttestationError, TeeNodeError) as exc:
        err.write(f"error: the evidence does not verify, so nothing in it can be released: {exc}\n")
        return EXIT_INVALID
    if claims.cpu.debug:
        err.write("warning: this evidence is from a debug TEE; clients refuse debug unless their own policy allows it\n")
    try:
        statement = build_statement(
            reference_values_from_claims(claims),
            version=args.release_version or metadata.version("tee-node"),
            repository=args.repository,
            commit=args.commit,
            subjects=dict(args.subject),
        )
    except AttestationError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_INVALID
    out.write(json.dumps(statement, indent=2) + "\n")
    return EXIT_VALID


def run_verify(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from attestation.errors import ReleaseInvalid
    from attestation.release import identity_policy, verify_release

    out, err = out or sys.stdout, err or sys.stderr
    result: dict[str, Any] = {
        "bundle": args.bundle,
        "valid": False,
        "identity": None,
        "issuer": None,
        "log_index": None,
        "integrated_time": None,
        "predicate": None,
        "errors": [],
    }
    code = EXIT_INVALID
    try:
        text = Path(args.bundle).read_text()
        signer = identity_policy(issuer=args.issuer, identity=args.identity, identity_pattern=args.identity_pattern)
        release = verify_release(text, trusted_root=args.trusted_root, signer=signer)
    except OSError as exc:
        result["errors"].append(f"cannot read {exc.filename}: {exc.strerror}")
        code = EXIT_UNREADABLE
    except re.error as exc:
        result["errors"].append(f"--identity-pattern is not a regular expression: {exc}")
        code = EXIT_UNREADABLE
    except ReleaseInvalid as exc:
        result["errors"].append(str(exc))
    else:
        summary = release.as_json()
        result.update(
            valid=True,
            identity=summary["identity"],
            issuer=summary["issuer"],
            log_index=summary["log_index"],
            integrated_time=summary["integrated_time"],
            predicate=summary["predicate"],
        )
        code = EXIT_VALID
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
    else:
        for key, value in result.items():
            out.write(f"{key}: {json.dumps(value) if key == 'predicate' else value}\n")
    return code


__all__ = ["add_release_parser", "run_statement", "run_verify"]
