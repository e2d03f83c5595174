"""What the client sends, and where, before and after the node is trusted: no credential before
the attestation is verified and accepted (on http:// and https://), no redirect followed, no
attested-TLS document accepted over plain HTTP off loopback, and the client's own collateral
used instead of the document's. Every server here records what reached it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from cryptography.hazmat.primitives.serialization import Encoding
from server_support import MODEL, NodeTestServer, echo_config, echo_engine, wait_for

from attestation import binding
from attestation.appraisal import Policy
from attestation.document import DOCUMENT_VERSION
from attestation.errors import ChainInvalid, CollateralInvalid, PolicyRefused, ReportDataMismatch, TlsCertificateMismatch
from attestation.sevsnp import load_amd_certificates
from node.cli import main as cli_main
from node.client import ConfidentialClient, RedirectRefused, make_policy
from node.client.transports.direct import is_loopback
from node.server import create_app
from node.server.state import NODE

TOKEN = "trust-order-token"
TOKEN_SHA256 = hashlib.sha256(TOKEN.encode()).hexdigest()
PROMPT = "tokens travel only to attested nodes"
TESTDATA = Path(__file__).resolve().parent / "data"
TDX_QUOTE = (TESTDATA / "tdx" / "tdx_prod_quote_SPR_E4.dat").read_bytes()
SNP_REPORT = (TESTDATA / "sev-snp" / "attestation.bin").read_bytes()


def chat(content: str = PROMPT) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


class Recorder:
    """An innermost middleware noting every request the node received: method, path, Authorization."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.seen.append((request.method, request.path, request.headers.get("Authorization")))
        return await handler(request)


@pytest.fixture
def recorded_node(aiohttp_client, tmp_path):
    """`await recorded_node(**config_overrides)` -> (url, Recorder, app): an echo node that
    requires TOKEN and records what reached it."""

    async def start(**overrides: Any) -> tuple[str, Recorder, web.Application]:
        config = echo_config(auth={"api_token_sha256": [TOKEN_SHA256]}, attestation={"state_dir": str(tmp_path)}, **overrides)
        engine = echo_engine()
        app = create_app(config, engine)
        recorder = Recorder()
        app.middlewares.append(recorder.middleware)
        client = await aiohttp_client(NodeTestServer(app))
        await wait_for(lambda: engine.ready, what="engine ready")
        return str(client.server.make_url("")).rstrip("/"), recorder, app

    return start


# --- no credential before the attestation is verified and accepted ------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_the_token_goes_only_after_the_attestation_verified(recorded_node, tls):
    url, recorder, _ = await recorded_node(tls={"enabled": tls})
    assert url.startswith("https://" if tls else "http://")
    async with ConfidentialClient(url, allow_simulated=True, api_key=TOKEN) as client:
        # models.list() first: the client attests before it sends the token anywhere.
        assert [m.id for m in (await client.models.list()).data] == [MODEL]
        reply = await client.chat.completions.create(model=MODEL, messages=chat())
        assert reply.choices[0].message.content == PROMPT
    methods_paths = [(method, path) for method, path, _ in recorder.seen]
    assert methods_paths == [("GET", "/v1/attestation"), ("GET", "/v1/models"), ("POST", "/v1/confidential/chat/completions")]
    authorizations = [auth for _, _, auth in recorder.seen]
    assert authorizations == [None, f"Bearer {TOKEN}", f"Bearer {TOKEN}"]


async def test_a_refused_attestation_sends_no_token_at_all(recorded_node):
    url, recorder, _ = await recorded_node()
    async with ConfidentialClient(url, api_key=TOKEN) as client:  # the default policy refuses simulated nodes
        with pytest.raises(PolicyRefused):
            await client.models.list()
        with pytest.raises(PolicyRefused):
            await client.chat.completions.create(model=MODEL, messages=chat())
    assert [(method, path, auth) for method, path, auth in recorder.seen] == [("GET", "/v1/attestation", None)] * 2


