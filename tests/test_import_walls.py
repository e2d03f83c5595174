"""The architecture's import walls (docs/architecture.md, pyproject.toml [tool.importlinter]):
kept by this tree, and an import that breaks one fails `make test` before any test runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
LINT_IMPORTS = VENV / "bin" / "lint-imports"

# A forbidden import added to a module, and the contract it must break.
BREACHES = [
    ("node/envelope.py", "import node.server.serving", "envelope (sans-I/O protocol logic) never imports"),
    ("node/engine/echo.py", "from node import keys", "engines never import the envelope or the keys"),
    ("attestation/binding.py", "import aiohttp", "attestation never imports aiohttp"),
    ("attestation/producers/nvml.py", "import node.wire", "attestation never imports aiohttp or anything of the node's"),
    ("node/client/types.py", "from node.server import app", "the client never imports the server"),
    ("node/ohttp/bhttp.py", "import aiohttp", "Oblivious HTTP (sans-I/O protocol logic) never imports"),
    # The two cycles once untied: even an import for type checking only counts.
    ("attestation/intel.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from attestation.tdx import TdxQuote", "TDX quote verification uses Intel's collateral checks"),
    ("node/cli_chat.py", "from node.cli_client import run_chat", "chat CLI: the one-shot chat over the session"),
]


def checkout_copy(tmp_path: Path) -> Path:
    """The files `make test` reads, without any venv (it is passed in)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("node", "attestation"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "Makefile"):
        shutil.copy2(REPO / name, copy / name)
    return copy


def make_test(copy: Path) -> subprocess.CompletedProcess:
    """`make test` in `copy` with this venv; set-up is taken as done (`-o`: never remake)."""
    venv, atoma = str(VENV), str(REPO / ".venv-atoma")
    stamp, atoma_stamp = f"{venv}/.tee-node-cpu", f"{atoma}/.atoma-sdk-set-up"
    return subprocess.run(
        ["make", "-C", str(copy), "test", f"VENV={venv}", f"ATOMA_VENV={atoma}", "EXTRA=cpu",
         f"STAMP={stamp}", f"ATOMA_STAMP={atoma_stamp}", "-o", stamp, "-o", atoma_stamp],
        capture_output=True, text=True, timeout=300,
    )


def test_this_tree_keeps_every_wall():
    out = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert ", 0 broken." in out.stdout


@pytest.mark.parametrize(("module", "line", "contract"), BREACHES, ids=[b[0] for b in BREACHES])
def test_an_import_through_a_wall_fails_make_test(tmp_path, module, line, contract):
    copy = checkout_copy(tmp_path)
    path = copy / module
    path.write_text(path.read_text() + f"\n{line}  # breaks a wall\n")
    out = make_test(copy)
    assert out.returncode != 0
    assert f"{contract}" in out.stdout and "BROKEN" in out.stdout, out.stdout + out.stderr
    assert "-m pytest" not in out.stdout  # refused before any test ran
