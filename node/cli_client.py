"""`tee-node chat`, `tee-node image`, `tee-node attest` and `tee-node tokens fetch`: talk to a
node only after verifying its attestation.

All are built on `node.client.Client`: the same attestation, key pinning and response checks
as the library. Exit status 0 only when everything verified.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any, TextIO

from .cli_answers import (
    EXIT_FAILED,
    EXIT_OK,
    AnswerOut,
    attest_and_choose_model,
    identity_lines,
    receipt_line,
    reply,
    report_failure,
    sampling_params,
)


def node_url(text: str) -> str:
    """The `url` argument, refused before anything is contacted unless it is http(s)://HOST."""
    from .client.errors import APIConnectionError
    from .client.transports.base import scheme_of

    try:
        scheme_of(text)
    except APIConnectionError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.cause} (nothing was contacted)") from None
    return text


def _add_common(parser: argparse.ArgumentParser, tokens: bool = True) -> None:
    from attestation.cli import add_policy_arguments

    parser.add_argument(
        "url", type=node_url, help="the node's base URL: https://HOST:PORT (attested TLS) or http://127.0.0.1:8080 (loopback)"
    )
    add_policy_arguments(parser)
    if tokens:
        parser.add_argument(
            "--tokens",
            metavar="WALLET",
            default=None,
            help="spend one Privacy Pass token of this wallet per request instead of the API key, which is "
            "then never sent (fill it with `tee-node tokens fetch`)",
        )
    parser.add_argument(
        "--measurement",
        action="append",
        default=None,
        metavar="HEX",
        help="pin this MRTD / MEASUREMENT (repeatable; overrides the policy file's pins); on TDX "
        "RTMR0-3 must be pinned too (--pin)",
    )
    parser.add_argument(
        "--pin",
        action="append",
        default=None,
        type=_pin,
        metavar="NAME=HEX",
        help="pin a register by the policy file's name: mr_td, rtmr0..rtmr3, mr_seam, mr_config_id, mr_owner, "
        "td_attributes, xfam, measurement, host_data (repeatable, a name twice allows either value; "
        "overrides the policy file's pins of that register)",
    )
    parser.add_argument(
        "--allow-classical",
        action="store_true",
        help="accept a node that offers no ML-KEM-768 key (X25519 alone, not post-quantum); refused by default",
    )
    parser.add_argument(
        "--tee",
        action="append",
        default=None,
        choices=["tdx", "sev-snp"],
        help="accept only this TEE type (repeatable; default: tdx and sev-snp)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TEE_NODE_API_KEY"),
        help="bearer token (default: $TEE_NODE_API_KEY)",
    )
    parser.add_argument(
        "--collateral",
        metavar="DIR",
        help="verify with the Intel/AMD collateral in DIR instead of what the node's document bundles "
        "(the layout of the node's attestation.collateral_dir, docs/policy.md)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument(
        "--relay",
        metavar="RELAY_URL",
        help="send everything (keys, attestation, requests) as Oblivious HTTP through this relay: the node never "
        "sees your address (docs/ohttp.md; worth it when someone other than the node's operator runs the relay)",
    )


def _pin(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=HEX (e.g. rtmr1=<96 hex>), got {text[:40]!r}")
    return name.strip().lower(), value.strip()


def _client_kwargs(args: argparse.Namespace, err: TextIO) -> dict[str, Any]:
    """The policy from --policy, --allow-simulated, --accept-any-measurement, --measurement,
    --pin, --tee, --allow-classical and --collateral. ValueError (PolicyError), OSError or
    CollateralInvalid when unusable."""
    from attestation.cli import policy_from_args

    from .client import make_policy

    pins: dict[str, list[str]] = {}
    for name, value in args.pin or ():
        pins.setdefault(name, []).append(value)
    policy = make_policy(
        policy_from_args(args, err),
        expected_measurements=args.measurement,
        pins=pins,
        allowed_tee=args.tee,
        allow_classical=args.allow_classical,
        collateral=args.collateral,
    )
    if getattr(args, "tokens", None):
        from .client import Wallet

        return {"tokens": Wallet(args.tokens), "policy": policy, "timeout": args.timeout, "relay": args.relay}
    return {"api_key": args.api_key, "policy": policy, "timeout": args.timeout, "relay": args.relay}


# --- chat -----------------------------------------------------------------------------------


def add_chat_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a node after verifying its attestation (one prompt, or a session)",
        description="Attest the node, send PROMPT sealed to its attested key, print the verified answer. "
        "Without PROMPT: an interactive session (attested once; every turn a verified confidential "
        "request carrying the conversation so far; /exit, Ctrl-D or Ctrl-C ends it).",
    )
    _add_common(parser)
    parser.add_argument("prompt", nargs="?", help="the user message (none: an interactive session)")
    parser.add_argument("--model", help="model name (default: the first from GET /v1/models)")
    parser.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens of the request")
    parser.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (default: the model's; 0 for the same answer every time)"
    )
    parser.add_argument("--system", default=None, help="an optional system message")
    parser.set_defaults(func=run_chat)
    return parser


