"""`tee-node` CLI: help texts, `config digest`, flag precedence in `config_from_args`, and a real
`tee-node serve` shutting down gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time

import aiohttp
import pytest
from server_support import MODEL, SSE, TEE_NODE, chat_body, compact, spawn_node

from node import envelope
from node.cli import build_parser, config_from_args, main
from node.crypto import b64d


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(TEE_NODE), *args], capture_output=True, text=True, timeout=60, env=env)


def test_help():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: tee-node")
    for command in ("serve", "config", "models"):
        assert command in out.stdout


def _command_paths(parser, path=()):
    """Every command and subcommand of the parser, as argument lists."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name)
                yield from _command_paths(sub, (*path, name))


def test_every_command_without_its_arguments_prints_its_help_in_plain_words(capsys):
    parser = build_parser()
    paths = [(), *_command_paths(parser)]
    assert ("quote", "verify") in paths and ("gpu", "verify") in paths and ("models",) in paths
    needing_arguments = 0
    for path in paths:
        try:
            build_parser().parse_args(list(path))
        except SystemExit as exc:
            err = capsys.readouterr().err
            assert exc.code == 2, path
            needing_arguments += 1
            command = " ".join(("tee-node", *path))
            assert err.startswith(f"usage: {command} "), err
            # argparse names a missing subcommand by its internal `dest` unless told otherwise.
            assert "_command" not in err and "func" not in err, err
        else:
            capsys.readouterr()  # a command that runs as it is (serve, models prepare, ...)
    assert needing_arguments >= 9


def test_serve_help():
    out = run_cli("serve", "--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--config", "--host", "--port", "--engine", "--model", "--upstream-url"):
        assert flag in out.stdout
    assert "{vllm,upstream,echo}" in out.stdout


@pytest.mark.parametrize(
    ("argv", "missing", "listed"),
    [
        ([], "COMMAND", "serve"),
        (["models"], "COMMAND", "prepare the configured models ahead of time"),
        (["quote"], "COMMAND", "verify a raw TDX quote"),
        (["config"], "COMMAND", "print the config digest"),
        (["gpu"], "COMMAND", "verify an NVIDIA GPU attestation report"),
        (["policy"], "COMMAND", "print a policy pinning"),
        (["chat"], "url", "--temperature"),
        (["attest"], "url", "--json"),
        (["quote", "verify"], "file", "--allow-simulated"),
    ],
)
def test_a_command_without_its_required_argument_prints_its_help(capsys, argv, missing, listed):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    prog = " ".join(["tee-node", *argv])
    assert err.startswith(f"usage: {prog} ")
    assert listed in err  # the help, not only the usage line
    assert err.rstrip().endswith(f"{prog}: error: the following arguments are required: {missing}")


def digest(capsys, *args: str) -> str:
    assert main(["config", "digest", *args]) == 0
    return capsys.readouterr().out.strip()


def test_config_digest(tmp_path, capsys, monkeypatch):
    for name in [k for k in os.environ if k.startswith("TEE_NODE_")]:
        monkeypatch.delenv(name)
    default = digest(capsys)
    assert re.fullmatch(r"[0-9a-f]{64}", default)
    assert digest(capsys) == default  # deterministic
    a = tmp_path / "a.toml"
    a.write_text('port = 9001\n[engine]\nkind = "echo"\n')
    b = tmp_path / "b.toml"
    b.write_text('port = 9002\nallow_plaintext = true\n[engine]\nkind = "echo"\n')
    da, db = digest(capsys, "--config", str(a)), digest(capsys, "--config", str(b))
    assert re.fullmatch(r"[0-9a-f]{64}", da) and re.fullmatch(r"[0-9a-f]{64}", db)
    assert len({default, da, db}) == 3
    assert digest(capsys, "--config", str(a)) == da
    monkeypatch.setenv("TEE_NODE_PORT", "9003")  # host-local: not measured
    assert digest(capsys, "--config", str(a)) == da
    monkeypatch.setenv("TEE_NODE_LIMITS__STREAM_COALESCE_MAX", "7")  # the environment is part of the config
    assert digest(capsys, "--config", str(a)) != da
    # the console script prints the same
    out = run_cli("config", "digest", "--config", str(b), env={k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")})
    assert out.returncode == 0 and out.stdout.strip() == db


def test_config_digest_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["config", "digest", "--config", str(tmp_path / "missing.toml")])


def test_config_from_args_flags_win(tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("TEE_NODE_")]:
        monkeypatch.delenv(name)
    toml = tmp_path / "c.toml"
    toml.write_text('port = 9100\nhost = "127.0.0.2"\n[engine]\nkind = "vllm"\n[limits]\nmax_in_flight = 5\n')
    parser = build_parser()

    config = config_from_args(parser.parse_args(["serve", "--config", str(toml)]))
    assert (config.port, config.host, config.engine.kind, config.limits.max_in_flight) == (9100, "127.0.0.2", "vllm", 5)

    monkeypatch.setenv("TEE_NODE_PORT", "9200")  # environment over the file
    config = config_from_args(parser.parse_args(["serve", "--config", str(toml)]))
    assert config.port == 9200

    args = parser.parse_args(["serve", "--config", str(toml), "--port", "9300", "--engine", "echo", "--model", "my/model"])
    config = config_from_args(args)  # flags over the environment and the file
    assert config.port == 9300
    assert config.engine.kind == "echo"
    assert [(m.name, m.source) for m in config.engine.models] == [("my/model", "my/model")]
    # what the flags do not name stays from the file
    assert (config.host, config.limits.max_in_flight) == ("127.0.0.2", 5)

    config = config_from_args(parser.parse_args(["serve", "--config", str(toml), "--port", "0"]))
    assert config.port == 0  # an explicit 0 is a flag too

    with pytest.raises(ValueError):
        config_from_args(parser.parse_args(["serve", "--config", str(toml), "--engine", "upstream"]))
    config = config_from_args(
        parser.parse_args(["serve", "--config", str(toml), "--engine", "upstream", "--upstream-url", "http://127.0.0.1:9"])
    )
    assert (config.engine.kind, config.engine.upstream_url) == ("upstream", "http://127.0.0.1:9")


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):  # reset: closed with us in its backlog
        return True
    writer.close()
    return False


