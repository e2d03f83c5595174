"""Privacy Pass end to end on real `tee-node serve` processes and the `tee-node` CLI: tokens
fetched after attestation, spent one per request, a spent token refused (TOKEN_SPENT) before
and after a restart, and `node.client.Client(url, tokens=Wallet(path))` sending tokens only."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import MODEL, TEE_NODE, spawn_node

from node import privacypass as pp
from node.client import Client, NoTokensLeft, TokenSpentError, Wallet
from node.crypto import b64url_d, b64url_e

API_KEY = "cli-account-key-5e1f"


def privacy_pass_env(state_dir) -> dict[str, str]:
    return {
        "TEE_NODE_AUTH__API_TOKEN_SHA256": json.dumps([hashlib.sha256(API_KEY.encode()).hexdigest()]),
        "TEE_NODE_AUTH__PRIVACY_PASS__ENABLED": "true",
        "TEE_NODE_ATTESTATION__STATE_DIR": str(state_dir),
    }


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")}  # no API key from the caller
    return subprocess.run([str(TEE_NODE), *args], capture_output=True, text=True, timeout=120, env=env)


def wallet_tokens(path) -> list[bytes]:
    return [b64url_d(t) for t in json.loads(path.read_text())["tokens"]]


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


def test_fetch_spend_double_spend_restart_double_spend(tmp_path, state_dir):
    wallet = tmp_path / "wallet.json"
    node = spawn_node(env=privacy_pass_env(state_dir))
    try:
        fetched = cli("tokens", "fetch", node.url, "--api-key", API_KEY, "--count", "4", "--out", str(wallet), "--allow-simulated")
        assert fetched.returncode == 0, fetched.stderr
        assert "fetched 4 token(s)" in fetched.stdout and "attestation verified" in fetched.stderr
        assert wallet.stat().st_mode & 0o777 == 0o600
        tokens = wallet_tokens(wallet)
        assert len(tokens) == 4 and all(len(t) == pp.TOKEN_SIZE for t in tokens)
        copy = tmp_path / "copy.json"  # the same tokens, offered a second time from here
        shutil.copy(wallet, copy)

        chat = cli("chat", node.url, "anonymous words", "--tokens", str(wallet), "--allow-simulated", "--model", MODEL)
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip() == "anonymous words" and "receipt verified" in chat.stderr
        assert len(wallet_tokens(wallet)) == 2  # one for GET /v1/models, one for the chat
        log = node.log()
        assert API_KEY not in log and hashlib.sha256(API_KEY.encode()).hexdigest() not in log

        again = cli("chat", node.url, "twice", "--tokens", str(copy), "--allow-simulated", "--model", MODEL)
        assert again.returncode == 1 and "TokenSpentError" in again.stderr, again.stderr
    finally:
        node.stop()

    node = spawn_node(env=privacy_pass_env(state_dir))  # the same state directory: same key, same spent set
    try:
        again = cli("chat", node.url, "after restart", "--tokens", str(copy), "--allow-simulated", "--model", MODEL)
        assert again.returncode == 1 and "TokenSpentError" in again.stderr, again.stderr
        chat = cli("chat", node.url, "still good", "--tokens", str(wallet), "--allow-simulated", "--model", MODEL)
        assert chat.returncode == 0 and chat.stdout.strip() == "still good", chat.stderr
        assert len(wallet_tokens(wallet)) == 0
        attest = cli("attest", node.url, "--tokens", str(wallet), "--allow-simulated")
        assert attest.returncode == 0 and "Privacy Pass:  attested token key" in attest.stdout, attest.stderr
        assert "0 unspent token(s)" in attest.stdout
        empty = cli("chat", node.url, "no more", "--tokens", str(wallet), "--allow-simulated", "--model", MODEL)
        assert empty.returncode == 1 and "NoTokensLeft" in empty.stderr
    finally:
        node.stop()


def test_fetch_refuses_without_an_account_or_a_node_without_privacy_pass(tmp_path, state_dir):
    node = spawn_node(env=privacy_pass_env(state_dir))
    try:
        wrong = cli("tokens", "fetch", node.url, "--api-key", "not-an-account", "--out", str(tmp_path / "w"), "--allow-simulated")
        assert wrong.returncode == 1 and "UnauthorizedError" in wrong.stderr
        missing = cli("tokens", "fetch", node.url, "--out", str(tmp_path / "w"), "--allow-simulated")
        assert missing.returncode == 1 and "pass --api-key" in missing.stderr
        refused = cli("tokens", "fetch", node.url, "--api-key", API_KEY, "--out", str(tmp_path / "w"))
        assert refused.returncode == 1 and "PolicyRefused" in refused.stderr  # simulated: not without the flag
        assert not (tmp_path / "w").exists()
    finally:
        node.stop()
    plain = spawn_node()
    try:
        off = cli("tokens", "fetch", plain.url, "--api-key", API_KEY, "--out", str(tmp_path / "w"), "--allow-simulated")
        assert off.returncode == 1 and "binds no Privacy Pass token key" in off.stderr
    finally:
        plain.stop()


def test_client_with_a_wallet_sends_tokens_and_never_the_api_key(tmp_path, state_dir):
    node = spawn_node(env=privacy_pass_env(state_dir))
    wallet = Wallet(tmp_path / "wallet.json")
    try:
        with Client(node.url, allow_simulated=True) as fetcher:
            assert fetcher.fetch_tokens(API_KEY, 40, wallet) == 40  # two batches: 32 and 8
        assert len(wallet) == 40
        with pytest.raises(ValueError, match="one of api_key=, tokens= or credential="):
            Client(node.url, api_key=API_KEY, tokens=wallet, allow_simulated=True)
        with Client(node.url, tokens=wallet, allow_simulated=True) as client:
            answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "one two three"}])
            assert answer.choices[0].message.content == "one two three"
            assert answer.usage.prompt_tokens == 3 and answer.receipt.usage.prompt_tokens == 16  # exact inside, bucketed signed
            with client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a b"}], stream=True) as stream:
                assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "a b"
            assert [m.id for m in client.models.list().data] == [MODEL]
        assert len(wallet) == 37  # one token per request; the attestation took none
        metrics = subprocess.run(
            ["curl", "-s", "-H", f"Authorization: Bearer {API_KEY}", f"{node.url}/metrics"], capture_output=True, text=True, timeout=10
        ).stdout
        assert "tee_node_privacy_pass_redeemed_total 3.0" in metrics
        assert "tee_node_privacy_pass_issued_total 40.0" in metrics
        tokens = wallet_tokens(wallet.path)
        spent = Wallet(tmp_path / "spent.json")
        spent.add(tokens[:1])
        with Client(node.url, tokens=spent, allow_simulated=True) as client:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        spent.add(tokens[:1])
        with Client(node.url, tokens=spent, allow_simulated=True) as client, pytest.raises(TokenSpentError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        with Client(node.url, tokens=spent, allow_simulated=True) as client, pytest.raises(NoTokensLeft):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    finally:
        node.stop()


def test_wallet_file_is_owner_only_atomic_and_prefers_the_attested_key(tmp_path):
    from node.private_files import PrivateFileError

    wallet = Wallet(tmp_path / "w.json")
    old, new = bytes(2) + b"o" * 32 + bytes(32) + b"A" * 32 + bytes(48), bytes(2) + b"n" * 32 + bytes(32) + b"B" * 32 + bytes(48)
    wallet.add([old, new])
    assert (tmp_path / "w.json").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", "w.json.lock"]  # no temporary file left
    assert wallet.take(b"B" * 32) == new and wallet.take(b"B" * 32) == old and len(wallet) == 0
    with pytest.raises(NoTokensLeft):
        wallet.take()
    (tmp_path / "w.json").write_text("{damaged")
    with pytest.raises(PrivateFileError, match="damaged"):
        wallet.take()
    (tmp_path / "w.json").chmod(0o644)
    with pytest.raises(PrivateFileError, match="chmod 600"):
        len(wallet)


def test_processes_sharing_a_wallet_never_take_the_same_token(tmp_path):
    import multiprocessing

    wallet = Wallet(tmp_path / "w.json")
    wallet.add([i.to_bytes(2, "big") * 73 for i in range(40)])
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        taken = pool.map(_take_ten, [str(wallet.path)] * 4)
    flat = [token for batch in taken for token in batch]
    assert len(flat) == 40 and len(set(flat)) == 40 and len(wallet) == 0


def _take_ten(path: str) -> list[bytes]:
    wallet = Wallet(path)
    return [wallet.take() for _ in range(10)]


def test_cli_says_what_to_do_with_a_damaged_wallet(tmp_path):
    wallet = tmp_path / "w.json"
    wallet.write_text("not json")
    wallet.chmod(0o600)
    node = spawn_node()
    try:
        chat = cli("chat", node.url, "hello", "--tokens", str(wallet), "--allow-simulated", "--model", MODEL)
    finally:
        node.stop()
    assert chat.returncode == 1 and "PrivateFileError" in chat.stderr and "damaged" in chat.stderr
    assert "Traceback" not in chat.stderr


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory):
    node = spawn_node(env=privacy_pass_env(tmp_path_factory.mktemp("fuzz-state")))
    try:
        yield node
    finally:
        node.stop()


def _request(node, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> int:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


_TOKEN_BYTES = st.one_of(
    st.binary(max_size=200),
    st.binary(min_size=144, max_size=144).map(lambda b: b"\x00\x01" + b),  # the right type and size
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=_TOKEN_BYTES, padded=st.booleans(), noise=st.text(alphabet='"=, \t-_+/aZ09', max_size=12))
def test_fuzzed_tokens_get_a_documented_401_never_a_500(fuzz_node, token, padded, noise):
    from node.crypto import b64url_e

    encoded = b64url_e(token) if padded else b64url_e(token).rstrip("=")
    for value in (f'PrivateToken token="{encoded}"', f"PrivateToken token={encoded}{noise}", f"PrivateToken {noise}"):
        status = _request(fuzz_node, "GET", "/v1/models", {"Authorization": value})
        assert status == 401, value
    assert _request(fuzz_node, "GET", "/health", {}) == 200


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(
    st.binary(max_size=400),
    st.lists(st.binary(min_size=49, max_size=49), min_size=1, max_size=4).map(
        lambda els: b"\x00\x01" + bytes([0]) + (49 * len(els)).to_bytes(2, "big") + b"".join(els)
    ),
))
def test_fuzzed_token_requests_get_a_documented_4xx_never_a_500(fuzz_node, body):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": pp.REQUEST_MEDIA_TYPE}
    status = _request(fuzz_node, "POST", "/v1/privacy-pass/token-request", headers, body)
    assert status in (200, 422), status  # 200 only for a well-formed request that happens to hit the key


def test_a_token_request_through_the_relay_leaves_nothing_of_the_account_token_or_address(tmp_path, state_dir):
    from test_ohttp_relay import spawn_relay

    node = spawn_node(env={**privacy_pass_env(state_dir), "TEE_NODE_LOG_LEVEL": "DEBUG"})
    relay = None
    try:
        relay = spawn_relay(node.url + "/v1/ohttp")
        wallet = Wallet(tmp_path / "wallet.json")
        with Client(node.url, relay=relay.url, allow_simulated=True) as fetcher:  # issuance relayed too
            assert fetcher.fetch_tokens(API_KEY, 4, wallet) == 4
        tokens = wallet_tokens(wallet.path)
        started = len(node.log())
        with Client(node.url, relay=relay.url, tokens=wallet, allow_simulated=True) as client:
            answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "relayed and anonymous"}])
            assert answer.choices[0].message.content == "relayed and anonymous"
        spent = [t for t in tokens if t not in wallet_tokens(wallet.path)]
        assert len(spent) == 1  # the chat's (the attestation took none)
        added = node.log()[started:]
        assert "route=/v1/ohttp " in added and "status=200" in added  # the request is in the log, as relayed
        digest = hashlib.sha256(API_KEY.encode()).hexdigest()
        for secret in (API_KEY, digest, digest[:16], "127.0.0.1", str(relay.port)):
            assert secret not in added, secret
        for token in tokens:
            parsed = pp.Token.from_bytes(token)
            for secret in (b64url_e(token).rstrip("="), token.hex(), parsed.nonce.hex(), parsed.authenticator.hex(),
                           hashlib.sha256(token).hexdigest()):
                assert secret not in added
        metrics = subprocess.run(
            ["curl", "-s", "-H", f"Authorization: Bearer {API_KEY}", f"{node.url}/metrics"], capture_output=True, text=True, timeout=10
        ).stdout
        assert "tee_node_privacy_pass_redeemed_total 1.0" in metrics
        for token in spent:
            assert b64url_e(token).rstrip("=") not in metrics and digest not in metrics and "127.0.0.1" not in metrics
    finally:
        if relay is not None:
            relay.stop()
        node.stop()
