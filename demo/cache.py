"""A resumable step cache: each finished step leaves ``<folder>/<step>.json`` holding the settings it ran with and its
result, so a second run reuses every step whose settings, upstream results and output files are unchanged."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantize.atomic import write_atomic

__all__ = ["StepCache", "digest"]


def digest(value: Any) -> str:
    """A short stable fingerprint of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StepCache:
    """Run named steps once; ``run`` returns the cached result when ``key`` matches and ``outputs`` all exist."""

    def __init__(self, folder: str | Path, log: Callable[[str], None] = print) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.reused: list[str] = []

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def cached(self, name: str, key: dict, outputs: tuple[Path, ...] = ()) -> dict | None:
        path = self._path(name)
        if not path.is_file() or not all(Path(p).exists() for p in outputs):
            return None
        try:
            entry = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return entry["result"] if entry.get("key") == digest(key) else None

    def run(self, name: str, key: dict, fn: Callable[[], dict], outputs: tuple[Path, ...] = ()) -> dict:
        """``fn()``'s result, from the cache when possible; a step that raises leaves no cache entry."""
        result = self.cached(name, key, outputs)
        if result is not None:
            self.reused.append(name)
            self.log(f"[{name}] reused (finished in an earlier run)")
            return result
        start = time.perf_counter()
        result = fn()
        result = {**result, "step_seconds": round(time.perf_counter() - start, 1)}
        write_atomic(self._path(name), json.dumps({"key": digest(key), "result": result}, indent=1).encode())
        return result