def run_chat(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from attestation.errors import AttestationError

    from .client import Client, TeeNodeError

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        client_kwargs = _client_kwargs(args, err)
    except (OSError, ValueError, AttestationError) as exc:  # PolicyError, CollateralInvalid
        err.write(f"error: {exc}\n")
        return EXIT_FAILED
    if args.prompt is None:
        from .cli_chat import run_session

        return run_session(args, client_kwargs, out, err)
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    answer = AnswerOut(out)
    try:
        with Client(args.url, **client_kwargs) as client:
            model = attest_and_choose_model(client, args.model, err)
            if model is None:
                return EXIT_FAILED
            _, verified = reply(client, model, messages, sampling_params(args), not args.no_stream, answer)
            err.write(receipt_line(verified))
            return EXIT_OK
    except (TeeNodeError, AttestationError) as exc:
        return report_failure(err, exc, answer.printed)


# --- image ----------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def add_image_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "image",
        help="generate images on a node after verifying its attestation",
        description="Attest the node, send PROMPT sealed to its attested key as an image request, verify "
        "the answer (signature, hash, receipt) and write each image as a PNG.",
    )
    _add_common(parser)
    parser.add_argument("prompt", help="what the image shows")
    parser.add_argument("--model", help="model name (default: the node's first image model)")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's first size)")
    parser.add_argument("--n", type=int, default=None, help="how many images (default 1)")
    parser.add_argument(
        "--out", type=Path, default=Path("image.png"), help="the PNG to write (default image.png); with --n N > 1, "
        "FILE-1.png ... FILE-N.png"
    )
    parser.set_defaults(func=run_image)
    return parser


def image_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{index}{out.suffix or '.png'}") for index in range(1, count + 1)]


def run_image(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from attestation.errors import AttestationError

    from .client import Client, TeeNodeError

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        client_kwargs = _client_kwargs(args, err)
    except (OSError, ValueError, AttestationError) as exc:
        err.write(f"error: {exc}\n")
        return EXIT_FAILED
    try:
        with Client(args.url, **client_kwargs) as client:
            model = attest_and_choose_model(client, args.model, err, task="images")
            if model is None:
                return EXIT_FAILED
            response = client.images.generate(model=model, prompt=args.prompt, n=args.n, size=args.size, response_format="b64_json")
            images = [item.png() for item in response.data]
            if not images or any(not png.startswith(PNG_SIGNATURE) for png in images):
                err.write("error: the node's answer verified but does not hold PNG images\n")
                return EXIT_FAILED
            receipt = response.receipt
            # The exact count inside the answer (the signed one in clear may be rounded up: privacy.clear_usage).
            units = (response.usage or receipt.usage).total_tokens if (response.usage or receipt.usage) else 0
            err.write(
                f"receipt verified: events={receipt.events}, key epoch={receipt.key_epoch}, signed by the attested key, "
                f"compute units (pixels)={units}\n"
            )
            for path, png in zip(image_paths(args.out, len(images)), images):
                path.write_bytes(png)
                out.write(f"{path}\n")
                err.write(f"wrote {path} ({len(png)} bytes, PNG)\n")
            return EXIT_OK
    except (TeeNodeError, AttestationError, ValueError) as exc:
        return report_failure(err, exc)


# --- attest ---------------------------------------------------------------------------------


def add_attest_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "attest",
        help="fetch and verify a node's attestation (evidence and key binding)",
        description="Fetch /v1/attestation with a fresh nonce and verify the evidence chain, the nonce "
        "and the binding of the node's keys, then appraise its claims against the policy "
        "(docs/policy.md). Exit 0 only when valid and accepted.",
    )
    _add_common(parser)
    parser.add_argument("--json", action="store_true", help="print the result (and the document) as JSON")
    parser.add_argument(
        "--tls-cert-out",
        metavar="FILE",
        help="write the attested TLS certificate (PEM) to FILE, for clients that trust a given "
        "certificate instead of pinning its hash (curl --cacert, httpx verify=...)",
    )
    parser.set_defaults(func=run_attest)
    return parser


