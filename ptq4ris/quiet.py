"""Third-party chatter that says nothing to a ptq4ris user, filtered once, here, at default verbosity (``-v`` shows it
all). Each entry is a logger and the start of messages known to be harmless on the machines ptq4ris targets."""

from __future__ import annotations

import logging
import warnings

__all__ = ["KNOWN_CHATTER", "quiet_known_chatter"]

KNOWN_CHATTER: dict[str, tuple[str, ...]] = {
    # torchao's optional CUDA kernels, absent from a CPU install.
    "torchao": ("Failed to load ",),
    # coremltools: its tested-torch note, its scikit-learn converter, and the macOS-only runtime missing on Linux
    # (conversion works; nothing off macOS runs a Core ML model, which is why the MIL interpreter exists).
    # (coremltools logs everything on its package logger.)
    "coremltools": ("Torch version", "scikit-learn version", "Failed to load _ML"),
    # torch's deprecation note about torchao registering an Enum as a pytree constant.
    "torch.utils._pytree": ("<enum ",),
}

# Python warnings raised inside third-party code while ptq4ris exports (nothing for a user to change).
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`torch.jit.script_method` is deprecated", DeprecationWarning),
    (r"(open|read)_text is deprecated", DeprecationWarning),
    (r"__array__ implementation doesn't accept a copy keyword", DeprecationWarning),
)


class _DropKnown(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes) and not record.getMessage().startswith(self.prefixes)


def quiet_known_chatter() -> None:
    """Install the filters (before the libraries are imported: their loggers are the ones created here)."""
    for name, prefixes in KNOWN_CHATTER.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(prefixes))
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
