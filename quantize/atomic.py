"""Atomic writes: a reader sees the old file or folder or the complete new one, never half of one.

Everything is written under a hidden temporary name in the destination's folder (same file system) and renamed into
place when complete; on any error the temporary is removed and the old content stays.
"""

from __future__ import annotations

import os
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


def atomic_folder(path: str | Path, kind: str | None = None, recognise=None, **manifest_fields):
    """Write a folder atomically and safely: see :func:`quantize.outputs.replace_folder` (yields a not-yet-existing
    path to create the folder at; an existing ``path`` is replaced only if ptq4ris wrote it as ``kind``)."""
    from .outputs import replace_folder

    return replace_folder(path, kind, recognise, **manifest_fields)
