"""Usage in clear (`privacy.clear_usage`): bucketed by default, exact, or none. The receipt signs
what travels in clear, the exact usage stays inside the encrypted answer, and both the
unmodified atoma-sdk and node.client keep working under each setting."""

from __future__ import annotations

import json

import pytest
from atoma import run_driver_lines
from server_support import CONFIDENTIAL_CHAT, SDK_MODEL, SSE, chat_body, make_node, spawn_node  # noqa: F401

from node import envelope
from node.client import Client
from node.crypto import b64d
from node.protocol import Usage

MODES = ("bucketed", "exact", "none")
PROMPT = "seven words of a prompt for usage"  # the echo engine counts words


@pytest.mark.parametrize(
    ("count", "bucket"), [(0, 0), (1, 16), (16, 16), (17, 32), (32, 32), (33, 64), (1000, 1024), (1025, 2048)]
)
def test_bucket_is_the_next_power_of_two_at_least_16(count, bucket):
    assert envelope.usage_bucket(count) == bucket


def test_bucketed_rounds_every_count_and_keeps_the_total_a_sum():
    exact = Usage.from_openai(
        {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 17}}
    ).model_dump()
    clear = envelope.usage_in_clear(exact, "bucketed")
    assert (clear["prompt_tokens"], clear["completion_tokens"], clear["total_tokens"]) == (64, 16, 80)
    assert clear["prompt_tokens_details"]["cached_tokens"] == 32
    assert clear["completion_tokens_details"]["reasoning_tokens"] == 0
    Usage.model_validate(clear)
    assert envelope.usage_in_clear(exact, "exact") == exact
    assert envelope.usage_in_clear(exact, "none") is None
    assert envelope.usage_in_clear(None, "bucketed") is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream", [False, True], ids=["response", "stream"])
async def test_clear_usage_and_receipt_follow_the_setting(make_node, mode, stream):
    node = await make_node(privacy={"clear_usage": mode})
    outer, opener = node.seal(chat_body(PROMPT, stream=stream))
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    assert response.status == 200
    if stream:
        events = SSE.parse(await response.read()).events
        plaintexts = [opener.open_event(e) for e in events]
        final = events[-1]
        inner = json.loads(plaintexts[-1])["usage"]
    else:
        final = await response.json()
        inner = json.loads(opener.open_response(final))["usage"]
    words = len(PROMPT.split())
    assert (inner["prompt_tokens"], inner["completion_tokens"]) == (words, words)  # exact inside
    expected = envelope.usage_in_clear(Usage.from_openai(inner).model_dump(), mode)
    # (a stream under "none" carries no usage field at all; an answer carries "usage": null)
    assert final.get("usage", None) == expected and final["receipt"]["usage"] == expected
    if mode == "none":
        assert final["receipt"]["usage"] is None and ("usage" in final) != stream
    envelope.verify_receipt(
        final["receipt"],
        signing_key=node.state.signer.public_key,
        request_hash=opener.request_hash,
        response_hashes=[b64d(e["response_hash"]) for e in (events if stream else [final])],
    )


@pytest.fixture(scope="module", params=MODES)
def mode_node(request):
    node = spawn_node(model=SDK_MODEL, env={"TEE_NODE_PRIVACY__CLEAR_USAGE": request.param})
    try:
        yield request.param, node
    finally:
        node.stop()
        node.log_path.unlink(missing_ok=True)


@pytest.mark.usefixtures("atoma_sdk")
@pytest.mark.parametrize("extra", [[], ["--stream"], ["--async"], ["--async", "--stream"]], ids=["sync", "sync-stream", "async", "async-stream"])
def test_unmodified_sdk_works_under_each_setting(mode_node, extra):
    _, node = mode_node
    *_, summary = run_driver_lines(["chat", "--url", node.url, "--model", SDK_MODEL, "--prompt", PROMPT, *extra], timeout=60)
    assert summary["ok"], summary
    assert summary["content"] == PROMPT
    if "--stream" not in extra:  # the SDK hands over the decrypted answer, exact usage inside
        words = len(PROMPT.split())
        assert summary["response"]["usage"] == {"prompt_tokens": words, "completion_tokens": words, "total_tokens": 2 * words}


@pytest.mark.parametrize("stream", [False, True], ids=["response", "stream"])
def test_node_client_reads_exact_usage_and_checks_the_clear_one(mode_node, stream):
    mode, node = mode_node
    words = len(PROMPT.split())
    with Client(node.url, allow_simulated=True) as client:
        messages = [{"role": "user", "content": PROMPT}]
        if stream:
            with client.chat.completions.create(model=SDK_MODEL, messages=messages, stream=True) as answer:
                list(answer)
                usage, receipt = answer.usage, answer.receipt
        else:
            answer = client.chat.completions.create(model=SDK_MODEL, messages=messages)
            usage, receipt = answer.usage, answer.receipt
    assert (usage.prompt_tokens, usage.completion_tokens) == (words, words)
    exact = Usage.from_openai(usage.model_dump()).model_dump()
    signed = receipt.usage.model_dump() if receipt.usage is not None else None
    assert signed == envelope.usage_in_clear(exact, mode)


def test_client_refuses_a_signed_usage_below_the_answers_own():
    from node.client.errors import UsageMismatch
    from node.client.streams import check_clear_usage
    from node.client.types import CompletionUsage
    from node.protocol import Receipt

    def receipt(usage):
        return Receipt(request_hash="", transcript_hash="", events=1, model="m", usage=usage, key_epoch=1, signature="")

    exact = CompletionUsage(prompt_tokens=20, completion_tokens=3, total_tokens=23)
    rounded = Usage.from_openai({"prompt_tokens": 32, "completion_tokens": 16})
    check_clear_usage(receipt(rounded), exact)  # bucketed: more than counted, fine
    check_clear_usage(receipt(None), exact)  # "none": nothing to compare
    with pytest.raises(UsageMismatch, match="fewer tokens"):
        check_clear_usage(receipt(Usage.from_openai({"prompt_tokens": 16, "completion_tokens": 16})), exact)
