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


def _text_choice(chunk: Chunk) -> tuple[dict[str, Any], str, str] | None:
    """(the choice, "delta" or "text", its text) of a chunk that carries nothing but text."""
    choices = chunk.get("choices")
    if chunk.get("usage") is not None or not isinstance(choices, list) or len(choices) != 1:
        return None
    choice = choices[0]
    if not isinstance(choice, dict) or not _CHOICE_KEYS.issuperset(choice) or choice.get("logprobs") is not None:
        return None
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content", "")
        if _DELTA_KEYS.issuperset(delta) and isinstance(content, str):
            return choice, "delta", content
        return None
    text = choice.get("text")
    return (choice, "text", text) if isinstance(text, str) else None


def _continues(chunk: Chunk, head: Chunk, head_choice: dict[str, Any], field: str) -> tuple[dict[str, Any], str] | None:
    """(choice, text) when `chunk` continues the run started by `head`."""
    found = _text_choice(chunk)
    if found is None or chunk.get("id") != head.get("id"):
        return None
    choice, kind, text = found
    if kind != field or choice.get("index") != head_choice.get("index") or (kind == "delta" and "role" in choice["delta"]):
        return None
    return choice, text


def coalesce(chunks: list[Chunk], limit: int) -> list[Chunk]:
    """Merge runs of text-only chunks, at most `limit` engine chunks per result."""
    if limit <= 1 or len(chunks) < 2:
        return chunks
    out: list[Chunk] = []
    i, n = 0, len(chunks)
    while i < n:
        head = chunks[i]
        found = _text_choice(head)
        j = i + 1
        if found is not None:
            head_choice, field, text = found
            texts, last = [text], head_choice
            while j < n and j - i < limit and last.get("finish_reason") is None:
                continued = _continues(chunks[j], head, head_choice, field)
                if continued is None:
                    break
                last = continued[0]
                texts.append(continued[1])
                j += 1
        if j == i + 1:
            out.append(head)
        else:
            merged = {**head_choice, "finish_reason": last.get("finish_reason")}
            if "stop_reason" in last:
                merged["stop_reason"] = last["stop_reason"]
            if field == "delta":
                merged["delta"] = {**head_choice["delta"], "content": "".join(texts)}
            else:
                merged["text"] = "".join(texts)
            out.append({**head, "choices": [merged]})
        i = j
    return out
