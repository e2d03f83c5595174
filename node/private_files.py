"""The node's and the client's owner-only files (token keys, spent-token sets, the token wallet):
`attestation.private_files`, whose refusals here raise `PrivateFileError`."""

from __future__ import annotations

import os
from pathlib import Path

from attestation import private_files
from attestation.private_files import sync_directory, write_private

from .errors import TeeNodeError

__all__ = ["PrivateFileError", "open_private", "read_private", "sync_directory", "write_private"]


class PrivateFileError(TeeNodeError, ValueError):
    """A private file that cannot be used as it is; the message names it and says what to do
    (a ValueError, so that `tee-node serve` reports it as a refusal to start)."""


def open_private(path: Path, flags: int = os.O_RDONLY, what: str = "file") -> int:
    return private_files.open_private(path, flags, what, error=PrivateFileError)


def read_private(path: Path, what: str = "file") -> bytes:
    return private_files.read_private(path, what, error=PrivateFileError)
