"""Canonical JSON: sorted keys, no spaces, raw UTF-8 (docs/protocol.md, "Canonical JSON").

Receipts, the report_data binding and the config digest all hash it. It lives in the attestation
package (the lower layer) so the verifier needs nothing of the node's; `node.wire` re-exports it.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["canonical_json"]


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no separators but `,` and `:`, raw UTF-8.

    The definition is the `json.dumps` call at the end. orjson writes the same bytes for
    objects, arrays, strings, 64-bit integers, booleans and null, so it serves those (a
    receipt, one per response: ~4 us with the float check instead of ~8 us); floats (which it
    formats differently) and anything it refuses take the reference path.
    """
    if _without_floats(obj):
        try:
            return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits, a lone surrogate
            pass
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _without_floats(obj: Any) -> bool:
    """Only dicts with str keys, lists, str, int, bool and None (exact types, no subclasses)."""
    pending = [obj]
    while pending:  # a loop, not recursion: it runs on every receipt
        item = pending.pop()
        kind = type(item)
        if kind is dict:
            for key in item:
                if type(key) is not str:
                    return False
            pending.extend(item.values())
        elif kind is list:
            pending.extend(item)
        elif not (kind is str or kind is int or kind is bool or item is None):
            return False
    return True
