"""Wire encodings shared by the node, the client and the attestation verifier.

PROTOCOL.md's canonical JSON lives here once: receipts, the report_data binding of GPU
evidence and the config digest all hash it.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, raw UTF-8 (PROTOCOL.md part B, "Canonical JSON")."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
