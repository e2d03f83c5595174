"""The real, unmodified atoma-sdk 0.1.3 client (own venv, tests/atoma_driver.py) against a real
`tee-node serve --engine echo` subprocess: lock, confidential chat (sync/async, streaming or not)
and embeddings. The SDK does the key exchange, encryption, SSE parsing, decryption and its own
response_hash check; the echo engine answers with the prompt's words."""

from __future__ import annotations

import hashlib
import json

import pytest
from atoma import run_driver, run_driver_lines
from server_support import SDK_MODEL, spawn_node

pytestmark = pytest.mark.usefixtures("atoma_sdk")

PROMPT = "Confidential llamas graze quietly on Héllo hills"


def chat(url: str, *extra: str, prompt: str = PROMPT) -> list[dict]:
    return run_driver_lines(["chat", "--url", url, "--model", SDK_MODEL, "--prompt", prompt, *extra], timeout=60)


@pytest.mark.parametrize("mode", [[], ["--async"]], ids=["sync", "async"])
def test_sdk_confidential_chat(echo_node, mode):
    (out,) = chat(echo_node.url, *mode)
    assert out["ok"], out
    assert out["content"] == PROMPT
    response = out["response"]
    assert response["object"] == "chat.completion"
    assert response["model"] == SDK_MODEL
    words = len(PROMPT.split())
    assert response["usage"] == {"prompt_tokens": words, "completion_tokens": words, "total_tokens": 2 * words}


@pytest.mark.parametrize("mode", [[], ["--async"]], ids=["sync", "async"])
def test_sdk_confidential_chat_stream(echo_node, mode):
    *chunks, summary = chat(echo_node.url, "--stream", *mode)
    assert summary["ok"] and summary["done"], summary
    assert summary["content"] == PROMPT
    assert summary["chunks"] == len(chunks) == len(PROMPT.split())
    assert [c["chunk"]["choices"][0]["delta"]["content"].strip() for c in chunks] == PROMPT.split()
    assert chunks[-1]["chunk"]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("mode", [[], ["--async"]], ids=["sync", "async"])
def test_sdk_stream_with_timing_cover(mode):
    """the protocol's optional cadence: filler events (no choices) between tokens are
    skipped by the SDK, as it skips the usage chunk; the padded events decrypt as any other."""
    node = spawn_node(
        model=SDK_MODEL, env={"TEE_NODE_LIMITS__STREAM_CADENCE_MS": "10", "TEE_NODE_ENGINE__ECHO_TOKEN_DELAY": "0.05"}
    )
    try:
        *chunks, summary = chat(node.url, "--stream", *mode)
        assert summary["ok"] and summary["done"], summary
        assert summary["content"] == PROMPT
        # One chunk per tick that had text (a late tick may carry two words), no empty ones.
        assert summary["chunks"] == len(chunks) <= len(PROMPT.split())
        assert all(c["chunk"]["choices"][0]["delta"]["content"] for c in chunks)
    finally:
        node.stop()
        node.log_path.unlink(missing_ok=True)


def test_sdk_max_tokens(echo_node):
    (out,) = chat(echo_node.url, "--max-tokens", "3")
    assert out["ok"], out
    assert out["content"] == " ".join(PROMPT.split()[:3])
    assert out["response"]["choices"][0]["finish_reason"] == "length"


def test_sdk_embeddings_and_lock(echo_node):
    out = run_driver(["embeddings", "--url", echo_node.url, "--model", SDK_MODEL, "--input", "alpha beta", "--input", "gamma"])
    assert out["ok"], out
    assert out["dimensions"] == 16
    assert [d["index"] for d in out["response"]["data"]] == [0, 1]
    lock = run_driver(["lock", "--url", echo_node.url, "--model", SDK_MODEL])
    assert lock["ok"], lock
    assert set(lock["response"]) >= {"public_key", "node_small_id", "stack_small_id"}


def test_sdk_unknown_model_is_refused(echo_node):
    (out,) = run_driver_lines(["chat", "--url", echo_node.url, "--model", "no-such-model", "--prompt", "x"])
    assert not out["ok"]
    # the SDK's lock call gets the node's 404 and wraps it in its own APIError
    assert "Status 404" in out["body"]
    assert '{"error":{"code":"MODEL_NOT_FOUND","message":"model not found"}}' in out["body"]


def test_sdk_with_bearer_token():
    token = "sdk-test-token"
    digest = hashlib.sha256(token.encode()).hexdigest()
    node = spawn_node(model=SDK_MODEL, env={"TEE_NODE_AUTH__API_TOKEN_SHA256": json.dumps([digest])})
    try:
        (out,) = chat(node.url, "--token", token)
        assert out["ok"], out
        assert out["content"] == PROMPT
        (refused,) = chat(node.url, "--token", "wrong-token")
        assert not refused["ok"]
        assert "Status 401" in refused["body"]
        assert '"code":"UNAUTHORIZED"' in refused["body"]
    finally:
        node.stop()
        node.log_path.unlink(missing_ok=True)
