"""The node as Privacy Pass issuer and origin: the directory, issuance to accounts under their
quota, redemption in place of a bearer token, one spend per token (across restarts too), the
refusals of bad tokens and token requests (each with its code, the node serving on), key
rotation, and nothing of an account, a token or an address in the logs and metrics."""

from __future__ import annotations

import hashlib
import os
import re
import time

import pytest
from server_support import CONFIDENTIAL_CHAT, all_logs, chat_body, make_node, node_client  # noqa: F401

from node import privacypass as pp
from node.crypto import b64url_d, b64url_e
from node.server.privacy_pass import KEYS_FILE, SPENT_PREFIX, TokenKeys

ACCOUNT_KEY = "account-api-key-7f3a91"
OTHER_KEY = "other-account-key-c0ffee"
BEARER = {"Authorization": f"Bearer {ACCOUNT_KEY}"}


def settings(state_dir, **privacy_pass) -> dict:
    return {
        "auth": {
            "api_token_sha256": [hashlib.sha256(k.encode()).hexdigest() for k in (ACCOUNT_KEY, OTHER_KEY)],
            "privacy_pass": {"enabled": True, **privacy_pass},
        },
        "attestation": {"state_dir": str(state_dir)},
    }


@pytest.fixture
async def pp_node(make_node, tmp_path):
    return await make_node(config=settings(tmp_path))


async def directory_key(node) -> bytes:
    response = await node.client.get("/v1/privacy-pass/token-keys")
    assert response.status == 200 and response.content_type == pp.DIRECTORY_MEDIA_TYPE
    keys = (await response.json(content_type=pp.DIRECTORY_MEDIA_TYPE))["token-keys"]
    assert keys[0]["token-type"] == 1
    return b64url_d(keys[0]["token-key"])


async def fetch_tokens(node, count: int, headers=BEARER) -> list[bytes]:
    pending = pp.PendingIssuance(await directory_key(node), node.state.privacy_pass.challenge.to_bytes(), count)
    response = await node.client.post(
        "/v1/privacy-pass/token-request",
        data=pending.request.to_bytes(),
        headers={**headers, "Content-Type": pp.REQUEST_MEDIA_TYPE},
    )
    assert response.status == 200, await response.text()
    assert response.content_type == pp.RESPONSE_MEDIA_TYPE
    return pending.finalize(await response.read())


async def chat_with(node, headers: dict[str, str]):
    status, body, answer = await node.call(CONFIDENTIAL_CHAT, chat_body("anonymous hello"), headers)
    return status, body, answer


def token_header(token: bytes) -> dict[str, str]:
    return {"Authorization": pp.authorization(token)}


async def test_issuance_redemption_and_double_spend(pp_node):
    tokens = await fetch_tokens(pp_node, 3)
    assert len(tokens) == 3 and len(set(tokens)) == 3
    status, _, answer = await chat_with(pp_node, token_header(tokens[0]))
    assert status == 200 and answer["choices"][0]["message"]["content"] == "anonymous hello"
    status, body, _ = await chat_with(pp_node, token_header(tokens[0]))
    assert status == 401 and body["error"]["code"] == "TOKEN_SPENT"
    assert (await chat_with(pp_node, token_header(tokens[1])))[0] == 200
    assert (await chat_with(pp_node, BEARER))[0] == 200  # the account's bearer token still works


async def test_single_request_form_is_rfc9578s(pp_node):
    (token,) = await fetch_tokens(pp_node, 1)
    assert (await chat_with(pp_node, token_header(token)))[0] == 200


@pytest.mark.parametrize("path", ["/v1/models", "/metrics"])
async def test_every_bearer_route_takes_a_token(pp_node, path):
    (token,) = await fetch_tokens(pp_node, 1)
    assert (await pp_node.client.get(path, headers=token_header(token))).status == 200
    response = await pp_node.client.get(path, headers=token_header(token))
    assert response.status == 401 and (await response.json())["error"]["code"] == "TOKEN_SPENT"