async def test_re_attestation_carries_no_token_either(recorded_node):
    url, recorder, app = await recorded_node()
    async with ConfidentialClient(url, allow_simulated=True, api_key=TOKEN) as client:
        await client.chat.completions.create(model=MODEL, messages=chat())
        app[NODE].keyring.rotate()
        app[NODE].keyring.rotate()  # the pinned key is gone: STALE_NODE_KEY, then a fresh attestation
        await client.chat.completions.create(model=MODEL, messages=chat())
        assert client.attestations == 2
    attestations = [auth for method, path, auth in recorder.seen if path == "/v1/attestation"]
    assert attestations == [None, None]
    assert all(auth == f"Bearer {TOKEN}" for _, path, auth in recorder.seen if path != "/v1/attestation")


# --- no redirects ------------------------------------------------------------------------------


class Elsewhere:
    """A server a redirect points to: it must never be reached."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.Response:
        self.seen.append(f"{request.method} {request.path_qs} {request.headers.get('Authorization')}")
        return web.json_response({"error": {"code": "NOT_FOUND", "message": "x"}}, status=404)


class RedirectingFront:
    """Forwards to the node, except the requests `redirect(method, path)` chooses, which it answers
    with a 307 to `target` (307 keeps the method and body: the worst case to follow)."""

    def __init__(self, node_url: str, target: str, redirect: Any) -> None:
        self.node_url, self.target, self.redirect = node_url, target, redirect
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.StreamResponse:
        if self.redirect(request.method, request.path):
            raise web.HTTPTemporaryRedirect(self.target + request.path_qs)
        async with aiohttp.ClientSession() as session:
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type", "accept")}
            async with session.request(request.method, self.node_url + request.path_qs, data=await request.read(), headers=headers) as up:
                return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)


async def _serve(aiohttp_server, app: web.Application) -> str:
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize(
    "redirected, stream",
    [("/v1/attestation", False), ("/v1/models", False), ("/v1/confidential/chat/completions", False),
     ("/v1/confidential/chat/completions", True)],
    ids=["attestation", "models", "chat", "chat-stream"],
)
async def test_no_redirect_is_followed(recorded_node, aiohttp_server, redirected, stream):
    node_url, recorder, _ = await recorded_node()
    elsewhere = Elsewhere()
    target = await _serve(aiohttp_server, elsewhere.app)
    front = RedirectingFront(node_url, target, lambda method, path: path == redirected)
    front_url = await _serve(aiohttp_server, front.app)
    async with ConfidentialClient(front_url, allow_simulated=True, api_key=TOKEN) as client:
        with pytest.raises(RedirectRefused) as info:
            await client.models.list()
            await client.chat.completions.create(model=MODEL, messages=chat(), stream=stream)
    assert elsewhere.seen == []  # nothing, the token least of all, went to the new location
    assert info.value.status == 307 and info.value.location.startswith(target + redirected)
    message = str(info.value)
    assert f"at {front_url}: HTTP 307 to {target}{redirected}" in message and "follows no redirects" in message
    assert TOKEN not in message
    assert all(path != redirected for _, path, _ in recorder.seen)  # the front answered it, the node never saw it


# --- an attested-TLS document over plain HTTP ----------------------------------------------------


class PlainFront:
    """A TLS-terminating front: plain HTTP in, the attested-TLS node behind it (certificate unchecked)."""

    def __init__(self, node_url: str) -> None:
        self.node_url = node_url
        self.seen: list[str] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.Response:
        self.seen.append(f"{request.method} {request.path} {request.headers.get('Authorization')}")
        async with aiohttp.ClientSession() as session:
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type", "accept")}
            async with session.request(
                request.method, self.node_url + request.path_qs, data=await request.read(), headers=headers, ssl=False
            ) as up:
                return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)


class NameToLoopback(AbstractResolver):
    """Resolves every name to 127.0.0.1: a client that believes it talks to node.example."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


