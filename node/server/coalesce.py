"""Coalescing of engine chunks that are already waiting when a stream falls behind.

When the node cannot keep up with an engine (the client reads slowly, or sealing costs more
than the engine takes to produce a token), several chunks are queued at once. Merging a run of
plain content deltas into one chunk gives one event, one encryption and one signature instead
of many, and the result is still one valid OpenAI chunk. A chunk is merged only when nothing
but text would be lost: one choice, no logprobs, tool calls or usage, same id and index.
A stream that keeps up is never delayed: only chunks already queued are merged.
"""

from __future__ import annotations

from typing import Any

Chunk = dict[str, Any]

_CHOICE_KEYS = frozenset({"index", "delta", "text", "logprobs", "finish_reason", "stop_reason"})
_DELTA_KEYS = frozenset({"role", "content"})


def _single_choice(chunk: Chunk) -> dict[str, Any] | None:
    choices = chunk.get("choices")
    if chunk.get("usage") is not None or not isinstance(choices, list) or len(choices) != 1:
        return None
    choice = choices[0]
    if not isinstance(choice, dict) or not _CHOICE_KEYS.issuperset(choice) or choice.get("logprobs") is not None:
        return None
    return choice


def _text(choice: dict[str, Any]) -> tuple[str, str] | None:
    """("delta" | "text", the text) of a choice that carries nothing but text."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        if _DELTA_KEYS.issuperset(delta) and isinstance(delta.get("content", ""), str):
            return "delta", delta.get("content", "")
        return None
    if isinstance(choice.get("text"), str):
        return "text", choice["text"]
    return None


def _merge(first: Chunk, second: Chunk) -> Chunk | None:
    a, b = _single_choice(first), _single_choice(second)
    if a is None or b is None or a.get("finish_reason") is not None:
        return None
    if first.get("id") != second.get("id") or a.get("index") != b.get("index"):
        return None
    text_a, text_b = _text(a), _text(b)
    if text_a is None or text_b is None or text_a[0] != text_b[0]:
        return None
    if text_a[0] == "delta" and "role" in b["delta"]:
        return None
    merged_choice = {**a, "finish_reason": b.get("finish_reason")}
    if "stop_reason" in b:
        merged_choice["stop_reason"] = b["stop_reason"]
    if text_a[0] == "delta":
        merged_choice["delta"] = {**a["delta"], "content": text_a[1] + text_b[1]}
    else:
        merged_choice["text"] = text_a[1] + text_b[1]
    return {**first, "choices": [merged_choice]}


def coalesce(chunks: list[Chunk], limit: int) -> list[Chunk]:
    """Merge runs of mergeable chunks, at most `limit` engine chunks per result."""
    if limit <= 1 or len(chunks) < 2:
        return chunks
    out: list[Chunk] = []
    run = 0
    for chunk in chunks:
        if out and run < limit:
            merged = _merge(out[-1], chunk)
            if merged is not None:
                out[-1] = merged
                run += 1
                continue
        out.append(chunk)
        run = 1
    return out