async def test_neither_credential_is_401_with_a_challenge(pp_node):
    status, body, _ = await chat_with(pp_node, {})
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
    response = await pp_node.post(CONFIDENTIAL_CHAT, pp_node.seal(chat_body("x"))[0])
    challenge = response.headers["WWW-Authenticate"]
    match = re.fullmatch(r'PrivateToken challenge="([A-Za-z0-9_=-]+)", token-key="([A-Za-z0-9_=-]+)"', challenge)
    assert match, challenge
    assert b64url_d(match.group(1)) == pp.TokenChallenge("tee-node").to_bytes()
    assert b64url_d(match.group(2)) == await directory_key(pp_node)
    assert (await pp_node.client.get("/v1/models", headers={"Authorization": "Bearer nope"})).status == 401


async def test_spent_tokens_stay_spent_across_a_restart(make_node, tmp_path):
    node = await make_node(config=settings(tmp_path))
    tokens = await fetch_tokens(node, 2)
    key = await directory_key(node)
    assert (await chat_with(node, token_header(tokens[0])))[0] == 200
    await node.client.close()  # the node stops: its lifecycles end

    again = await make_node(config=settings(tmp_path))
    assert await directory_key(again) == key  # the token key was kept
    status, body, _ = await chat_with(again, token_header(tokens[0]))
    assert status == 401 and body["error"]["code"] == "TOKEN_SPENT"
    assert (await chat_with(again, token_header(tokens[1])))[0] == 200
    for name in os.listdir(tmp_path):
        if name.startswith(SPENT_PREFIX) or name == KEYS_FILE:
            assert os.stat(tmp_path / name).st_mode & 0o777 == 0o600


async def test_account_quota(make_node, tmp_path):
    node = await make_node(config=settings(tmp_path, tokens_per_hour=5, max_batch=5))
    assert len(await fetch_tokens(node, 3)) == 3
    pending = pp.PendingIssuance(await directory_key(node), node.state.privacy_pass.challenge.to_bytes(), 3)
    response = await node.client.post(
        "/v1/privacy-pass/token-request", data=pending.request.to_bytes(),
        headers={**BEARER, "Content-Type": pp.REQUEST_MEDIA_TYPE},
    )
    assert response.status == 429 and (await response.json())["error"]["code"] == "TOKEN_QUOTA_EXCEEDED"
    # One token back every 720 s: the third of three missing ones is there in about 720 s.
    assert 700 <= int(response.headers["Retry-After"]) <= 721
    assert len(await fetch_tokens(node, 2)) == 2  # what is left is issued
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert len(await fetch_tokens(node, 5, headers=other)) == 5  # each account has its own quota


async def _token_request(node, body: bytes, content_type: str = pp.REQUEST_MEDIA_TYPE, headers=BEARER):
    response = await node.client.post(
        "/v1/privacy-pass/token-request", data=body, headers={**headers, "Content-Type": content_type}
    )
    return response.status, (await response.json())["error"]["code"] if response.status != 200 else None


async def test_token_request_refusals(make_node, tmp_path):
    node = await make_node(config=settings(tmp_path, max_batch=4))
    key = await directory_key(node)
    good = pp.PendingIssuance(key, node.state.privacy_pass.challenge.to_bytes(), 2).request
    not_a_point = pp.TokenRequest(good.truncated_key_id, (b"\x02" + b"\xff" * 48,), batched=False).to_bytes()
    other_key = pp.TokenRequest((good.truncated_key_id + 1) % 256, good.blinded, batched=True).to_bytes()
    too_many = pp.PendingIssuance(key, node.state.privacy_pass.challenge.to_bytes(), 5).request.to_bytes()
    cases = {
        "bad blinded element": (not_a_point, pp.REQUEST_MEDIA_TYPE, 422, "INVALID_TOKEN_REQUEST"),
        "another key": (other_key, pp.REQUEST_MEDIA_TYPE, 422, "INVALID_TOKEN_REQUEST"),
        "wrong type": (b"\x00\x02" + good.to_bytes()[2:], pp.REQUEST_MEDIA_TYPE, 422, "INVALID_TOKEN_REQUEST"),
        "cut short": (good.to_bytes()[:-1], pp.REQUEST_MEDIA_TYPE, 422, "INVALID_TOKEN_REQUEST"),
        "empty": (b"", pp.REQUEST_MEDIA_TYPE, 422, "INVALID_TOKEN_REQUEST"),
        "media type": (good.to_bytes(), "application/json", 422, "INVALID_TOKEN_REQUEST"),
        "batch above the limit": (too_many, pp.REQUEST_MEDIA_TYPE, 422, "TOKEN_BATCH_TOO_LARGE"),
    }
    for name, (body, content_type, status, code) in cases.items():
        assert await _token_request(node, body, content_type) == (status, code), name
    assert await _token_request(node, good.to_bytes(), headers={}) == (401, "UNAUTHORIZED")
    (token,) = await fetch_tokens(node, 1)
    assert await _token_request(node, good.to_bytes(), headers=token_header(token)) == (401, "UNAUTHORIZED")
    assert len(await fetch_tokens(node, 4)) == 4  # the node serves on, and refusals cost no quota
    await node.chat_ok(headers=BEARER)


