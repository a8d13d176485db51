"""The command line's one error policy.

- A user's mistake (:class:`quantize.errors.UserError`, argparse's complaints, an ``OSError`` on a path the user
  named: no permission, disk full, read-only file system) exits 2 with one line that names the file or flag and the
  fix. No traceback unless asked for with ``--debug`` or ``PTQ4RIS_DEBUG=1``.
- An interrupt (Ctrl-C, SIGTERM) exits 130 (143) with one line; partial outputs were removed on the way out by the
  writers' own cleanup (:mod:`quantize.outputs`), so the previous result stays usable.
- Anything else is a bug in ptq4ris: its traceback is printed, with a line saying so, and the exit status is 1.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from collections.abc import Callable

from quantize.errors import UserError

__all__ = ["DEBUG_ENV", "debug_requested", "one_line", "run_guarded"]

DEBUG_ENV = "PTQ4RIS_DEBUG"
# errno values that describe the user's environment (a path, a disk), not a defect of ptq4ris.
_ENVIRONMENT_ERRNOS = {
    errno.EACCES: "no permission",
    errno.EPERM: "not permitted",
    errno.ENOSPC: "no space left on the device; free some space",
    errno.EDQUOT: "disk quota exceeded; free some space",
    errno.EROFS: "read-only file system; choose a writable folder",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, a file was expected",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.ENOMEM: "out of memory",
}


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(message: str) -> str:
    """Messages are one line: newlines inside a message (third-party text) are folded."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _terminate(signum, frame):  # SIGTERM takes the same way out as Ctrl-C: cleanup runs, then exit 143
    raise SystemExit(128 + signum)


def run_guarded(command: Callable[[], int], debug: bool, prog: str = "ptq4ris") -> int:
    """Run ``command`` under the policy above and return the exit status."""
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(command() or 0)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted; outputs of this run were not completed, earlier results are untouched",
              file=sys.stderr)  # fmt: skip
        return 130
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            return _bug(prog)
        if debug:
            traceback.print_exc()
        where = e.filename if e.filename is not None else ""
        print(f"{prog}: error: {where}{': ' if where else ''}{_ENVIRONMENT_ERRNOS[e.errno]} ({e.strerror})",
              file=sys.stderr)  # fmt: skip
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory; use a smaller --batch-size / --chunk-size or a larger machine",
              file=sys.stderr)  # fmt: skip
        return 2
    except Exception:
        return _bug(prog)


def _bug(prog: str) -> int:
    traceback.print_exc()
    print(f"{prog}: this is a bug in ptq4ris, not a mistake in your input: please report it with the command and "
          "the traceback above", file=sys.stderr)  # fmt: skip
    return 1
