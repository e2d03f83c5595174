"""Attested TLS (docs/protocol.md): the node's in-memory key and self-signed certificate, its
hash bound into the attestation, the client's pinning, a man-in-the-middle refused before
anything is sent to it, `tee-node chat https://...`, and the real atoma-sdk over HTTPS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import ssl
import subprocess
from pathlib import Path

import pytest
from atoma import run_driver_lines
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError
from server_support import MODEL, SDK_MODEL, TEE_NODE, spawn_node

from attestation.errors import TlsCertificateMismatch
from node.cli import config_from_args, build_parser
from node.client import ConfidentialClient
from node.config import REPO_CONFIGS, load_config
from node.server.tls import TlsIdentity

TOKEN = "tls-test-token"
PROMPT = "pinned certificates keep llamas safe"


# --- the node's certificate -------------------------------------------------------------------


def test_identity_is_a_fresh_self_signed_p256_certificate_held_in_memory():
    before = set(os.listdir("/proc/self/fd"))
    identity = TlsIdentity.generate(["localhost", "127.0.0.1", "::1", "node.example"])
    # The memory file that carried the (encrypted) key into OpenSSL is closed again.
    assert set(os.listdir("/proc/self/fd")) <= before
    certificate = x509.load_der_x509_certificate(identity.certificate_der)
    assert identity.sha256 == hashlib.sha256(identity.certificate_der).digest()
    assert certificate.issuer == certificate.subject
    assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "node.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert identity.context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert TlsIdentity.generate(["localhost"]).sha256 != identity.sha256  # a new key every start


def test_tls_defaults_per_mode_and_the_serve_flag():
    assert not load_config(None).tls_enabled
    assert load_config(REPO_CONFIGS / "tdx-h100.toml").tls_enabled
    args = build_parser().parse_args(["serve", "--tls", "--engine", "echo"])
    assert config_from_args(args).tls_enabled


def test_plain_http_in_a_real_mode_only_on_loopback():
    with pytest.raises(ValidationError, match="plain HTTP is only for a TLS-terminating proxy inside the same TEE"):
        load_config(REPO_CONFIGS / "tdx-h100.toml", tls={"enabled": False})
    config = load_config(REPO_CONFIGS / "tdx-h100.toml", tls={"enabled": False}, host="127.0.0.1")
    assert not config.tls_enabled


# --- the client against a TLS node ------------------------------------------------------------


@pytest.fixture
async def tls_node(make_node, tmp_path):
    node = await make_node(tls={"enabled": True}, attestation={"state_dir": str(tmp_path)})
    node.url = str(node.client.server.make_url("")).rstrip("/")
    assert node.url.startswith("https://")
    return node


async def test_client_attests_pins_and_uses_the_certificate(tls_node):
    async with ConfidentialClient(tls_node.url, allow_simulated=True) as client:
        identity = await client.attest()
        assert identity.tls_cert_sha256 == tls_node.state.tls.sha256
        assert identity.tls_certificate == tls_node.state.tls.certificate_der
        assert identity.document["tls_cert_sha256"] == tls_node.state.tls.sha256.hex()
        reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
        assert reply.choices[0].message.content == PROMPT and reply.receipt is not None
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == PROMPT and stream.completed
        assert [m.id for m in (await client.models.list()).data] == [MODEL]
        assert client.attestations == 1


async def test_a_plain_http_node_has_no_certificate_in_its_attestation(make_node, tmp_path):
    node = await make_node(attestation={"state_dir": str(tmp_path)})
    url = str(node.client.server.make_url("")).rstrip("/")
    async with ConfidentialClient(url, allow_simulated=True) as client:
        identity = await client.attest()
    assert identity.tls_cert_sha256 is None and identity.document["tls_cert_sha256"] is None


class TlsProxy:
    """A loopback man-in-the-middle: it relays bytes to the node untouched (`intercept` off) or
    ends the client's TLS with a certificate of its own and reads everything (`intercept` on)."""

    def __init__(self, node_port: int) -> None:
        self.node_port = node_port
        self.identity = TlsIdentity.generate(["127.0.0.1"])
        self.intercept = True
        self.seen = bytearray()  # what the proxy could read of the client's traffic
        self.connections: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"https://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(writer)
        intercept = self.intercept
        try:
            if intercept:
                await writer.start_tls(self.identity.context)
            upstream_ssl = ssl._create_unverified_context() if intercept else None
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.node_port, ssl=upstream_ssl)
        except (ssl.SSLError, ConnectionError):
            writer.close()
            return
        self.connections.append(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while data := await src.read(65536):
                    if record:
                        self.seen += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, intercept), pipe(up_reader, writer, False))

    def drop_connections(self) -> None:
        for writer in self.connections:
            writer.close()
        self.connections.clear()

    async def close(self) -> None:
        self.drop_connections()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def proxy(tls_node):
    mitm = TlsProxy(tls_node.client.server.port)
    mitm.url = await mitm.start()
    yield mitm
    await mitm.close()


