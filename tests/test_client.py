"""node.client end to end against the node with the echo engine on a real loopback port.

The node runs in-process (aiohttp TestServer) on its own event loop in a thread, so that the
async client (on pytest's loop) and the sync client (on its own thread) both reach it over
TCP, and the tests can act on the node (rotate keys, hold admission slots) on its loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from attestation.appraisal import Policy
from attestation.errors import PolicyRefused
from node.cli import main as cli_main
from node.client import (
    ChatCompletion,
    ChatCompletionChunk,
    Client,
    Completion,
    ConfidentialClient,
    CreateEmbeddingResponse,
    InternalServerError,
    ModelNotFoundError,
    NodeAPIError,
    OverloadedError,
    PaddingMissing,
    UnauthorizedError,
)
from node.client.errors import ERRORS_BY_CODE, error_from_body
from node.config import NodeConfig, load_config, merge_settings
from node.engine.base import ModelCard
from node.engine.echo import EchoEngine
from node import envelope
from node.errors import NODE_ERRORS
from node.server import create_app
from node.server.state import NODE

MODEL = "echo-model"
TASKS = frozenset({"chat", "completions", "embeddings"})
PROMPT = "the quick brown fox jumps over the lazy dog"
SECRET_PROMPT = "my-secret-prompt-words zebra"


# --- a node (and other servers) on a loop in a thread ------------------------------------


def node_config(tmp_path, **overrides: Any) -> NodeConfig:
    base = {
        "engine": {"kind": "echo", "models": [{"name": MODEL, "source": "echo"}]},
        # One event per engine chunk: these tests check per-event protocol properties (the
        # node's default coalesces chunks a slow stream has queued; tests/test_coalesce.py).
        "limits": {"stream_coalesce_max": 1},
        "attestation": {"state_dir": str(tmp_path / "attestation")},
    }
    return load_config(**merge_settings(base, overrides))


class ServerThread:
    """An event loop in a daemon thread hosting TestServers (real loopback ports)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-servers")
        self._thread.start()
        self._servers: list[TestServer] = []

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a plain function on the servers' loop (the node's state is not thread-safe)."""

        async def go() -> Any:
            return fn(*args)

        return self.run(go())

    def serve(self, app: web.Application) -> str:
        async def start() -> TestServer:
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            return server

        server = self.run(start())
        self._servers.append(server)
        return str(server.make_url("")).rstrip("/")

    def stop(self) -> None:
        for server in reversed(self._servers):
            self.run(server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class RunningNode:
    def __init__(self, servers: ServerThread, app: web.Application, engine: EchoEngine, url: str) -> None:
        self.servers = servers
        self.app = app
        self.engine = engine
        self.url = url

    @property
    def state(self):
        return self.app[NODE]

    def rotate(self) -> int:
        return self.servers.call(lambda: self.state.keyring.rotate().epoch)

    def confidential_requests(self) -> int:
        """Requests the node decrypted and accepted, under every key it still holds."""
        return self.servers.call(lambda: sum(k.replay_entries for k in self.state.keyring.live_keys()))


@pytest.fixture
def servers():
    threads = ServerThread()
    yield threads
    threads.stop()


@pytest.fixture
def start_node(servers, tmp_path):
    def start(engine: EchoEngine | None = None, **overrides: Any) -> RunningNode:
        engine = engine or EchoEngine([ModelCard(MODEL, TASKS)])
        app = create_app(node_config(tmp_path, **overrides), engine)
        url = servers.serve(app)
        servers.run(_until(lambda: engine.ready))
        return RunningNode(servers, app, engine, url)

    return start


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


@pytest.fixture
def node(start_node) -> RunningNode:
    return start_node()


def chat_messages(text: str = PROMPT) -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


# --- async client ---------------------------------------------------------------------------


async def test_chat_non_streaming_verified(node):
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        response = await client.chat.completions.create(model=MODEL, messages=chat_messages(), max_tokens=100)
        assert isinstance(response, ChatCompletion)
        assert response.choices[0].message.content == PROMPT
        assert response.choices[0].message.role == "assistant"
        assert response.choices[0].finish_reason == "stop"
        assert response.usage.completion_tokens == len(PROMPT.split())
        identity = client.attestation
        assert identity is not None and identity.simulated and identity.tee == "simulated"
        assert identity.key_epoch == node.state.keyring.current.epoch
        assert identity.signing_public_key == node.state.signer.public_key
        assert identity.dh_public_key == node.state.keyring.current.public_key
        receipt = response.receipt
        assert receipt.events == 1 and receipt.model == MODEL and receipt.key_epoch == identity.key_epoch
        assert receipt.usage.completion_tokens == 16  # the receipt signs the clear usage: bucketed by default
        assert response.attestation is identity
        assert client.attestations == 1


async def test_chat_streaming_verified(node):
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=chat_messages(), stream=True)
        chunks = [chunk async for chunk in stream]
        assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == PROMPT
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(PROMPT.split())
        assert stream.completed
        assert stream.receipt.events == len(chunks)
        assert stream.usage.total_tokens == 20 and stream.receipt.usage.total_tokens == 32  # 11 + 9, in clear 16 + 16
        assert stream.attestation.key_epoch == stream.receipt.key_epoch


async def test_completions_streaming_and_not(node):
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        response = await client.completions.create(model=MODEL, prompt="one two three", max_tokens=2)
        assert isinstance(response, Completion)
        assert response.choices[0].text == "one two"
        assert response.choices[0].finish_reason == "length"
        assert response.receipt.events == 1
        stream = await client.completions.create(model=MODEL, prompt="one two three", stream=True)
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == "one two three"
        assert stream.receipt.events == len(chunks) == 4
        assert client.attestations == 1  # one attestation serves every request of the epoch


async def test_embeddings(node):
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        response = await client.embeddings.create(model=MODEL, input=["alpha beta", "gamma"])
        assert isinstance(response, CreateEmbeddingResponse)
        assert [d.index for d in response.data] == [0, 1]
        assert len(response.data[0].embedding) == 16
        assert response.usage.prompt_tokens == 3
        assert response.receipt.events == 1


async def test_models_list(node):
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]


# --- sync client ----------------------------------------------------------------------------


def test_sync_client_all_endpoints(node):
    with Client(node.url, allow_simulated=True) as client:
        response = client.chat.completions.create(model=MODEL, messages=chat_messages())
        assert response.choices[0].message.content == PROMPT
        assert response.receipt.events == 1
        stream = client.chat.completions.create(model=MODEL, messages=chat_messages("a b c"), stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "a b c"
        assert stream.completed and stream.receipt.events == 4
        completion = client.completions.create(model=MODEL, prompt="x y")
        assert completion.choices[0].text == "x y"
        streamed = list(client.completions.create(model=MODEL, prompt="x y", stream=True))
        assert "".join(c.choices[0].text for c in streamed if c.choices) == "x y"
        embeddings = client.embeddings.create(model=MODEL, input="hello")
        assert len(embeddings.data) == 1
        assert client.models.list().data[0].id == MODEL
        assert client.attestation.simulated
        assert node.confidential_requests() == 5


# --- docs/protocol.md: hybrid key agreement and length hiding ------------------------------


class Tap:
    """Records what the node decoded and opened (the real envelope functions still do the work)."""

    def __init__(self, monkeypatch) -> None:
        self.kem_ciphertexts: list[bytes | None] = []
        self.plaintext_sizes: list[int] = []
        self.paddings: list[bool] = []
        decode, open_, take = envelope.decode_request, envelope.open_request, envelope.take_obfuscation

        def decode_request(request):
            decoded = decode(request)
            self.kem_ciphertexts.append(decoded.kem_ciphertext)
            return decoded

        def open_request(decoded, keyring, signer):
            opened = open_(decoded, keyring, signer)
            self.plaintext_sizes.append(len(opened.plaintext))
            return opened

        def take_obfuscation(payload):
            self.paddings.append(take(payload))
            return self.paddings[-1]

        monkeypatch.setattr(envelope, "decode_request", decode_request)
        monkeypatch.setattr(envelope, "open_request", open_request)
        monkeypatch.setattr(envelope, "take_obfuscation", take_obfuscation)


async def test_client_uses_the_hybrid_and_pads_by_default(node, monkeypatch):
    tap = Tap(monkeypatch)
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        assert client.key_exchange is None  # nothing attested yet
        response = await client.chat.completions.create(model=MODEL, messages=chat_messages())
        stream = await client.chat.completions.create(model=MODEL, messages=chat_messages("a b"), stream=True)
        assert [c async for c in stream]
        embeddings = await client.embeddings.create(model=MODEL, input="hello")
        assert client.attestation.kem_public_key == node.state.keyring.current.kem_public_key
        assert client.key_exchange == "hybrid ML-KEM-768 + X25519"
    assert response.choices[0].message.content == PROMPT and len(embeddings.data) == 1
    assert "obfuscation" not in response.model_dump()  # the padding is taken off before the caller sees it
    assert len(tap.kem_ciphertexts) == 3 and all(ct is not None and len(ct) == 1088 for ct in tap.kem_ciphertexts)
    assert all(size >= 512 and size & (size - 1) == 0 for size in tap.plaintext_sizes)  # padded requests
    assert tap.paddings == [True, True, True]  # and padded answers, which the client checked


async def test_client_takes_the_ml_kem_key_only_from_the_attestation(start_node, monkeypatch):
    """A node whose attestation document offers no ML-KEM key is refused by default; a client that
    accepts classical key agreement sends it X25519 requests, even though its lock body
    (unattested) names an ML-KEM key."""
    import node.server.attestation as serving_attestation

    build = serving_attestation.build_document
    monkeypatch.setattr(serving_attestation, "build_document", lambda *a, **kw: build(*a, **{**kw, "kem_public_key": None}))
    tap = Tap(monkeypatch)
    node = start_node()
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        with pytest.raises(PolicyRefused, match="kem_public_key is missing"):
            await client.chat.completions.create(model=MODEL, messages=chat_messages("classic"))
    classical = Policy(allow_simulated=True, require_post_quantum=False)
    async with ConfidentialClient(node.url, policy=classical) as client:
        response = await client.chat.completions.create(model=MODEL, messages=chat_messages("classic"))
        assert response.choices[0].message.content == "classic"
        assert client.attestation.kem_public_key is None
        assert client.key_exchange == "X25519 (the attested node offers no ML-KEM key)"
    assert tap.kem_ciphertexts == [None]


async def test_client_post_quantum_and_length_hiding_can_be_turned_off(node, monkeypatch):
    tap = Tap(monkeypatch)
    async with ConfidentialClient(node.url, allow_simulated=True, post_quantum=False, length_hiding=False) as client:
        response = await client.chat.completions.create(model=MODEL, messages=chat_messages("plain sizes"))
        stream = await client.chat.completions.create(model=MODEL, messages=chat_messages("x y"), stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in [c async for c in stream] if c.choices) == "x y"
        assert client.key_exchange == "X25519 (post_quantum off)"
    assert response.choices[0].message.content == "plain sizes"
    assert tap.kem_ciphertexts == [None, None]
    assert tap.paddings == [False, False]  # the client asked the node not to pad
    assert not any(size & (size - 1) == 0 and size >= 512 for size in tap.plaintext_sizes)


async def test_client_refuses_answers_that_are_not_padded(node, monkeypatch):
    def leaky(payload):  # a node that does not pad: lengths go through, and the client notices
        payload.pop("obfuscation", None)
        return False

    monkeypatch.setattr(envelope, "take_obfuscation", leaky)
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        with pytest.raises(PaddingMissing):
            await client.chat.completions.create(model=MODEL, messages=chat_messages("leaky"))
        stream = await client.chat.completions.create(model=MODEL, messages=chat_messages("leaky"), stream=True)
        with pytest.raises(PaddingMissing):
            [c async for c in stream]


async def test_client_uses_the_new_attested_ml_kem_key_after_rotation(node, monkeypatch):
    tap = Tap(monkeypatch)
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        await client.chat.completions.create(model=MODEL, messages=chat_messages("before"))
        first = client.attestation.kem_public_key
        node.rotate(), node.rotate()
        response = await client.chat.completions.create(model=MODEL, messages=chat_messages("after"))
        assert response.choices[0].message.content == "after"
        assert client.attestation.kem_public_key == node.state.keyring.current.kem_public_key != first
    # Three requests reached the node: the first, the one refused as stale, its re-sealed retry.
    assert len(tap.kem_ciphertexts) == 3 and all(tap.kem_ciphertexts)


async def test_client_skips_the_fillers_of_a_cadenced_stream(start_node):
    # The first token comes 50 ms in; the cadence ticks every 10 ms: fillers go first.
    node = start_node(EchoEngine([ModelCard(MODEL, TASKS)], token_delay=0.05), limits={"stream_cadence_ms": 10})
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=chat_messages("one two three"), stream=True)
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert all(c.choices or c.usage for c in chunks)  # no empty filler reached the caller
    assert stream.receipt.events > len(chunks)  # but the node sent (and the client verified) them


# --- re-attestation, backoff, refusal ---------------------------------------------------------


async def test_reattests_when_key_rotated_away(node):
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        await client.chat.completions.create(model=MODEL, messages=chat_messages("before"))
        first = client.attestation
        assert node.rotate() == first.key_epoch + 1
        assert node.rotate() == first.key_epoch + 2  # the pinned key is no longer live: 422
        response = await client.chat.completions.create(model=MODEL, messages=chat_messages("after rotation"))
        assert response.choices[0].message.content == "after rotation"
        assert client.attestations == 2
        assert client.attestation.key_epoch == first.key_epoch + 2
        assert client.attestation.dh_public_key != first.dh_public_key
        assert response.receipt.key_epoch == first.key_epoch + 2
        # and a stream after a further rotation pair
        node.rotate(), node.rotate()
        stream = await client.chat.completions.create(model=MODEL, messages=chat_messages("s t"), stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in [c async for c in stream] if c.choices) == "s t"
        assert client.attestations == 3


async def test_overlap_key_still_accepted_without_reattestation(node):
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        await client.attest()
        node.rotate()  # the previous key stays live during the overlap
        response = await client.chat.completions.create(model=MODEL, messages=chat_messages("x"))
        assert response.choices[0].message.content == "x"
        assert client.attestations == 1


async def test_429_backoff_honours_retry_after(start_node):
    node = start_node(limits={"max_in_flight": 1, "max_queue": 0, "retry_after": 7})
    admission = node.state.admission
    node.servers.run(admission.acquire())  # the only slot is taken: the next request gets 429
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        node.servers.call(admission.release)

    async with ConfidentialClient(node.url, allow_simulated=True, max_retries=3) as client:
        client._sleep = fake_sleep
        response = await client.chat.completions.create(model=MODEL, messages=chat_messages("after backoff"))
        assert response.choices[0].message.content == "after backoff"
    assert waits == [7]


async def test_429_retries_are_bounded(start_node):
    node = start_node(limits={"max_in_flight": 1, "max_queue": 0, "retry_after": 3})
    node.servers.run(node.state.admission.acquire())
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    async with ConfidentialClient(node.url, allow_simulated=True, max_retries=2, max_retry_wait=2.5) as client:
        client._sleep = fake_sleep
        with pytest.raises(OverloadedError) as info:
            await client.chat.completions.create(model=MODEL, messages=chat_messages())
    assert waits == [2.5, 2.5]  # Retry-After 3, capped by max_retry_wait, twice, then the error
    assert info.value.status == 429 and info.value.code == "OVERLOADED" and info.value.retry_after == 3


async def test_refuses_simulated_node_without_allow_simulated(node):
    async with ConfidentialClient(node.url) as client:
        with pytest.raises(PolicyRefused, match="tee is simulated"):
            await client.chat.completions.create(model=MODEL, messages=chat_messages(SECRET_PROMPT))
        with pytest.raises(PolicyRefused, match="tee is simulated"):
            await client.chat.completions.create(model=MODEL, messages=chat_messages(SECRET_PROMPT), stream=True)
        assert client.attestation is None
    assert node.confidential_requests() == 0  # nothing was sent


async def test_policy_measurement_and_tee_allow_lists(node):
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        measurement = (await client.attest()).measurement
    async with ConfidentialClient(node.url, allow_simulated=True, expected_measurements=[measurement.upper()]) as client:
        response = await client.chat.completions.create(model=MODEL, messages=chat_messages("ok"))
        assert response.choices[0].message.content == "ok"
    async with ConfidentialClient(node.url, allow_simulated=True, expected_measurements=["00" * 48]) as client:
        with pytest.raises(PolicyRefused, match="mr_td differs from policy"):
            await client.chat.completions.create(model=MODEL, messages=chat_messages(SECRET_PROMPT))
    from attestation.appraisal import Policy

    # The shortcuts apply on top of a given policy (as the command line's flags on top of --policy).
    async with ConfidentialClient(node.url, policy=Policy(), allow_simulated=True, expected_measurements=measurement) as client:
        assert client.policy.allow_simulated and client.policy.tdx.mr_td == {measurement}
        await client.attest()
    async with ConfidentialClient(node.url, policy=Policy(allowed_tees=frozenset({"tdx"}))) as client:
        with pytest.raises(PolicyRefused, match="tee is simulated"):
            await client.attest()
    assert node.confidential_requests() == 1


# --- typed errors ---------------------------------------------------------------------------


async def test_error_event_in_stream_raises_typed_error(start_node):
    node = start_node(engine=EchoEngine([ModelCard(MODEL, TASKS)], fail_after_tokens=2))
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=chat_messages("w1 w2 w3 w4"), stream=True)
        got: list[str] = []
        with pytest.raises(InternalServerError) as info:
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content)
        assert got == ["w1", " w2"]
        assert info.value.code == "INTERNAL_ERROR"
        assert not stream.completed and stream.receipt is None


async def test_model_not_found_and_unauthorized_are_typed(start_node):
    token = "s3cret-token"
    node = start_node(auth={"api_token_sha256": [hashlib.sha256(token.encode()).hexdigest()]})
    async with ConfidentialClient(node.url, allow_simulated=True, api_key=token) as client:
        with pytest.raises(ModelNotFoundError) as info:
            await client.chat.completions.create(model="no-such-model", messages=chat_messages(SECRET_PROMPT))
        assert info.value.status == 404 and info.value.code == "MODEL_NOT_FOUND"
        assert SECRET_PROMPT not in str(info.value) and SECRET_PROMPT not in repr(info.value.args)
    async with ConfidentialClient(node.url, allow_simulated=True, api_key="wrong") as client:
        with pytest.raises(UnauthorizedError) as unauthorized:
            await client.chat.completions.create(model=MODEL, messages=chat_messages(SECRET_PROMPT))
        assert unauthorized.value.status == 401
    assert node.confidential_requests() == 1  # the unknown-model request was decrypted, then refused


def test_every_node_error_code_has_a_client_class():
    codes = {cls.code for cls in NODE_ERRORS}
    assert codes == set(ERRORS_BY_CODE)
    for cls in NODE_ERRORS:
        error = error_from_body(cls.status, {"error": {"code": cls.code, "message": "ciphertext=QUJD"}}, request_id="r-1")
        assert type(error) is ERRORS_BY_CODE[cls.code]
        assert isinstance(error, NodeAPIError)
        assert (error.status, error.code, error.request_id) == (cls.status, cls.code, "r-1")
        assert "QUJD" not in str(error)  # the node's text is kept aside, never printed
        assert error.server_message == "ciphertext=QUJD"
    unknown = error_from_body(418, {"error": {"code": "<script>", "message": "x"}}, request_id="bad id\n")
    assert type(unknown) is NodeAPIError and unknown.code == "UNKNOWN" and unknown.request_id is None
    assert error_from_body(502, b"not json").status == 502


# --- CLI ------------------------------------------------------------------------------------


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_chat_with_an_unknown_model_lists_the_served_ones_and_verifies_nothing(node, capsys):
    code, out, err = _run_cli(["chat", node.url, "hello", "--allow-simulated", "--model", "nope"], capsys)
    assert code == 1 and out == ""
    assert err == f"error: the node does not serve chat model 'nope'; its chat models: {MODEL}\n"


def test_cli_chat_offers_only_the_models_that_chat(capsys):
    """An embedding model is no chat choice: the node lists each model's tasks."""
    from types import SimpleNamespace

    from node.cli_answers import attest_and_choose_model
    from node.client.types import ModelList

    listed = ModelList.model_validate({"data": [
        {"id": "embedder", "tasks": ["embeddings"]}, {"id": "chatter", "tasks": ["chat", "completions"]},
    ]})
    client = SimpleNamespace(attest=lambda: None, models=SimpleNamespace(list=lambda: listed))
    assert attest_and_choose_model(client, "nope", sys.stderr) is None
    assert capsys.readouterr().err == "error: the node does not serve chat model 'nope'; its chat models: chatter\n"
    assert attest_and_choose_model(client, "embedder", sys.stderr) is None
    assert "its chat models: chatter\n" in capsys.readouterr().err


