"""Where dataset files come from: a data directory, the user's cache, or a verified download.

A data directory (``--data-dir`` or ``LIPSCHITZ_DATA_DIR``) is laid out like ``../shared/data``:
``tinyshakespeare/input.txt``, ``cifar10/cifar10.npz``, ... Downloads go to
``$LIPSCHITZ_CACHE_DIR`` (default ``~/.cache/lipschitz``) under the same relative path, written
to a temporary file and renamed only once their sha256 matches, so a cache never holds a
partial or corrupted file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


class DatasetUnavailable(FileNotFoundError):
    """No verified copy of a dataset file could be found or downloaded."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The explicit data directory, else ``$LIPSCHITZ_DATA_DIR``, else None."""
    chosen = data_dir if data_dir is not None else os.environ.get("LIPSCHITZ_DATA_DIR")
    return Path(chosen).expanduser() if chosen else None


def cache_dir() -> Path:
    return Path(os.environ.get("LIPSCHITZ_CACHE_DIR", "~/.cache/lipschitz")).expanduser()


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def md5_of(path: Path) -> str:
    """md5 of a file: the only checksum some canonical datasets publish (CIFAR-10, MNIST)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def _verified(path: Path, sha256: str | None, check: Callable[[Path], None] | None) -> bool:
    if not path.is_file():
        return False
    if sha256 is not None:
        got = sha256_of(path)
        if got != sha256:
            raise ValueError(f"{path}: sha256 {got} does not match the expected {sha256}")
    if check is not None:
        check(path)
    return True


def fetch(
    relpath: str,
    url: str | None,
    sha256: str | None,
    data_dir: str | os.PathLike | None = None,
    timeout_s: float = 30.0,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Path to a verified copy of ``relpath``: from the data directory, the cache, or ``url``.

    ``check(path)`` is an extra verification that raises ValueError (e.g. an md5, or a checksum
    of decompressed content). A file that exists but fails a check is an error (never
    silently replaced).
    """
    looked = []
    root = resolve_data_dir(data_dir)
    if root is not None:
        candidate = root / relpath
        looked.append(str(candidate))
        if _verified(candidate, sha256, check):
            return candidate
    cached = cache_dir() / relpath
    looked.append(str(cached))
    if _verified(cached, sha256, check):
        return cached
    if url is None:
        raise DatasetUnavailable(f"{relpath}: not found (looked in {', '.join(looked)})")
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cached.parent, prefix=cached.name + ".part")
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as tmp, urllib.request.urlopen(url, timeout=timeout_s) as response:
            shutil.copyfileobj(response, tmp)
        got = sha256_of(tmp_path)
        if sha256 is not None and got != sha256:
            raise ValueError(
                f"download of {url}: sha256 {got} does not match the expected {sha256}"
            )
        if check is not None:
            check(tmp_path)
        os.replace(tmp_path, cached)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DatasetUnavailable(
            f"{relpath}: not found (looked in {', '.join(looked)}) and the download from {url} "
            f"failed ({err}). Put a copy there or pass --data-dir / set LIPSCHITZ_DATA_DIR."
        ) from err
    finally:
        tmp_path.unlink(missing_ok=True)
    return cached
