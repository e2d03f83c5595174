"""The real node (`tee-node serve`, default config: vLLM with the embedded models) driven by
the real atoma-sdk and by a raw sealed client."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from integration_support import CHAT_MODEL, EMBED_MODEL, QUESTION  # type: ignore[import-not-found]
from node.crypto import b64d
from node.envelope import seal_request, usage_in_clear
from node.protocol import Usage
from tests.atoma import run_driver, run_driver_lines

pytestmark = pytest.mark.integration

needs_sdk = pytest.mark.usefixtures("atoma_sdk")  # fails, never skips, without .venv-atoma


def sdk_chat(url: str, *flags: str) -> dict | list[dict]:
    args = ["chat", "--url", url, "--model", CHAT_MODEL, "--prompt", QUESTION, "--max-tokens", "24", "--temperature", "0", *flags]
    if "--stream" in flags:
        lines = run_driver_lines(args, timeout=180)
        assert lines[-1].get("ok") is True, lines[-1]
        return lines
    result = run_driver(args, timeout=180)
    assert result.get("ok") is True, result
    return result


@pytest.fixture(scope="module")
def prompt_tokens(chat_model_dir: Path) -> int:
    """The question's prompt length under the model's own chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@needs_sdk
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sdk_chat_answers_paris(node: str, mode: str, prompt_tokens: int, chat_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    result = sdk_chat(node, *(["--async"] if mode == "async" else []))
    assert "Paris" in result["content"]
    usage = result["response"]["usage"]
    assert usage["prompt_tokens"] == prompt_tokens
    generated = len(AutoTokenizer.from_pretrained(chat_model_dir)(result["content"])["input_ids"])
    # vLLM counts the end-of-turn token it stopped on.
    assert usage["completion_tokens"] in (generated, generated + 1)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@needs_sdk
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sdk_stream_answers_paris(node: str, mode: str) -> None:
    lines = sdk_chat(node, "--stream", *(["--async"] if mode == "async" else []))
    summary = lines[-1]
    assert "Paris" in summary["content"]
    assert summary["chunks"] >= 2
    assert "".join(line["chunk"]["choices"][0]["delta"].get("content") or "" for line in lines[:-1]) == summary["content"]


@needs_sdk
def test_sdk_embeddings_are_normalised_384_dim(node: str) -> None:
    result = run_driver(
        ["embeddings", "--url", node, "--model", EMBED_MODEL, "--input", "The capital of France is Paris.", "--input", "hello"],
        timeout=120,
    )
    assert result.get("ok") is True, result
    assert result["dimensions"] == 384
    vectors = [item["embedding"] for item in result["response"]["data"]]
    assert len(vectors) == 2
    for vector in vectors:
        assert len(vector) == 384
        assert math.sqrt(sum(x * x for x in vector)) == pytest.approx(1.0, abs=1e-4)


async def _lock_key(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.post(url + "/v1/nodes/lock", json={"model": CHAT_MODEL}) as response:
        assert response.status == 200
        return b64d((await response.json())["public_key"])


async def _sealed_chat(url: str, stream: bool, max_tokens: int = 24) -> tuple[list[dict], dict, dict]:
    """Raw confidential chat: the decrypted chunks/response, the clear usage and the receipt."""
    body = {"messages": [{"role": "user", "content": QUESTION}], "model": CHAT_MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    async with aiohttp.ClientSession() as session:
        key = await _lock_key(session, url)
        outer, opener = seal_request(json.dumps(body, separators=(",", ":")).encode(), key, CHAT_MODEL, stream=stream)
        async with session.post(url + "/v1/confidential/chat/completions", json=outer) as response:
            assert response.status == 200, await response.text()
            if not stream:
                sealed = await response.json()
                return [json.loads(opener.open_response(sealed))], sealed["usage"], opener.finish()
            plaintexts, usage = [], None
            async for raw in response.content:
                line = raw.strip()
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    plaintexts.append(json.loads(opener.open_event(event)))
                    usage = event.get("usage") or usage
            return plaintexts, usage, opener.finish()


def test_stream_usage_matches_the_unary_usage_and_the_receipt(node: str, prompt_tokens: int) -> None:
    (unary,), unary_usage, unary_receipt = asyncio.run(_sealed_chat(node, stream=False))
    chunks, stream_usage, receipt = asyncio.run(_sealed_chat(node, stream=True))
    assert "Paris" in unary["choices"][0]["message"]["content"]
    # Greedy decoding: the same answer either way, so the same billing.
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == unary["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == prompt_tokens
    # The exact usage inside both answers; in clear and in the receipts, the bucketed one
    # (privacy.clear_usage's default), the same for both.
    clear = usage_in_clear(Usage.from_openai(unary["usage"]).model_dump(), "bucketed")
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert chunks[-1]["usage"][key] == unary["usage"][key]
        assert stream_usage[key] == unary_usage[key] == receipt["usage"][key] == unary_receipt["usage"][key] == clear[key]
    assert receipt["events"] == len(chunks)


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_a_client_leaving_mid_stream_frees_its_slot(node: str) -> None:
    async def leave_early() -> int:
        body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "model": CHAT_MODEL, "max_tokens": 1500, "stream": True}
        async with aiohttp.ClientSession() as session:
            key = await _lock_key(session, node)
            outer, opener = seal_request(json.dumps(body).encode(), key, CHAT_MODEL, stream=True)
            events = 0
            async with session.post(node + "/v1/confidential/chat/completions", json=outer) as response:
                async for raw in response.content:
                    if raw.startswith(b"data:"):
                        opener.open_event(json.loads(raw[5:]))
                        events += 1
                        if events == 3:
                            break
            return events

    assert asyncio.run(leave_early()) == 3
    for _ in range(40):
        if _metric(node, "tee_node_in_flight") == 0:
            break
        time.sleep(0.25)
    assert _metric(node, "tee_node_in_flight") == 0
    # The engine keeps serving: the freed slot is usable at once.
    (answer,), _, _ = asyncio.run(_sealed_chat(node, stream=False, max_tokens=8))
    assert answer["choices"][0]["message"]["content"]


def test_models_lists_both_embedded_models(node: str) -> None:
    with urllib.request.urlopen(node + "/v1/models", timeout=5) as response:
        ids = {m["id"] for m in json.loads(response.read())["data"]}
    assert {CHAT_MODEL, EMBED_MODEL} <= ids


def test_readme_chat_command_answers_paris(node: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's `tee-node chat` against the real node: attested, verified, and right."""
    from node.cli import main as cli_main

    code = cli_main(["chat", node, QUESTION, "--allow-simulated", "--temperature", "0", "--max-tokens", "24"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Paris" in captured.out
    assert "attestation verified: tee=simulated" in captured.err
    assert "receipt verified" in captured.err