def test_cli_refuses_a_url_without_a_scheme_before_contacting_anything(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["chat", "127.0.0.1:9", "hello", "--allow-simulated"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "'127.0.0.1:9': not an http:// or https:// URL; did you mean http://127.0.0.1:9? (nothing was contacted)" in err
    assert "could not reach" not in err


def test_cli_chat_streams_and_reports_verification(node, capsys):
    code, out, err = _run_cli(["chat", node.url, "hello confidential world", "--allow-simulated"], capsys)
    assert code == 0, err
    assert out == "hello confidential world\n"
    assert "tee=simulated" in err and "SIMULATED" in err
    assert f"key epoch:     {node.state.keyring.current.epoch}" in err
    assert "receipt verified: events=4" in err
    assert f"model:         {MODEL}" in err  # the first model of GET /v1/models
    assert "key exchange:  hybrid ML-KEM-768 + X25519" in err
    assert "length hiding: request and answer padded" in err


def test_cli_chat_no_stream_max_tokens(node, capsys):
    code, out, err = _run_cli(
        ["chat", node.url, "a b c d", "--allow-simulated", "--no-stream", "--max-tokens", "2", "--model", MODEL], capsys
    )
    assert code == 0, err
    assert out == "a b\n"
    assert "receipt verified: events=1" in err


def test_cli_chat_refuses_simulated_by_default(node, capsys):
    code, out, err = _run_cli(["chat", node.url, SECRET_PROMPT], capsys)
    assert code == 1
    assert out == ""
    assert "PolicyRefused" in err and "tee is simulated" in err
    assert node.confidential_requests() == 0


def test_cli_attest(node, capsys):
    code, out, err = _run_cli(["attest", node.url, "--allow-simulated"], capsys)
    assert code == 0, err
    assert "attestation verified: tee=simulated" in out
    code, out, _ = _run_cli(["attest", node.url, "--allow-simulated", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["valid"] is True and result["simulated"] is True
    assert result["key_epoch"] == node.state.keyring.current.epoch
    assert result["document"]["tee"] == "simulated"
    code, out, _ = _run_cli(["attest", node.url, "--json"], capsys)
    assert code == 1
    assert json.loads(out) == {
        "url": node.url,
        "valid": True,  # authentic simulated evidence, refused by the policy
        "accepted": False,
        "error": "PolicyRefused",
        "message": json.loads(out)["message"],
        "policy_errors": ["tee is simulated, which is not a TEE: pass --allow-simulated (allow_simulated = true) for testing only"],
    }
    code, out, err = _run_cli(["attest", "http://127.0.0.1:9", "--allow-simulated"], capsys)
    assert code == 1 and "APIConnectionError" in err


# --- attestation lifecycle ----------------------------------------------------------------------


async def test_concurrent_first_requests_share_one_attestation(node):
    async with ConfidentialClient(node.url, allow_simulated=True) as client:
        prompts = [f"request {i}" for i in range(8)]
        responses = await asyncio.gather(
            *(client.chat.completions.create(model=MODEL, messages=chat_messages(p)) for p in prompts)
        )
        assert [r.choices[0].message.content for r in responses] == prompts
        assert client.attestations == 1


async def test_reattest_after_age(node):
    async with ConfidentialClient(node.url, allow_simulated=True, reattest_after=0) as client:
        for text in ("a", "b"):
            response = await client.chat.completions.create(model=MODEL, messages=chat_messages(text))
            assert response.choices[0].message.content == text
        assert client.attestations == 2


async def test_attestation_rate_limit_backoff_is_bounded(start_node):
    node = start_node(limits={"attestation_per_minute": 1})
    async with ConfidentialClient(node.url, allow_simulated=True) as first:
        await first.attest()  # takes the only token of the minute
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    async with ConfidentialClient(node.url, allow_simulated=True, max_retries=1, max_retry_wait=5) as client:
        client._sleep = fake_sleep
        with pytest.raises(OverloadedError) as info:
            await client.chat.completions.create(model=MODEL, messages=chat_messages(SECRET_PROMPT))
        assert info.value.retry_after is not None and info.value.retry_after >= 1
        assert waits == [min(info.value.retry_after, 5)]
        assert client.attestation is None
    assert node.confidential_requests() == 0
