"""Progress bars that leave the terminal clean when the work stops early."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(enabled: bool, **kwargs) -> Iterator[tqdm]:
    """A tqdm bar (a silent one when ``enabled`` is false). On an error or Ctrl-C the bar is erased before the
    exception travels on, so the CLI's one-line message is the last line on the terminal rather than a bar
    redrawn after it when the interpreter collects it."""
    bar = tqdm(disable=not enabled, **kwargs)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        bar.close()
        raise
    bar.close()
