"""UserError: a mistake in what the user gave (an option, a file, a name), as opposed to a bug.

The CLI turns one into a single line that names the field or value, and a nonzero exit code,
never a traceback. Raise it (or a subclass) before anything is created on disk.
"""

from __future__ import annotations


class UserError(ValueError):
    """A user's mistake; `str(e)` is one line naming the field or value and what is allowed."""
