"""Files only their owner may read: the simulated TEE's seed, the node's token keys and
spent-token sets, a client's token wallet. Written atomically (a temporary file, fsync, then a
rename or link, fsync of the directory), so a crash leaves the old content or the new one, never
a short file; read without following symbolic links and refused when group or others may read
them or another user owns them.

It lives on the attestation side, which may import nothing of the node's, so that the simulated
TEE and the node share one implementation. Each caller names the exception its refusals raise,
so that they stay in its own error hierarchy.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically, mode 0600 (its directory made 0700 if missing)."""
    _publish(path, data, os.replace)


def create_private(path: Path, data: bytes) -> bool:
    """Create `path` with `data` atomically, mode 0600, unless it exists: False when another
    writer created it first (a link, unlike a rename, never replaces what is there)."""
    try:
        _publish(path, data, os.link)
    except FileExistsError:
        return False
    return True


def _publish(path: Path, data: bytes, move: Callable[[Path, Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        move(temporary, path)
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


def open_private(
    path: Path, flags: int = os.O_RDONLY, what: str = "file", *, error: type[Exception], alternative: str = ""
) -> int:
    """A file descriptor for `path`, after the checks of the module docstring (FileNotFoundError
    when it does not exist and `flags` do not create it). A refusal raises `error` with a message
    that names the file and says what to do; `alternative` (" or ...") adds another remedy to
    those that replace the file or its owner."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(
                f"{what} {path} is a symbolic link, which is not followed: replace it with the file itself{alternative}"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path} is not a regular file: remove it")
        if info.st_uid != os.geteuid():
            raise error(
                f"{what} {path} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}): "
                f"run as its owner{alternative}"
            )
        if info.st_mode & 0o077:
            raise error(
                f"{what} {path} is accessible to group or others (mode {stat.S_IMODE(info.st_mode):04o}): run `chmod 600 {path}`"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: Path, what: str = "file", *, error: type[Exception]) -> bytes:
    """The content of `path` (FileNotFoundError when there is none)."""
    fd = open_private(path, what=what, error=error)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()
