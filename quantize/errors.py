"""The one exception type for a user's mistake.

Every layer raises :class:`UserError` (or a subclass) when the input it was handed is wrong: a file that is missing,
corrupt or of the wrong kind, a flag out of range, a folder it must not overwrite. The message is one line that names
the file or flag and says how to fix it. The command line turns it into exit status 2 without a traceback; anything
else that escapes is a bug and keeps its traceback (:mod:`ptq4ris.errors`).

``UserError`` derives from ``ValueError`` so that library callers that already catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["MissingFileError", "UserError"]


class UserError(ValueError):
    """A mistake in what the user gave us (a file, a flag, a path), described in one line with its fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (also a ``FileNotFoundError`` for callers that catch that)."""
