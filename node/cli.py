"""`tee-node`: serve the node, prepare models, verify quotes, GPU reports and releases, attest and chat with a node."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from attestation import cli as attestation_cli
from attestation.errors import AttestationError
from attestation.nvidia import cli as gpu_cli

from . import supervisor
from .config import LOG_FORMAT, NodeConfig, load_config, merge_settings

EXIT_CANNOT_START = 2


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The config file and environment, then the CLI flags on top."""
    config = load_config(args.config)
    flags: dict[str, Any] = {}
    if getattr(args, "host", None):
        flags["host"] = args.host
    if getattr(args, "port", None) is not None:
        flags["port"] = args.port
    if getattr(args, "engine", None):
        flags.setdefault("engine", {})["kind"] = args.engine
    if getattr(args, "model", None):
        flags.setdefault("engine", {})["models"] = [{"name": args.model, "source": args.model}]
    if getattr(args, "upstream_url", None):
        flags.setdefault("engine", {})["upstream_url"] = args.upstream_url
    if getattr(args, "tls", False):
        flags["tls"] = {"enabled": True}
    if getattr(args, "log_level", None):
        flags["log_level"] = args.log_level
    if not flags:
        return config
    return NodeConfig(**merge_settings(config.model_dump(), flags))


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop, as vLLM's own server runs on: the node spent 13 % less CPU per plain
    request and 16 % less per confidential one on it than on asyncio's (bench/server.py's load,
    least-disturbed of 4 alternating windows each)."""
    import uvloop

    return uvloop.new_event_loop()


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .server import create_app, server_settings
    from .server.state import NODE

    try:
        config = config_from_args(args)
        logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
        app = create_app(config)
    except (ValueError, AttestationError) as exc:  # a refusal to start: its message says why and what to do
        print(f"tee-node serve: cannot start: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    # The config digest covers the models' weights: it is logged once they are loaded.
    tls = app[NODE].tls
    logging.getLogger("tee_node").info(
        "starting tee-node on %s://%s:%d: tee_mode=%s, engine=%s, %d model(s)%s; /ready answers 200 once loaded",
        "https" if tls else "http",
        config.host,
        config.port,
        config.tee_mode,
        config.engine.kind,
        len(config.engine.models),
        f", tls_cert_sha256={tls.sha256.hex()} (attested)" if tls else "",
    )
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        shutdown_timeout=config.shutdown_grace,
        print=None,
        ssl_context=tls.context if tls else None,
        loop=_event_loop(),
        **server_settings(config),
    )
    # Everything the node owns is closed by now; interpreter teardown would still spend seconds
    # in torch's and vLLM's native exit handlers with nothing left to do.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _sha256_hex(text: str) -> str:
    try:
        if len(bytes.fromhex(text)) == 32:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError("expected 64 hex characters (a SHA-256)")


def _relay(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .relay import RelaySettings, create_relay_app

    logging.basicConfig(level=args.log_level or "INFO", format=LOG_FORMAT)
    settings = RelaySettings(
        gateway=args.gateway,
        gateway_cert_sha256=bytes.fromhex(args.gateway_cert_sha256) if args.gateway_cert_sha256 else None,
        max_body_bytes=args.max_body_bytes,
        per_address_per_minute=args.per_address_per_minute,
    )
    logging.getLogger("tee_node.relay").info(
        "relaying Oblivious HTTP on %s:%d to %s (no client header but Content-Type; no addresses logged)",
        args.host,
        args.port,
        args.gateway,
    )
    # No access log: it would write every client's address.
    web.run_app(create_relay_app(settings), host=args.host, port=args.port, access_log=None, print=None, loop=_event_loop())
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .worker import run

    try:
        config = config_from_args(args)
    except (ValueError, AttestationError) as exc:
        print(f"tee-node worker: cannot start: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    code = asyncio.run(run(config, args.head))
    # vLLM's threads and exit handlers have nothing left to do (as after `serve`).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _models_prepare(args: argparse.Namespace) -> int:
    from .models import prepare_all

    for path in prepare_all(config_from_args(args)):
        print(path)
    return 0


def _weights_args(values: list[str] | None) -> dict[str, str]:
    """NAME=HEX pairs, several per value allowed (whitespace-separated, as `models digest` prints them)."""
    known = {}
    for value in (pair for v in values or [] for pair in v.split()):
        name, _, digest = value.rpartition("=")
        if not name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise SystemExit(f"error: --weights-sha256 takes NAME=<64 hex>, got {value!r}")
        known[name] = digest.lower()
    return known


def _config_digest(args: argparse.Namespace) -> int:
    from .models import ModelPrepareError, configured_weights

    config = config_from_args(args)
    try:
        weights = configured_weights(config, _weights_args(args.weights_sha256))
    except ModelPrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(config.digest(weights).hex())
    return 0


def _models_digest(args: argparse.Namespace) -> int:
    from .models import configured_weights

    for name, digest in configured_weights(config_from_args(args)).items():
        print(f"{name}={digest}")
    return 0


class _HelpfulParser(argparse.ArgumentParser):
    """Usage errors (a missing argument or subcommand above all) print the command's whole help
    before the error; subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.print_help(sys.stderr)
        self.exit(2, f"\n{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _HelpfulParser(prog="tee-node", description=__doc__)
    commands = attestation_cli.command_group(parser, "command")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, default=None, help="TOML config (default: configs/simulated.toml)")
        return p

    serve = with_config(commands.add_parser("serve", help="run the node"))
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--engine", choices=["vllm", "upstream", "echo"])
    serve.add_argument("--model", help="a model directory or name to serve instead of the configured ones")
    serve.add_argument("--upstream-url", help="OpenAI-compatible server for --engine upstream")
    serve.add_argument(
        "--tls", action="store_true", help="serve attested HTTPS (the default in the real TEE modes; tls.enabled)"
    )
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the node's log level (default INFO); at DEBUG vLLM logs at its own level too, else at WARNING",
    )
    serve.set_defaults(func=_serve)

    relay = commands.add_parser(
        "relay", help="run an Oblivious HTTP relay in front of one node (worth it only when run by someone else than the node's operator)"
    )
    relay.add_argument("--gateway", required=True, help="the node's gateway URL, e.g. https://node.example/v1/ohttp")
    relay.add_argument(
        "--gateway-cert-sha256",
        metavar="HEX",
        type=_sha256_hex,
        help="pin the certificate of a node serving attested TLS (self-signed; `tee-node attest` prints its sha256) "
        "instead of validating it against the system's CAs",
    )
    relay.add_argument("--host", default="127.0.0.1")
    relay.add_argument("--port", type=int, default=8090)
    relay.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    relay.add_argument("--per-address-per-minute", type=int, default=120, help="requests a minute from one client address")
    relay.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    relay.set_defaults(func=_relay)
    worker = with_config(
        commands.add_parser("worker", help="run a worker VM of a multi-VM node: attest to the head, join its WireGuard link, run vLLM headless")
    )
    worker.add_argument("--head", required=True, help="the head node's URL (http(s)://HOST:PORT)")
    worker.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    worker.set_defaults(func=_worker)

    models = attestation_cli.command_group(commands.add_parser("models", help="model cache"), "models_command")
    prepare = with_config(models.add_parser("prepare", help="prepare the configured models ahead of time"))
    prepare.add_argument("--model")
    prepare.set_defaults(func=_models_prepare)
    models_digest = with_config(models.add_parser("digest", help="print NAME=SHA256 of each model's weight manifest"))
    models_digest.set_defaults(func=_models_digest)

    quote = attestation_cli.command_group(commands.add_parser("quote", help="TEE evidence"), "quote_command")
    verify = quote.add_parser("verify", help="verify a raw TDX quote or SEV-SNP report")
    attestation_cli.add_arguments(verify)
    verify.set_defaults(func=attestation_cli.run)

    policy = attestation_cli.command_group(commands.add_parser("policy", help="appraisal policies"), "policy_command")
    from_quote = policy.add_parser("from-quote", help="print a policy pinning the registers of known-good evidence")
    attestation_cli.add_from_quote_arguments(from_quote)
    from_quote.set_defaults(func=attestation_cli.run_from_quote)
    from .cli_release import add_release_parser

    add_release_parser(commands)
    gpu = attestation_cli.command_group(commands.add_parser("gpu", help="NVIDIA GPU evidence"), "gpu_command")
    gpu_verify = gpu.add_parser("verify", help="verify an NVIDIA GPU attestation report offline")
    gpu_cli.add_arguments(gpu_verify)
    gpu_verify.set_defaults(func=gpu_cli.gpu_verify)

    config = attestation_cli.command_group(commands.add_parser("config", help="configuration"), "config_command")
    digest = with_config(config.add_parser("digest", help="print the config digest the attestation will report (prepares the models to measure their weights)"))
    digest.add_argument(
        "--weights-sha256", action="append", metavar="NAME=HEX", help="a model's weight-manifest digest measured elsewhere, as `tee-node models digest` prints it (repeatable)"
    )
    digest.set_defaults(func=_config_digest)
    from .cli_client import add_attest_parser, add_chat_parser, add_image_parser, add_tokens_parser

    add_chat_parser(commands)
    add_image_parser(commands)
    add_attest_parser(commands)
    add_tokens_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.func is _serve and supervisor.supported():
        if not supervisor.supervised():
            return supervisor.supervise(argv)
        supervisor.bind_to_supervisor()
        supervisor.gate_child_output()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
