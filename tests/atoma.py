"""Run the real atoma-sdk (own venv) through `tests/atoma_driver.py` from tests.

    from tests.atoma import run_driver
    sealed = run_driver(["encrypt"], {"node_public_key": key_b64, "model": "m"})
    lines = run_driver_lines(["chat", "--url", url, "--stream"])

`TEE_NODE_ATOMA_PYTHON` overrides the interpreter (default `<repo>/.venv-atoma/bin/python`).
Tests that drive the SDK use the `atoma_sdk` fixture: without that venv they fail, never skip
(`make setup` rebuilds it).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "atoma_driver.py"
ATOMA_PYTHON = os.environ.get("TEE_NODE_ATOMA_PYTHON") or str(REPO / ".venv-atoma" / "bin" / "python")


class AtomaDriverError(RuntimeError):
    """The driver crashed, timed out or printed something that is not JSON."""


def atoma_available() -> bool:
    return Path(ATOMA_PYTHON).exists()


@pytest.fixture(scope="session")
def atoma_sdk() -> str:
    """The interpreter of the real atoma-sdk's venv; its absence fails the test that needs it."""
    if not atoma_available():
        pytest.fail(f"the atoma-sdk venv is missing ({ATOMA_PYTHON}): run `make setup`, which rebuilds it", pytrace=False)
    return ATOMA_PYTHON


def _run(args: list[str], stdin: dict | None, timeout: float, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    cmd = [ATOMA_PYTHON, str(DRIVER), *map(str, args)]
    try:
        proc = subprocess.run(
            cmd,
            input=json.dumps(stdin) if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            # The driver must see only the SDK's venv, never this one's packages.
            env={**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}, **(env or {})},
        )
    except subprocess.TimeoutExpired as exc:
        raise AtomaDriverError(f"atoma driver {args[:1]} timed out after {timeout}s; stderr:\n{exc.stderr}") from None
    if proc.returncode != 0:
        raise AtomaDriverError(
            f"atoma driver {' '.join(map(str, args))} exited {proc.returncode}; stderr:\n{proc.stderr.strip()}"
        )
    try:
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    except json.JSONDecodeError:
        raise AtomaDriverError(f"atoma driver printed non-JSON:\n{proc.stdout}\nstderr:\n{proc.stderr}") from None
    if not lines:
        raise AtomaDriverError(f"atoma driver printed nothing; stderr:\n{proc.stderr.strip()}")
    return lines


def run_driver(args: list[str], stdin: dict | None = None, timeout: float = 60.0) -> dict | list[dict]:
    """Run the driver; one JSON object when it printed one line, else the list of lines."""
    lines = _run(args, stdin, timeout)
    return lines[0] if len(lines) == 1 else lines


def run_driver_lines(
    args: list[str], stdin: dict | None = None, timeout: float = 60.0, env: dict[str, str] | None = None
) -> list[dict]:
    """Run the driver and always return its JSON lines (for streams: chunks then the summary);
    `env` adds variables to the driver's environment."""
    return _run(args, stdin, timeout, env)