async def test_token_refusals(pp_node):
    tokens = await fetch_tokens(pp_node, 2)
    token = pp.Token.from_bytes(tokens[0])
    forged = pp.Token(token.nonce, token.challenge_digest, token.token_key_id, bytes(48)).to_bytes()
    other_challenge = pp.Token(token.nonce, bytes(32), token.token_key_id, token.authenticator).to_bytes()
    unknown_key = pp.Token(token.nonce, token.challenge_digest, bytes(32), token.authenticator).to_bytes()
    another_type = b64url_e(b"\x00\x02" + tokens[0][2:])
    cases = {
        "not base64url": ('PrivateToken token="a+b/"', "INVALID_TOKEN"),
        "short token": (f'PrivateToken token="{b64url_e(tokens[0][:-1])}"', "INVALID_TOKEN"),
        "another type": (f'PrivateToken token="{another_type}"', "INVALID_TOKEN"),
        "two tokens": (f'PrivateToken token="{b64url_e(tokens[0])}", token="{b64url_e(tokens[1])}"', "INVALID_TOKEN"),
        "no token": ("PrivateToken challenge=x", "INVALID_TOKEN"),
        "forged authenticator": (pp.authorization(forged), "INVALID_TOKEN"),
        "another challenge": (pp.authorization(other_challenge), "INVALID_TOKEN"),
        "unknown key": (pp.authorization(unknown_key), "TOKEN_KEY_RETIRED"),
    }
    for name, (header, code) in cases.items():
        status, body, _ = await chat_with(pp_node, {"Authorization": header})
        assert (status, body["error"]["code"]) == (401, code), name
    # None of that spent the real token, and the node serves on.
    unpadded = {"Authorization": f'PrivateToken token="{b64url_e(tokens[0]).rstrip("=")}"'}
    assert (await chat_with(pp_node, unpadded))[0] == 200


async def test_a_retired_key_redeems_no_more(make_node, tmp_path):
    node = await make_node(config=settings(tmp_path, key_rotation_interval=3600, key_overlap=600))
    issuer = node.state.privacy_pass
    tokens = await fetch_tokens(node, 2)
    old_key = issuer.token_key()
    issuer.keys.maintain(time.time() + 3600)  # rotation: the old key redeems during the overlap
    assert issuer.token_key() != old_key and len(issuer.keys.keys) == 2
    assert [b64url_d(k["token-key"]) for k in issuer.directory()["token-keys"]] == [issuer.token_key(), old_key]
    assert (await chat_with(node, token_header(tokens[0])))[0] == 200
    spent_file = tmp_path / f"{SPENT_PREFIX}{pp.token_key_id(old_key).hex()}.bin"
    assert spent_file.exists()
    issuer.keys.maintain(time.time() + 3600 + 601)  # past the overlap: retired, its spent set removed
    assert len(issuer.keys.keys) == 1 and not spent_file.exists()
    status, body, _ = await chat_with(node, token_header(tokens[1]))
    assert (status, body["error"]["code"]) == (401, "TOKEN_KEY_RETIRED")
    assert len(await fetch_tokens(node, 1)) == 1


