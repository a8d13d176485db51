"""``--device``: a torch device checked before any work starts, so that a machine without CUDA says so in one line
instead of an assertion deep inside torch when the first tensor moves."""

from __future__ import annotations

import torch

from .errors import UserError

__all__ = ["resolve_device"]

_KNOWN = ("cpu", "cuda", "cuda:N", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None, flag: str = "--device") -> torch.device:
    """The torch device ``name`` names, refused with a :class:`UserError` naming ``flag`` when this machine cannot use
    it: an unknown device string, ``cuda`` without a usable CUDA, ``cuda:N`` beyond the GPUs there are, ``mps`` off
    Apple silicon. ``None`` means the CPU."""
    if name is None:
        return torch.device("cpu")
    if isinstance(name, torch.device):
        device = name
    else:
        text = str(name).strip()
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError, TypeError) as e:
            raise UserError(
                f"{flag} {name!r} is not a device torch knows: use {', '.join(_KNOWN)} (e.g. {flag} cpu)"
            ) from e
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"{flag} {name}: CUDA is not available ({why}): use {flag} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(
                f"{flag} {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}): "
                f"use {flag} cuda:0 or {flag} cpu"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise UserError(f"{flag} {name}: MPS (Apple silicon GPU) is not available here: use {flag} cpu")
        return device
    backend = getattr(torch, device.type, None)  # xpu and other accelerators with an is_available()
    available = getattr(backend, "is_available", None)
    if callable(available) and available():
        return device
    raise UserError(f"{flag} {name}: device type {device.type!r} is not usable here: use {flag} cpu")
