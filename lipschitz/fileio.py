"""Safe file writes: atomic replacement, JSON that names its file, advisory locks.

Every file this package writes goes through :func:`atomic_write`: the content goes to a fresh,
uniquely named temporary file beside the target (created with ``O_EXCL``, so a planted symlink
is never followed) and replaces the target in one ``os.replace`` once complete. A crash, a kill
or a full disk leaves the old file (or none), never half of the new one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "DirectoryInUse",
    "atomic_write",
    "atomic_write_text",
    "lock",
    "read_json",
    "read_json_object",
    "remove_stale_temporaries",
]

TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)  # read the process umask (there is no other way) ...
os.umask(_UMASK)  # ... and put it back


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator:
    """A binary file handle whose content replaces ``path`` only once the block completes.

    The temporary file is ``.NAME.XXXXXXXX.tmp`` in the same folder, created exclusively (never
    an existing file or a symlink's target) and flushed to disk before the rename.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # what open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``folder``
    (``.NAME.XXXXXXXX.tmp``); call it only while holding the folder's lock."""
    removed = []
    for path in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if path.is_symlink() or path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(text.encode())


def read_json(path: str | os.PathLike):
    """Parse a JSON file; a missing, unreadable or malformed file is an error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def read_json_object(path: str | os.PathLike) -> dict:
    """:func:`read_json` of a file that must hold a JSON object; anything else names the file."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class DirectoryInUse(RuntimeError):
    """Another process holds the lock of a run or sweep directory."""


@contextmanager
def lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if needed) for the block.

    A second holder, in this process or another, gets :class:`DirectoryInUse` naming the PID
    written into the lock file by the first. The lock dies with its process (``flock``), so a
    killed run never leaves a stale lock behind.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # never write into a link
            raise FileExistsError(f"{path}: not a plain lock file (a link?); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise DirectoryInUse(
                f"{path.parent} is in use by PID {owner} (lock file {path.name}); wait for it "
                "to finish or choose another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
