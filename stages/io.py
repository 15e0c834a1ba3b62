"""Crash-safe file output: temp file in the same folder, fsync, then atomic rename."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"
# No space left, file too large (RLIMIT_FSIZE, filesystem limit), quota exceeded.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_DISK_FULL_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or a size limit) is full; pyarrow loses the errno."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in DISK_FULL_ERRNOS or any(text in str(exc) for text in _DISK_FULL_TEXTS)


def tmp_name(path: Path) -> Path:
    """The temp name used while ``path`` is written; never read as a finished file."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path to write; on success fsync it and rename it onto ``path``.

    On any exception the temp file is removed and ``path`` is left as it was, so a
    reader sees either the old complete file or the new complete file, never a part.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove_stale_temps(folder: str | os.PathLike[str], recursive: bool = True) -> int:
    """Delete temp files a killed run left under ``folder`` (or only in it); how many."""
    root = Path(folder)
    if not root.exists():
        return 0
    removed = 0
    pattern = f"*{TMP_MARK}*"
    for tmp in root.rglob(pattern) if recursive else root.glob(pattern):
        if tmp.is_file() and tmp.name.startswith("."):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    return sha256_text(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str))