async def test_an_attested_tls_document_over_plain_http_is_refused_off_loopback(recorded_node, aiohttp_server):
    node_url, recorder, app = await recorded_node(tls={"enabled": True})
    front = PlainFront(node_url)
    front_url = await _serve(aiohttp_server, front.app)
    port = front_url.rsplit(":", 1)[1]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=NameToLoopback()))
    try:
        async with ConfidentialClient(f"http://node.example:{port}", allow_simulated=True, api_key=TOKEN, session=session) as client:
            with pytest.raises(TlsCertificateMismatch) as info:
                await client.chat.completions.create(model=MODEL, messages=chat())
    finally:
        await session.close()
    message = str(info.value)
    assert app[NODE].tls.sha256.hex() in message
    assert "plain http://" in message and f"use https://node.example:{port}" in message
    assert front.seen == ["GET /v1/attestation None"]  # nothing after the document
    # On loopback (a TLS-terminating proxy on the same machine) the same document is accepted.
    async with ConfidentialClient(front_url, allow_simulated=True, api_key=TOKEN) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=chat())
        assert reply.choices[0].message.content == PROMPT
        assert client.attestation.tls_cert_sha256 is None  # no certificate was pinned: none was presented


@pytest.mark.parametrize("host", ["127.0.0.2", "localhost", "[::1]"])
def test_loopback_hosts(host):
    assert is_loopback(urlsplit(f"http://{host}:8080").hostname)


@pytest.mark.parametrize("host", ["node.example", "10.0.0.1", "128.0.0.1", "[::2]", "localhost.example"])
def test_not_loopback_hosts(host):
    assert not is_loopback(urlsplit(f"http://{host}:8080").hostname)


# --- the client's own collateral -----------------------------------------------------------------


class RealEvidenceNode:
    """Serves a document around real vendor evidence (a TDX quote or an SNP report) whose
    document-level binding holds for the client's nonce; the evidence's own REPORTDATA cannot,
    so a client gets as far as the quote's signatures and collateral, then refuses the binding."""

    def __init__(self, tee: str, evidence: bytes, certificates: str | None = None) -> None:
        self.tee, self.evidence, self.certificates = tee, evidence, certificates
        self.seen: list[str] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.Response:
        self.seen.append(f"{request.method} {request.path}")
        if request.path != "/v1/attestation":
            return web.json_response({"error": {"code": "NOT_FOUND", "message": "x"}}, status=404)
        nonce = bytes.fromhex(request.query["nonce"])
        measured: dict[str, Any] = {"tee_mode": self.tee}
        keys = {"dh_public_key": b"\x01" * 32, "signing_public_key": b"\x02" * 32}
        public_keys = binding.empty_public_keys()
        report_data = binding.report_data(
            nonce=nonce, key_epoch=1, config_digest=binding.config_digest(measured), gpu_evidence=[],
            kem_public_key=None, tls_cert_sha256=None, public_keys=public_keys, workers=None, **keys,
        )
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        return web.json_response({
            "version": DOCUMENT_VERSION, "tee": self.tee, "simulated": False, "nonce": nonce.hex(),
            "dh_public_key": b64(keys["dh_public_key"]), "signing_public_key": b64(keys["signing_public_key"]),
            "key_epoch": 1, "config_digest": binding.config_digest(measured).hex(), "report_data": report_data.hex(),
            "cpu_evidence": {"format": "tdx-quote" if self.tee == "tdx" else "sev-snp-report", "quote": b64(self.evidence),
                             "certificates": self.certificates},
            "gpu_evidence": [], "kem_public_key": None, "tls_cert_sha256": None, "measured_config": measured,
            "collateral": {"intel": None, "amd": None, "nvidia": None},
            "release_bundle": None, "public_keys": public_keys, "workers": None,
        })