def run_attest(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from attestation.errors import AttestationError, PolicyRefused

    from .client import Client, TeeNodeError

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        client_kwargs = _client_kwargs(args, err)
    except (OSError, ValueError, AttestationError) as exc:  # PolicyError, CollateralInvalid
        err.write(f"error: {exc}\n")
        return EXIT_FAILED
    try:
        with Client(args.url, **client_kwargs) as client:
            identity = client.attest()
    except (TeeNodeError, AttestationError) as exc:
        if args.json:
            refused = isinstance(exc, PolicyRefused)  # authentic evidence that the policy does not accept
            result = {"url": args.url, "valid": refused, "accepted": False, "error": type(exc).__name__, "message": str(exc)}
            out.write(json.dumps({**result, "policy_errors": list(exc.errors) if refused else []}) + "\n")
            return EXIT_FAILED
        return report_failure(err, exc)
    if args.tls_cert_out:
        if identity.tls_certificate is None:
            err.write("error: the node was reached over plain HTTP: there is no attested TLS certificate to write\n")
            return EXIT_FAILED
        Path(args.tls_cert_out).write_text(ssl.DER_cert_to_PEM_cert(identity.tls_certificate))
    wallet = client_kwargs.get("tokens")
    if args.json:
        result = {"url": args.url, "valid": True, "accepted": True, **identity.summary(), "document": identity.document}
        if wallet is not None:
            result["wallet_tokens"] = len(wallet)
        out.write(json.dumps(result) + "\n")
    else:
        for line in identity_lines(identity):
            out.write(line + "\n")
        summary = identity.summary()
        out.write(f"  X25519 key:    {summary['dh_public_key']}\n")
        out.write(f"  signing key:   {summary['signing_public_key']}\n")
        out.write(f"  ML-KEM-768:    {'attested encapsulation key (hybrid key agreement)' if identity.kem_public_key else 'none'}\n")
        gpus = identity.document.get("gpu_evidence") or []
        out.write(f"  GPU evidence:  {len(gpus)} device(s)\n")
        token_key = (identity.document.get("public_keys") or {}).get("privacy_pass")
        out.write(f"  Privacy Pass:  {'attested token key' if token_key else 'off'}\n")
        if wallet is not None:
            out.write(f"  token wallet:  {len(wallet)} unspent token(s) in {wallet.path}\n")
        if len(identity.vms) > 1:  # a multi-VM node: every VM verified under the same policy
            out.write(f"  VMs:           {len(identity.vms)}, each verified and appraised\n")
            for vm in identity.vms:
                out.write(f"    {vm['role']}: tee={vm['tee']} measurement={vm['measurement']} config_digest={vm['config_digest']}\n")
        if identity.simulated:
            out.write("  WARNING: simulated evidence proves nothing about confidentiality\n")
    return EXIT_OK


# --- tokens fetch ---------------------------------------------------------------------------


def add_tokens_parser(subparsers: Any) -> argparse.ArgumentParser:
    from attestation.cli import command_group

    tokens = subparsers.add_parser("tokens", help="Privacy Pass tokens (anonymous credentials)")
    commands = command_group(tokens, "tokens_command")
    parser = commands.add_parser(
        "fetch",
        help="fetch tokens for an account into a wallet",
        description="Attest the node, check that its issuer directory and challenge name the token key its "
        "attestation binds, then fetch COUNT tokens with the account's API key (in batches, each batch's "
        "proof verified against the attested key) and add them to WALLET (mode 0600, written atomically). "
        "Spend them with `tee-node chat URL --tokens WALLET` (docs/privacy-pass.md).",
    )
    _add_common(parser, tokens=False)
    parser.add_argument("--count", type=int, default=10, help="how many tokens (default 10)")
    parser.add_argument("--out", required=True, metavar="WALLET", help="the wallet file (created, or added to)")
    parser.set_defaults(func=run_tokens_fetch)
    return parser


def run_tokens_fetch(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from attestation.appraisal import PolicyError
    from attestation.errors import AttestationError

    from .client import Client, TeeNodeError, Wallet

    out = out or sys.stdout
    err = err or sys.stderr
    if not args.api_key:
        err.write("error: tokens are issued to an account: pass --api-key (or set TEE_NODE_API_KEY)\n")
        return EXIT_FAILED
    if args.count < 1:
        err.write("error: --count must be at least 1\n")
        return EXIT_FAILED
    try:
        client_kwargs = _client_kwargs(args, err)
    except (OSError, PolicyError) as exc:
        err.write(f"error: {exc}\n")
        return EXIT_FAILED
    api_key = client_kwargs.pop("api_key")  # sent to the issuance route only, after the attestation
    wallet = Wallet(args.out)
    try:
        with Client(args.url, **client_kwargs) as client:
            added = client.fetch_tokens(api_key, args.count, wallet)
            identity = client.attestation
    except (TeeNodeError, AttestationError, ValueError) as exc:
        return report_failure(err, exc)
    for line in identity_lines(identity):
        err.write(line + "\n")
    out.write(f"fetched {added} token(s) for the attested token key into {args.out} ({len(wallet)} unspent)\n")
    return EXIT_OK


__all__ = ["add_attest_parser", "add_chat_parser", "add_tokens_parser", "run_attest", "run_chat", "run_tokens_fetch"]
