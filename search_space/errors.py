"""UserError: a mistake in what the user gave (an option, a file, a name), as opposed to a bug.

The CLI turns one into a single line that names the field or value, and a nonzero exit code,
never a traceback. Raise it (or a subclass) before anything is created on disk.
"""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """A user's mistake; `str(e)` is one line naming the field or value and what is allowed."""


def typed(d: dict, key: str, kind: type | tuple, where: str, default: Any = ...,
          error: type[UserError] = UserError) -> Any:
    """`d[key]` if it has the kind asked for (an int stands for a float, a bool never for a number),
    `default` if absent; otherwise `error`, one line naming `where.key`, what was wanted and what came."""
    if key not in d:
        if default is ...:
            raise error(f"{where}.{key}: missing (required)")
        return default
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise error(f"{where}.{key}: expected {names}, got {type(value).__name__} {value!r}")
    return value