async def test_the_clients_intel_collateral_replaces_the_documents(aiohttp_server):
    node = RealEvidenceNode("tdx", TDX_QUOTE)
    url = await _serve(aiohttp_server, node.app)
    # Without collateral the quote verifies to Intel's root and the binding is what fails.
    async with ConfidentialClient(url) as client:
        with pytest.raises(ReportDataMismatch, match="evidence's REPORTDATA"):
            await client.attest()
    # With the client's collateral (Intel's sample, signed by a TCB Signing certificate that
    # expired in 2025) the quote's verification reads it, though the document carries none.
    async with ConfidentialClient(url, collateral=TESTDATA / "tdx") as client:
        with pytest.raises(ChainInvalid, match="Intel SGX TCB Signing"):
            await client.attest()
    assert node.seen == ["GET /v1/attestation", "GET /v1/attestation"]


async def test_the_clients_amd_collateral_supplies_the_vcek(aiohttp_server, tmp_path):
    node = RealEvidenceNode("sev-snp", SNP_REPORT)  # the document carries no certificates at all
    url = await _serve(aiohttp_server, node.app)
    async with ConfidentialClient(url) as client:
        with pytest.raises(ChainInvalid, match="VCEK"):
            await client.attest()
    vcek = load_amd_certificates((TESTDATA / "sev-snp" / "vcek.testcer").read_bytes())[0]
    (tmp_path / "vcek.der").write_bytes(vcek.public_bytes(Encoding.DER))
    (tmp_path / "amd_cert_chain.pem").write_bytes(
        b"".join(c.public_bytes(Encoding.PEM) for c in load_amd_certificates((TESTDATA / "sev-snp" / "milan.testcer").read_bytes()))
    )
    # With the client's VCEK and chain the report's signature verifies; only the binding fails.
    async with ConfidentialClient(url, collateral=tmp_path) as client:
        with pytest.raises(ReportDataMismatch, match="evidence's REPORTDATA"):
            await client.attest()


def test_a_collateral_directory_must_hold_collateral(tmp_path):
    with pytest.raises(CollateralInvalid, match="does not exist"):
        ConfidentialClient("http://127.0.0.1:1", collateral=tmp_path / "missing")
    with pytest.raises(CollateralInvalid, match="holds none of the files"):
        ConfidentialClient("http://127.0.0.1:1", collateral=tmp_path)
    client = ConfidentialClient("http://127.0.0.1:1", collateral=TESTDATA / "tdx", allow_simulated=True)
    assert client.policy.collateral.intel is not None and client.policy.collateral.amd is None
    assert client.policy.allow_simulated


async def test_attest_and_chat_take_collateral_on_the_command_line(aiohttp_server, capsys, tmp_path):
    node = RealEvidenceNode("tdx", TDX_QUOTE)
    url = await _serve(aiohttp_server, node.app)
    # The CLI's synchronous client runs in a thread while this loop serves the node.
    for command in (["attest", url], ["chat", url, "hello"]):
        code = await asyncio.to_thread(cli_main, [*command, "--collateral", str(TESTDATA / "tdx")])
        err = capsys.readouterr().err
        assert code == 1 and "error: ChainInvalid:" in err and "Intel SGX TCB Signing" in err
    code = await asyncio.to_thread(cli_main, ["attest", url, "--collateral", str(tmp_path)])
    assert code == 1 and f"error: collateral directory {tmp_path} holds none of the files" in capsys.readouterr().err
    assert node.seen == ["GET /v1/attestation", "GET /v1/attestation"]  # the empty directory stopped the third


# --- pins and the post-quantum requirement from the command line ---------------------------------


async def _cli(*argv: str) -> int:
    return await asyncio.to_thread(cli_main, list(argv))