async def test_sigterm_finishes_streams_and_refuses_new_connections():
    words = [f"word{i}" for i in range(40)]
    node = spawn_node(env={"TEE_NODE_ENGINE__ECHO_TOKEN_DELAY": "0.1"})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{node.url}/v1/nodes/lock", json={"model": MODEL}) as response:
                key = b64d((await response.json())["public_key"])
            outer, opener = envelope.seal_request(compact(chat_body(" ".join(words), stream=True)), key, MODEL, stream=True)
            async with session.post(f"{node.url}/v1/confidential/chat/completions", data=compact(outer)) as response:
                assert response.status == 200
                first = await response.content.readuntil(b"\n\n")
                node.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while not await _refused(node.port):
                    assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                    await asyncio.sleep(0.02)
                assert node.proc.poll() is None  # still serving the stream
                rest = await response.read()
        sse = SSE.parse(first + rest)
        chunks = [json.loads(opener.open_event(e)) for e in sse.events]
        receipt = opener.finish()
        assert receipt["events"] == len(words) + 1
        assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == " ".join(words)
        assert node.proc.wait(30) == 0
    except BaseException as exc:
        node.stop()
        raise AssertionError(f"{exc!r}\nnode log:\n{node.log()}") from exc
    finally:
        node.stop()
        node.log_path.unlink(missing_ok=True)


async def test_clients_hanging_up_mid_stream_leave_one_access_line_each_and_no_traceback():
    """A hang-up is normal traffic: one INFO access line (status 499), counted in
    `tee_node_requests_total`, never an ERROR or a traceback in the node's log."""
    clients = 24
    node = spawn_node(env={"TEE_NODE_ENGINE__ECHO_TOKEN_DELAY": "0.05"})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{node.url}/v1/nodes/lock", json={"model": MODEL}) as response:
                key = b64d((await response.json())["public_key"])

            async def hang_up_after_the_first_event() -> None:
                body = compact(chat_body(" ".join(f"w{i}" for i in range(400)), stream=True))
                outer, _ = envelope.seal_request(body, key, MODEL, stream=True)
                response = await session.post(f"{node.url}/v1/confidential/chat/completions", data=compact(outer))
                assert response.status == 200
                await response.content.readuntil(b"\n\n")
                response.close()  # drops the connection mid-stream

            await asyncio.gather(*(hang_up_after_the_first_event() for _ in range(clients)))
            deadline = time.monotonic() + 10
            while True:  # until the node has noticed every hang-up (on its next write)
                async with session.get(f"{node.url}/metrics") as response:
                    metrics = await response.text()
                gone = re.search(r'tee_node_requests_total\{route="/v1/confidential/chat/completions",status="499"\} (\S+)', metrics)
                if gone and float(gone.group(1)) == clients:
                    break
                assert time.monotonic() < deadline, metrics
                await asyncio.sleep(0.1)
    finally:
        node.stop()
    log = node.log()
    node.log_path.unlink(missing_ok=True)
    assert "Traceback" not in log and " ERROR " not in log and "ConnectionReset" not in log, log
    hung_up = [line for line in log.splitlines() if "route=/v1/confidential/chat/completions" in line]
    assert len(hung_up) == clients and all("status=499" in line for line in hung_up), log