def test_keys_are_loaded_rotated_and_kept_owner_only(tmp_path):
    keys = TokenKeys(tmp_path, rotation_interval=100, overlap=10)
    keys.load(1000.0)
    first = keys.current.public_key
    assert (tmp_path / KEYS_FILE).stat().st_mode & 0o777 == 0o600
    keys.close()
    again = TokenKeys(tmp_path, rotation_interval=100, overlap=10)
    again.load(1050.0)
    assert again.current.public_key == first
    again.maintain(1100.0)
    assert again.current.public_key != first and len(again.keys) == 2
    assert len({k.truncated_key_id for k in again.keys}) == 2
    again.close()


def test_enabled_needs_accounts():
    from node.config import load_config

    with pytest.raises(ValueError, match="privacy_pass.enabled needs auth.api_token_sha256"):
        load_config(engine={"kind": "echo"}, auth={"privacy_pass": {"enabled": True}})


async def test_logs_and_metrics_hold_nothing_of_account_token_or_address(make_node, tmp_path, all_logs):
    node = await make_node(config=settings(tmp_path))
    started = len(all_logs())  # the start-up lines name the node's own (loopback) address
    tokens = await fetch_tokens(node, 2)
    assert (await chat_with(node, token_header(tokens[0])))[0] == 200
    assert (await chat_with(node, token_header(tokens[0])))[0] == 401
    metrics = (await node.client.get("/metrics", headers=token_header(tokens[1]))).text
    text = all_logs()[started:] + "\n" + await metrics()
    digest = hashlib.sha256(ACCOUNT_KEY.encode()).hexdigest()
    for token in tokens:
        parsed = pp.Token.from_bytes(token)
        for secret in (b64url_e(token), b64url_e(token).rstrip("="), token.hex(), parsed.nonce.hex(),
                       parsed.authenticator.hex(), hashlib.sha256(token).hexdigest()):
            assert secret not in text
    for secret in (ACCOUNT_KEY, digest, digest[:16], "127.0.0.1", str(node.client.port)):
        assert secret not in text, secret
    assert "tee_node_privacy_pass_redeemed_total 2.0" in text and "tee_node_privacy_pass_issued_total 2.0" in text


async def test_the_attestation_binds_the_issuing_token_key(pp_node):
    from attestation.appraisal import Policy
    from attestation.document import verify_document
    from attestation.errors import ReportDataMismatch
    from node.crypto import b64e

    nonce = os.urandom(32)
    response = await pp_node.client.get(f"/v1/attestation?nonce={nonce.hex()}")
    doc = await response.json()
    assert doc["public_keys"]["privacy_pass"] == b64e(await directory_key(pp_node))
    verified = verify_document(doc, expected_nonce=nonce, policy=Policy(allow_simulated=True))
    assert verified.public_keys["privacy_pass"] == doc["public_keys"]["privacy_pass"]
    doc["public_keys"]["privacy_pass"] = b64e(pp.IssuerKey.generate(0).public_key)  # a key just for you
    with pytest.raises(ReportDataMismatch):
        verify_document(doc, expected_nonce=nonce, policy=Policy(allow_simulated=True))


def test_a_readable_or_damaged_key_file_stops_the_start_with_what_to_do(tmp_path):
    from node.private_files import PrivateFileError

    keys = TokenKeys(tmp_path, rotation_interval=100, overlap=10)
    keys.load(1000.0)
    keys.close()
    path = tmp_path / KEYS_FILE
    path.chmod(0o644)
    with pytest.raises(PrivateFileError, match=f"chmod 600 {path}"):
        TokenKeys(tmp_path, 100, 10).load(1000.0)
    path.chmod(0o600)
    path.write_bytes(b"{not json")
    with pytest.raises(PrivateFileError, match="damaged: delete it"):
        TokenKeys(tmp_path, 100, 10).load(1000.0)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PrivateFileError, match="symbolic link"):
        TokenKeys(tmp_path, 100, 10).load(1000.0)


async def test_openapi_lists_issuance_when_enabled(pp_node, node_client):
    paths = (await (await pp_node.client.get("/openapi.json")).json())["paths"]
    operation = paths["/v1/privacy-pass/token-request"]["post"]
    assert set(operation["responses"]) == {"200", "401", "413", "422", "429"}
    assert "/v1/privacy-pass/token-keys" in paths
    off = (await (await node_client.client.get("/openapi.json")).json())["paths"]
    assert not any(path.startswith("/v1/privacy-pass") for path in off)