async def test_pin_pins_registers_by_the_policy_files_names(recorded_node, capsys):
    url, _, _ = await recorded_node()
    assert await _cli("attest", url, "--allow-simulated", "--json") == 0
    cpu = json.loads(capsys.readouterr().out)["claims"]["cpu"]
    registers = {"mr_td": cpu["mr_td"], **{f"rtmr{i}": cpu["rtmrs"][i] for i in range(4)}}
    pins = [arg for name, value in registers.items() for arg in ("--pin", f"{name}={value}")]
    assert await _cli("attest", url, "--allow-simulated", *pins) == 0
    assert await _cli("chat", url, "pinned hello", "--allow-simulated", "--api-key", TOKEN, *pins) == 0
    assert capsys.readouterr().out.endswith("pinned hello\n")
    # A second value for a register widens that register's allow list; another value refuses the node.
    other = "ab" * 48
    assert await _cli("attest", url, "--allow-simulated", *pins, "--pin", f"rtmr2={other}") == 0
    capsys.readouterr()
    assert await _cli("attest", url, "--allow-simulated", "--pin", f"RTMR2={other}") == 1
    err = capsys.readouterr().err
    assert "PolicyRefused" in err and f"rtmr2 differs from policy: the node reports {registers['rtmr2']}" in err
    # --measurement still pins MRTD alone.
    assert await _cli("attest", url, "--allow-simulated", "--measurement", other) == 1
    assert "mr_td differs from policy" in capsys.readouterr().err
    assert await _cli("attest", url, "--allow-simulated", "--pin", f"rtmr9={other}") == 1
    assert "error: no register named 'rtmr9' to pin: use one of mr_td, rtmr0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        await _cli("attest", url, "--allow-simulated", "--pin", "rtmr1")
    assert "expected NAME=HEX" in capsys.readouterr().err


@pytest.fixture
def classical_documents(monkeypatch):
    """Nodes whose attestation documents offer no ML-KEM key (X25519 alone)."""
    import node.server.attestation as serving_attestation

    build = serving_attestation.build_document
    monkeypatch.setattr(serving_attestation, "build_document", lambda *a, **kw: build(*a, **{**kw, "kem_public_key": None}))


async def test_a_node_without_ml_kem_is_refused_unless_classical_is_allowed(recorded_node, classical_documents, capsys):
    url, recorder, _ = await recorded_node()
    async with ConfidentialClient(url, allow_simulated=True, api_key=TOKEN) as client:
        with pytest.raises(PolicyRefused, match="kem_public_key is missing"):
            await client.chat.completions.create(model=MODEL, messages=chat())
    assert await _cli("chat", url, "hello", "--allow-simulated", "--api-key", TOKEN) == 1
    assert "--allow-classical" in capsys.readouterr().err
    assert all(auth is None for _, _, auth in recorder.seen)  # refused: nothing authorised was sent
    async with ConfidentialClient(url, allow_simulated=True, api_key=TOKEN, allow_classical=True) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=chat())
        assert reply.choices[0].message.content == PROMPT
        assert client.key_exchange == "X25519 (the attested node offers no ML-KEM key)"
    assert await _cli("chat", url, "classical hello", "--allow-simulated", "--allow-classical", "--api-key", TOKEN) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("classical hello\n") and "key exchange:  X25519" in captured.err
    assert await _cli("attest", url, "--allow-simulated", "--allow-classical") == 0


def test_make_policy_puts_the_shortcuts_on_top_of_a_policy(tmp_path):
    base = Policy(allow_simulated=True, require_gpu=True)
    built = make_policy(base, expected_measurements="aa" * 48, pins={"rtmr1": ["bb" * 48, "cc" * 48]}, allowed_tee="tdx",
                        allow_classical=True, collateral=TESTDATA / "tdx")
    assert built.allow_simulated and built.require_gpu and not built.require_post_quantum
    assert built.tdx.mr_td == {"aa" * 48} and built.sev_snp.measurement == {"aa" * 48}
    assert built.tdx.rtmr1 == {"bb" * 48, "cc" * 48} and not built.tdx.rtmr0
    assert built.allowed_tees == {"tdx"} and built.collateral is not None
    assert make_policy().require_post_quantum and not make_policy().allow_simulated  # default-deny stays the default
    (tmp_path / "policy.toml").write_text("allow_simulated = true\n")
    assert make_policy(tmp_path / "policy.toml", allow_classical=True).allow_simulated