async def test_a_man_in_the_middle_is_refused_before_anything_is_sent(tls_node, proxy):
    async with ConfidentialClient(proxy.url, allow_simulated=True, api_key=TOKEN) as client:
        with pytest.raises(TlsCertificateMismatch) as info:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
    message = str(info.value)
    assert proxy.identity.sha256.hex() in message and tls_node.state.tls.sha256.hex() in message
    assert "man-in-the-middle" in message
    # The proxy read the attestation request, and nothing else: no token, no envelope.
    assert b"GET /v1/attestation?nonce=" in proxy.seen
    assert TOKEN.encode() not in proxy.seen and b"/v1/confidential" not in proxy.seen
    assert tls_node.state.keyring.current.replay_entries == 0


async def test_a_man_in_the_middle_after_pinning_is_refused(tls_node, proxy):
    proxy.intercept = False  # the first connection reaches the node untouched
    async with ConfidentialClient(proxy.url, allow_simulated=True, api_key=TOKEN) as client:
        identity = await client.attest()
        assert identity.tls_cert_sha256 == tls_node.state.tls.sha256
        proxy.intercept = True
        proxy.drop_connections()
        with pytest.raises(TlsCertificateMismatch):
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
        with pytest.raises(TlsCertificateMismatch):
            await client.models.list()
    assert TOKEN.encode() not in proxy.seen and b"/v1/confidential" not in proxy.seen
    assert tls_node.state.keyring.current.replay_entries == 0


async def test_a_restarted_node_is_attested_again(make_node, tmp_path):
    """A node with a new certificate (and new keys) behind the same URL: the pinned client sees
    another certificate, attests once more, and goes on with the new pin."""
    first = await make_node(tls={"enabled": True}, attestation={"state_dir": str(tmp_path)})
    second = await make_node(tls={"enabled": True}, attestation={"state_dir": str(tmp_path)})
    proxy = TlsProxy(first.client.server.port)
    proxy.intercept = False
    url = await proxy.start()
    try:
        async with ConfidentialClient(url, allow_simulated=True) as client:
            assert (await client.attest()).tls_cert_sha256 == first.state.tls.sha256
            proxy.node_port = second.client.server.port
            proxy.drop_connections()
            reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
            assert reply.choices[0].message.content == PROMPT
            assert client.attestation.tls_cert_sha256 == second.state.tls.sha256 and client.attestations == 2
    finally:
        await proxy.close()


# --- a real node process: tee-node chat https://..., and the real atoma-sdk ----------------------


@pytest.fixture(scope="module")
def tls_process():
    node = spawn_node(model=SDK_MODEL, extra_args=["--tls"])
    try:
        yield node
    finally:
        node.stop()
        node.log_path.unlink(missing_ok=True)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TEE_NODE), *args], capture_output=True, text=True, timeout=120)


def test_tee_node_chat_over_attested_tls(tls_process):
    assert tls_process.url.startswith("https://")
    out = run_cli("chat", tls_process.url, PROMPT, "--allow-simulated")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == PROMPT
    assert "TLS cert:      sha256 " in out.stderr and "(attested, pinned)" in out.stderr
    assert "receipt verified" in out.stderr
    assert "tls_cert_sha256=" in tls_process.log()


def test_the_ready_line_shows_the_scheme_the_node_serves(tls_process):
    (ready,) = [line for line in tls_process.log().splitlines() if " READY at " in line]
    assert f" READY at https://127.0.0.1:{tls_process.port} " in ready, ready


@pytest.fixture(scope="module")
def attested_pem(tls_process, tmp_path_factory) -> Path:
    pem = tmp_path_factory.mktemp("tls") / "node.pem"
    out = run_cli("attest", tls_process.url, "--allow-simulated", "--tls-cert-out", str(pem))
    assert out.returncode == 0, out.stderr
    sha256 = out.stdout.split("TLS cert:      sha256 ")[1].split()[0]
    der = ssl.PEM_cert_to_DER_cert(pem.read_text())
    assert hashlib.sha256(der).hexdigest() == sha256
    return pem


@pytest.mark.usefixtures("atoma_sdk")
@pytest.mark.parametrize("mode", [[], ["--stream"], ["--stream", "--async"]], ids=["unary", "stream", "stream-async"])
def test_atoma_sdk_over_https_trusting_the_attested_certificate(tls_process, attested_pem, mode):
    """The unmodified SDK given httpx clients that trust the attested certificate."""
    args = ["chat", "--url", tls_process.url, "--model", SDK_MODEL, "--prompt", PROMPT, "--ca-file", str(attested_pem)]
    result = run_driver_lines([*args, *mode])[-1]
    assert result["ok"] is True, result
    assert result["content"] == PROMPT


@pytest.mark.usefixtures("atoma_sdk")
def test_atoma_sdk_over_https_with_ssl_cert_file(tls_process, attested_pem):
    """The SDK exactly as users build it: httpx reads SSL_CERT_FILE."""
    args = ["chat", "--url", tls_process.url, "--model", SDK_MODEL, "--prompt", PROMPT]
    (result,) = run_driver_lines(args, env={"SSL_CERT_FILE": str(attested_pem)})
    assert result["ok"] is True, result
    assert result["content"] == PROMPT


@pytest.mark.usefixtures("atoma_sdk")
def test_atoma_sdk_refuses_https_it_was_not_told_to_trust(tls_process):
    args = ["chat", "--url", tls_process.url, "--model", SDK_MODEL, "--prompt", PROMPT]
    (result,) = run_driver_lines(args)
    assert result["ok"] is False and "CERTIFICATE_VERIFY_FAILED" in result["error"], result
