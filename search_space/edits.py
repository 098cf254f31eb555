"""SEARCH/REPLACE edits: the one change format shared by ideas, the LLM and `--patch` files.

    path/to/file.py
    <<<<<<< SEARCH
    exact lines to find
    =======
    lines to put instead
    >>>>>>> REPLACE

Every block must match exactly once; an edit that does not apply is an error with a reason,
never silently skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEARCH, DIVIDER, REPLACE = "<<<<<<< SEARCH", "=======", ">>>>>>> REPLACE"


class EditError(ValueError):
    """An edit that cannot be parsed or applied; the message is written for the proposer."""


@dataclass(frozen=True)
class Edit:
    path: str
    search: str
    replace: str

    def render(self) -> str:
        return f"{self.path}\n{SEARCH}\n{self.search}\n{DIVIDER}\n{self.replace}\n{REPLACE}\n"


def looks_like_edits(text: str) -> bool:
    return SEARCH in text and REPLACE in text


def parse_edits(text: str) -> list[Edit]:
    """Parse SEARCH/REPLACE blocks; the line before each block names its file."""
    lines = text.splitlines()
    edits: list[Edit] = []
    i = 0
    path: str | None = None
    while i < len(lines):
        line = lines[i]
        if line.strip() == SEARCH:
            if not path:
                raise EditError(f"line {i + 1}: SEARCH block with no file path on the line before it")
            start = i
            try:
                mid = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == DIVIDER)
                end = next(j for j in range(mid + 1, len(lines)) if lines[j].strip() == REPLACE)
            except StopIteration:
                raise EditError(f"line {start + 1}: SEARCH block for {path} is not closed "
                                f"(needs '{DIVIDER}' then '{REPLACE}')") from None
            search = "\n".join(lines[i + 1: mid])
            if not search.strip():
                raise EditError(f"line {start + 1}: empty SEARCH text for {path}; quote the lines to replace")
            edits.append(Edit(path, search, "\n".join(lines[mid + 1: end])))
            i = end + 1
            continue
        stripped = line.strip().strip("`").strip()
        if stripped and not stripped.startswith("#") and re.fullmatch(r"[\w./\-]+", stripped):
            path = stripped
        i += 1
    if not edits:
        raise EditError(f"no SEARCH/REPLACE blocks found (expected '{SEARCH}' ... '{REPLACE}')")
    return edits


def apply_edits(files: dict[str, str], edits: list[Edit]) -> dict[str, str]:
    """Apply edits in order to `files` (path -> text); returns the changed files only."""
    out: dict[str, str] = {}
    for n, edit in enumerate(edits, 1):
        text = out.get(edit.path, files.get(edit.path))
        if text is None:
            raise EditError(f"edit {n}: file {edit.path} does not exist")
        count = text.count(edit.search)
        if count == 0:
            hint = _closest_line(text, edit.search)
            raise EditError(f"edit {n}: SEARCH text not found in {edit.path}" + (f"; closest line: {hint!r}" if hint
                                                                                  else ""))
        if count > 1:
            raise EditError(f"edit {n}: SEARCH text occurs {count} times in {edit.path}; quote more lines "
                            "so it matches exactly once")
        out[edit.path] = text.replace(edit.search, edit.replace, 1)
    return out


def _closest_line(text: str, search: str) -> str:
    first = next((line.strip() for line in search.splitlines() if line.strip()), "")
    if not first:
        return ""
    import difflib

    candidates = [line.strip() for line in text.splitlines() if line.strip()]
    match = difflib.get_close_matches(first, candidates, n=1, cutoff=0.6)
    return match[0] if match else ""
