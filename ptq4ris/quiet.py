"""Third-party chatter that says nothing to a ptq4ris user, filtered once, here, at default verbosity (``-v`` shows it
all). Each entry is a logger and the start of messages known to be harmless on the machines ptq4ris targets."""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["KNOWN_CHATTER", "KNOWN_NATIVE_LINES", "quiet_known_chatter", "filter_native_stderr"]

KNOWN_CHATTER: dict[str, tuple[str, ...]] = {
    # torchao's optional CUDA kernels, absent from a CPU install.
    "torchao": ("Failed to load ",),
    # (a filter acts on its own logger only, not on records its children propagate: each module logger is named)
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
    # coremltools: its tested-torch note, its scikit-learn converter, and the macOS-only runtime missing on Linux
    # (conversion works; nothing off macOS runs a Core ML model, which is why the MIL interpreter exists).
    # (coremltools logs everything on its package logger.)
    # Its embedding converter also notes that padding_idx is dropped: it only matters for training.
    "coremltools": ("Torch version", "scikit-learn version", "Failed to load _ML", "Core ML embedding (gather) layer"),
    # torch's deprecation note about torchao registering an Enum as a pytree constant.
    "torch.utils._pytree": ("<enum ",),
}

# Python warnings raised inside third-party code while ptq4ris exports (nothing for a user to change).
# (message, category, module that raises it: "" for any)
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"`torch.jit.script_method` is deprecated", DeprecationWarning, ""),
    (r"(open|read)_text is deprecated", DeprecationWarning, ""),
    (r"__array__ implementation doesn't accept a copy keyword", DeprecationWarning, ""),
    # executorch's Inspector, when the ETDump run that lists kernels keeps no debug buffer (on purpose: see toolchain).
    (r"Output Buffer not found", UserWarning, ""),
    # torch's pytree, while exporting torchao-annotated graphs.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, ""),
    # coremltools' constant folding casts the -1e4 attention-mask constants and the float32 range bounds to float16;
    # the package's results are checked against the simulation (MIL interpreter parity), not taken on trust.
    (r"overflow encountered in cast", RuntimeWarning, r"coremltools\."),
)

# Lines that native code writes straight to the stderr file descriptor, where no Python filter sees them: the
# ExecuTorch runtime's CPU probe (on x86 and in containers it cannot read ARM CPU identification files, which is
# expected) and its note that the thread pool was resized (the benchmarks do it on purpose).
KNOWN_NATIVE_LINES: tuple[bytes, ...] = (b"[cpuinfo_utils.cpp:", b"[threadpool.cpp:")


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
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextmanager
def filter_native_stderr() -> Iterator[None]:
    """Route the stderr file descriptor through a pipe for the duration of the block and drop the lines native
    libraries are known to print harmlessly (:data:`KNOWN_NATIVE_LINES`); everything else passes unchanged and in
    order. Child processes inherit the filtered descriptor."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced (e.g. captured in tests): nothing to filter
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)

    def pump() -> None:
        # Lines are passed on as they arrive, not held to their newline (progress bars redraw with carriage returns):
        # a line is held only while its first bytes could still be the start of a known native line.
        line, verdict = b"", None  # verdict: None undecided, True pass, False drop
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                while chunk:
                    ends = [i for i in (chunk.find(b"\n"), chunk.find(b"\r")) if i >= 0]
                    end = min(ends) + 1 if ends else len(chunk)
                    piece, chunk = chunk[:end], chunk[end:]
                    if verdict is None:
                        line += piece
                        if line.startswith(KNOWN_NATIVE_LINES):
                            verdict = False
                        elif not _could_be_known(line) or piece.endswith((b"\n", b"\r")):
                            verdict = True
                            os.write(saved, line)
                    elif verdict:
                        os.write(saved, piece)
                    if piece.endswith((b"\n", b"\r")):
                        line, verdict = b"", None
            if verdict is None and line:
                os.write(saved, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)  # closes the pipe's last write end held by this process: the pump drains and ends
        thread.join(timeout=5)
        os.close(saved)


def _could_be_known(start: bytes) -> bool:
    """Whether a line beginning with ``start`` (shorter than the prefixes) may still turn out to be a known one."""
    return any(prefix.startswith(start) for prefix in KNOWN_NATIVE_LINES if len(start) < len(prefix))
