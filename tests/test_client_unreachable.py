"""A node the client cannot reach: the error names the URL (never its credentials) and the cause,
refused, DNS, TLS, timeout, or a URL without a scheme; `tee-node` prints it as one line."""

from __future__ import annotations

import asyncio
import socket
import types

import aiohttp
import pytest
from server_support import free_port

from node.cli import main
from node.client import APIConnectionError, APITimeoutError, ConfidentialClient
from node.client.transports import unreachable


async def attest_error(url: str, timeout: float = 10.0) -> APIConnectionError:
    async with ConfidentialClient(url, allow_simulated=True, timeout=timeout, max_retries=0) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.attest()
    return info.value


async def test_refused_names_the_url_and_says_refused() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    error = await attest_error(url)
    assert str(error) == f"could not reach the node at {url}: connection refused: is the node running and listening there?"
    assert (error.url, error.cause.split(":")[0]) == (url, "connection refused")


@pytest.mark.parametrize("given", ["127.0.0.1:8080", "localhost:8080"])
async def test_a_url_without_a_scheme_gets_a_suggestion(given: str) -> None:
    with pytest.raises(APIConnectionError) as info:  # refused as the client is made: nothing is sent
        ConfidentialClient(given, allow_simulated=True)
    assert str(info.value).endswith(f"not an http:// or https:// URL; did you mean http://{given}?")


async def test_another_scheme_is_refused_by_name() -> None:
    with pytest.raises(APIConnectionError) as info:
        ConfidentialClient("ftp://127.0.0.1/node", allow_simulated=True)
    assert info.value.cause == "the ftp:// scheme is not supported; use http:// or https://"


async def test_tls_to_a_plain_http_node_says_tls(node_process) -> None:
    url = node_process.url.replace("http://", "https://")
    error = await attest_error(url)
    assert error.url == url and error.cause.startswith("TLS: ")


async def test_a_node_that_never_answers_times_out_with_the_limit() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        error = await attest_error(f"http://127.0.0.1:{port}", timeout=0.5)
    assert isinstance(error, APITimeoutError)
    assert error.cause == "timed out: no answer within 0.5 s"


def test_dns_failures_say_dns_and_the_name() -> None:
    key = types.SimpleNamespace(host="node.invalid", port=80, ssl=True, is_ssl=False)
    exc = aiohttp.ClientConnectorDNSError(key, socket.gaierror(-2, "Name or service not known"))
    error = unreachable("http://node.invalid:8080", exc)
    assert str(error) == "could not reach the node at http://node.invalid:8080: DNS: the name 'node.invalid' does not resolve"


def test_credentials_in_the_url_are_never_shown() -> None:
    error = unreachable("http://alice:s3cret@127.0.0.1:9", aiohttp.ServerDisconnectedError())
    assert "s3cret" not in str(error) and "alice" not in str(error)
    assert error.url == "http://127.0.0.1:9"
    with pytest.raises(APIConnectionError) as info:
        ConfidentialClient("alice:s3cret@localhost:8080", allow_simulated=True)
    assert "s3cret" not in str(info.value)


def test_the_cli_prints_the_url_and_cause_on_one_line(capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["chat", url, "hello", "--allow-simulated"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: APIConnectionError: could not reach the node at {url}: connection refused: is the node running and listening there?\n"
