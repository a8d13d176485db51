"""Output paths that cannot destroy a user's data, checked before any work starts.

Rules every command follows:
- a folder is replaced only when ptq4ris wrote it: it carries :data:`MANIFEST` naming the same kind (a calibrated
  model is never replaced by a demo folder, a folder of photos never by anything); a file is replaced only when its
  content is of the kind being written (a ``.pte`` by a ``.pte``, a PNG by a PNG);
- outputs are checked before the work (parent creatable and writable, not a folder where a file is meant, suffix
  right), so a mistake costs a second, not the 20 minutes of an export;
- folders are built under a unique hidden staging name beside the destination and swapped in when complete; a run
  killed mid-way leaves its staging folder behind, and the next run for the same destination removes it (restoring
  the previous result first if the kill fell between the two renames of the swap).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

__all__ = [
    "MANIFEST",
    "check_output_file",
    "check_output_folder",
    "folder_manifest",
    "remove_stale_staging",
    "replace_folder",
    "write_manifest",
]

# Written into every folder ptq4ris creates; its "kind" says which command may replace the folder.
MANIFEST = "ptq4ris-manifest.json"
WRITTEN_BY = "ptq4ris"
# Staging folders: ``.<name>.ptq4ris-staging-<pid>-<random>`` beside the destination (same file system, so the final
# rename is atomic); the pid lets a later run tell a dead run's leftovers from a live run's work.
_STAGING = ".ptq4ris-staging-"


def folder_manifest(path: Path) -> dict | None:
    """The manifest of a folder ptq4ris wrote, or None (no manifest, or not ours)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("written_by") != WRITTEN_BY:
        return None
    return manifest


def write_manifest(folder: Path, kind: str, **fields) -> dict:
    """Mark ``folder`` as a ptq4ris output of ``kind`` (extra ``fields`` are stored beside)."""
    from . import __version__

    manifest = {"written_by": WRITTEN_BY, "kind": kind, "ptq4ris_version": __version__, **fields}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _check_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder (the rest is created)."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: mkdir would fail later
            raise UserError(f"{flag} {path}: {parent} is a broken link; point {flag} elsewhere")
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder; choose another path for {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {parent}; choose a writable folder for {flag}")


def check_output_folder(
    path: str | Path, flag: str, kind: str, recognise: Callable[[Path], bool] | None = None
) -> Path:
    """Check, before any work, that ``path`` may receive a folder of ``kind``: it does not exist, is an empty
    folder, or is a folder ptq4ris wrote as the same kind (``recognise`` decides instead of the manifest for formats
    that own their layout, like ``.mlpackage``). Returns the path; raises :class:`UserError` naming ``flag``."""
    path = Path(path)
    remove_stale_staging(path)
    if path.is_symlink() and not path.exists():
        raise UserError(f"{flag} {path} is a broken link; remove it or choose another path")
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag} {path} is an existing file, not a folder; ptq4ris will not replace it: choose "
                            f"another path for {flag}")  # fmt: skip
        if any(path.iterdir()):
            ours = recognise(path) if recognise else (folder_manifest(path) or {}).get("kind") == kind
            if not ours:
                raise UserError(f"{flag} {path} holds files ptq4ris did not write as a {kind}; ptq4ris will not "
                                f"replace it: choose a new or empty folder for {flag}")  # fmt: skip
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path}: no permission to replace it in {path.parent}; choose a writable folder")
    else:
        _check_parent(path, flag)
    return path


def check_output_file(
    path: str | Path,
    flag: str,
    suffixes: tuple[str, ...],
    recognise: Callable[[Path], bool] | None = None,
    what: str = "file",
) -> Path:
    """Check, before any work, that ``path`` may receive a ``what`` file: its suffix is one of ``suffixes``, it is not
    a folder, and an existing file there is of the same kind (``recognise``) so replacing it destroys nothing else."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a {suffixes[0] if suffixes else ''} file inside it instead")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {path}: name a {' or '.join(suffixes)} file (e.g. {path.with_suffix(suffixes[0])})")
    if path.exists():
        if recognise is not None and not recognise(path):
            raise UserError(f"{flag} {path} exists and is not a {what} ptq4ris wrote; ptq4ris will not replace "
                            f"it: choose another name for {flag}")  # fmt: skip
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path}: no permission to replace it; choose a writable folder for {flag}")
    else:
        _check_parent(path, flag)
    return path


def _staging_folders(path: Path) -> Iterator[Path]:
    prefix = f".{path.name}{_STAGING}"
    try:
        yield from (p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())
    except OSError:
        return


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (its staging folder is then live work, not a leftover)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(path: str | Path) -> None:
    """Remove what killed runs left beside ``path``; if one died between moving the previous result aside and moving
    the new one in, put the previous result back first."""
    path = Path(path)
    for staging in _staging_folders(path):
        try:
            pid = int(staging.name.rsplit(_STAGING, 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and process_alive(pid):
            continue  # another run is writing this destination right now
        previous = staging / "previous"
        if previous.exists() and not path.exists():
            os.replace(previous, path)
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def replace_folder(
    path: str | Path, kind: str | None, recognise: Callable[[Path], bool] | None = None, **manifest_fields
) -> Iterator[Path]:
    """Yield a not-yet-existing staging path for the block to create ``path``'s new folder at; when the block completes, the manifest is
    written (unless ``kind`` is None: a format with its own layout) and the folder replaces ``path``. An existing
    ``path`` must pass :func:`check_output_folder` (checked again here: the caller should also check before its work).
    On any error, or an interrupt, the staging folder is removed and ``path`` is untouched."""
    path = Path(path)
    check_output_folder(path, "output", kind or "package", recognise)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}{_STAGING}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        # Under its own name (writers such as coremltools append a missing .mlpackage suffix), one level below the
        # staging folder so that it can never collide with the previous result moved aside beside it.
        (staging / "new").mkdir()
        new = staging / "new" / path.name
        yield new
        if kind is not None and not (new / MANIFEST).exists():  # the block may write a richer manifest itself
            new.mkdir(exist_ok=True)
            write_manifest(new, kind, **manifest_fields)
        if path.exists():
            os.replace(path, staging / "previous")
        try:
            os.replace(new, path)
        except OSError:
            if (staging / "previous").exists() and not path.exists():
                os.replace(staging / "previous", path)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
