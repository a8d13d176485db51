"""Which kind of file is at a path, read from a few bytes (never by native code). Output paths are replaced only by
a file of their own kind: a ``.pte`` by a ``.pte``, a PNG by a PNG, never a user's file that happens to carry the
name."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["is_json_object", "is_mlpackage", "is_png", "is_pte"]


def _head(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def is_pte(path: Path) -> bool:
    """An ExecuTorch program: a flatbuffer whose file identifier (bytes 4..8) is ``ET`` + a schema version."""
    head = _head(path, 8)
    return len(head) == 8 and head[4:6] == b"ET"


def is_png(path: Path) -> bool:
    return _head(path, 8) == b"\x89PNG\r\n\x1a\n"


def is_json_object(path: Path) -> bool:
    """A JSON report ptq4ris wrote (an object); a user's other JSON file would be replaced too, so it must at least
    be JSON: anything else (a note, a spreadsheet) is refused."""
    try:
        if path.stat().st_size > 64 << 20:
            return False
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def is_mlpackage(path: Path) -> bool:
    """A Core ML package ptq4ris exported: a package folder whose model carries ptq4ris's metadata key."""
    manifest = path / "Manifest.json"
    if not manifest.is_file():
        return False
    model = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    try:
        # An ML program keeps its weights apart; the spec itself is small enough to scan for our metadata key.
        return model.stat().st_size < (256 << 20) and b"ptq4ris.stage" in model.read_bytes()
    except OSError:
        return False
