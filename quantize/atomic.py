"""Atomic writes: a reader sees the old file or folder or the complete new one, never half of one.

Everything is written under a hidden temporary name in the destination's folder (same file system) and renamed into
place when complete; on any error the temporary is removed and the old content stays.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_file", "atomic_folder", "write_atomic"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s content to; renamed to ``path`` when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yields a not-yet-existing temporary path for the block to create ``path``'s folder at; it then replaces
    ``path`` (an existing folder is moved aside first and removed once the new one is in place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        new = staging / path.name
        yield new
        if path.exists():
            os.replace(path, staging / "old")
        try:
            os.replace(new, path)
        except BaseException:
            if (staging / "old").exists() and not path.exists():
                os.replace(staging / "old", path)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
