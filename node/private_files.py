"""Files only their owner may read: the node's token keys and spent-token sets, a client's token
wallet. Written atomically (a temporary file, fsync, rename, fsync of the directory), so a crash
leaves the old content or the new one, never a short file; read without following symbolic
links and refused when group or others may read them or another user owns them."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import TeeNodeError


class PrivateFileError(TeeNodeError, ValueError):
    """A private file that cannot be used as it is; the message names it and says what to do
    (a ValueError, so that `tee-node serve` reports it as a refusal to start)."""


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically, mode 0600 (its directory made 0700 if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """fsync a directory, so that names created or removed in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_private(path: Path, flags: int = os.O_RDONLY, what: str = "file") -> int:
    """A file descriptor for `path`, after the checks of the module docstring (FileNotFoundError
    when it does not exist and `flags` do not create it)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PrivateFileError(f"{what} {path} is a symbolic link, which is not followed: replace it with the file itself") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PrivateFileError(f"{what} {path} is not a regular file: remove it")
        if info.st_uid != os.geteuid():
            raise PrivateFileError(
                f"{what} {path} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}): run as its owner"
            )
        if info.st_mode & 0o077:
            raise PrivateFileError(
                f"{what} {path} is accessible to group or others (mode {stat.S_IMODE(info.st_mode):04o}): run `chmod 600 {path}`"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: Path, what: str = "file") -> bytes:
    """The content of `path` (FileNotFoundError when there is none)."""
    fd = open_private(path, what=what)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()
