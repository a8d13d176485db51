"""Read weight files a user handed us, turning every way they can be wrong into one :class:`UserError` line.

safetensors raises its own ``SafetensorError`` (not a ``ValueError``; a Rust panic would even be a ``BaseException``)
and ``torch.load`` raises ``RuntimeError``, ``UnpicklingError``, ``EOFError``, ``KeyError``... depending on how the file
is broken, with messages that span several lines. Here each becomes one line naming the file and the fix:

- :func:`read_safetensors` — a ``.safetensors`` file as a dict of tensors (``model.safetensors`` of a calibrated folder,
  a checkpoint, a transformers model directory's weights);
- :func:`read_torch_file` — a ``torch.save`` file opened with ``weights_only=True`` (plus allow-listed globals).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .errors import MissingFileError, UserError

__all__ = ["one_line", "read_safetensors", "read_torch_file"]

_MAX_DETAIL = 200


def one_line(error: BaseException, limit: int = _MAX_DETAIL) -> str:
    """``error``'s message squeezed onto one short line (third-party messages often span several)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_file(path: Path, what: str, error: type[UserError]) -> None:
    if path.is_dir():
        raise error(f"{path} is a folder, not a {what} file: give the file itself")
    if not path.exists():
        raise MissingFileError(f"{what} file not found: {path}")
    if not path.is_file():
        raise error(f"{path} is not a regular file: give a {what} file")


def read_safetensors(
    path: str | Path, *, fix: str = "re-download or re-save it", error: type[UserError] = UserError
) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, on the CPU.

    Args:
        path: the file.
        fix: what the user should do when it cannot be read (the end of the one-line message).
        error: the :class:`UserError` subclass to raise (e.g. ``QuantizedArtifactError`` for a calibrated folder).

    Raises:
        MissingFileError: no such file. ``error``: a folder, an empty, truncated or corrupt file (header too small or
            too large, invalid JSON, data not covering the declared tensors), an unreadable file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    _check_file(path, "safetensors", error)
    try:
        return load_file(str(path))
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as e:  # SafetensorError, OSError, and a Rust panic (pyo3 PanicException is a BaseException)
        raise error(f"{path} is not a readable safetensors file ({one_line(e)}): {fix}") from e


def _unpickling_detail(e: BaseException) -> str:
    """What torch's multi-paragraph weights-only refusal actually says (``Unsupported global: GLOBAL x.Y ...``)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    return one_line(text or e)


def read_torch_file(
    path: str | Path,
    *,
    allowed_globals: Iterable[Any] = (),
    fix: str = "re-save it as a state dict (torch.save(model.state_dict(), ...)) or a .safetensors file",
    error: type[UserError] = UserError,
) -> Any:
    """A ``torch.save`` file loaded with ``weights_only=True`` on the CPU; ``allowed_globals`` are allow-listed
    (e.g. ``argparse.Namespace`` for official LAVT files).

    Raises:
        MissingFileError: no such file. ``error``: a folder, an empty file, a file that is neither a zip archive nor a
            pickle, a truncated archive, a pickle of objects other than tensors and the allowed globals.
    """
    path = Path(path)
    _check_file(path, "PyTorch checkpoint", error)
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise error(f"cannot read {path} ({one_line(e)}): check its permissions") from e
    if not head:
        raise error(f"{path} could not be read as a PyTorch checkpoint: the file is empty; {fix}")
    if not head.startswith(b"PK") and head[:1] != b"\x80":  # torch.save writes a zip archive, or a legacy pickle
        raise error(
            f"{path} could not be read as a PyTorch checkpoint: it is neither a zip archive nor a pickle; {fix}"
        )
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except pickle.UnpicklingError as e:
        raise error(
            f"{path} could not be read as a PyTorch checkpoint of plain tensors ({_unpickling_detail(e)}): other "
            f"objects are not unpickled, as that could run arbitrary code; {fix}"
        ) from e
    except (EOFError, zipfile.BadZipFile, RuntimeError) as e:  # RuntimeError: PytorchStreamReader, a damaged zip
        raise error(
            f"{path} could not be read as a PyTorch checkpoint: truncated or corrupt ({type(e).__name__}: "
            f"{one_line(e)}); re-download it, or {fix}"
        ) from e
    except Exception as e:  # KeyError, ValueError, ... from a pickle stream that is not what torch.save writes
        raise error(
            f"{path} could not be read as a PyTorch checkpoint ({type(e).__name__}: {one_line(e)}); {fix}"
        ) from e
