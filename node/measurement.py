"""The code measurement a simulated TEE reports as MRTD (SHA-384 of code and config).

On real hardware MRTD is the firmware's measurement of the VM image; in simulation the node
measures what it runs itself: every Python source of `node/` and `attestation/` (path and
content, in a fixed order) and the config digest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import attestation

import node

PACKAGES = (Path(node.__file__).resolve().parent, Path(attestation.__file__).resolve().parent)


def code_measurement(config_digest: bytes) -> bytes:
    digest = hashlib.sha384(b"tee-node/code-measurement/v1\x00")
    for package in PACKAGES:
        for path in sorted(package.rglob("*.py")):
            relative = path.relative_to(package.parent).as_posix().encode()
            content = path.read_bytes()
            digest.update(len(relative).to_bytes(4, "little") + relative)
            digest.update(len(content).to_bytes(8, "little") + content)
    digest.update(config_digest)
    return digest.digest()
