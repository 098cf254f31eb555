"""What a candidate may change: editable globs, frozen globs, EVOLVE-BLOCK markers, safe paths."""

from __future__ import annotations

import fnmatch
from pathlib import PurePosixPath

from search_space.knobs import KNOBS_FILE
from search_space.target import Target

BLOCK_START, BLOCK_END = "EVOLVE-BLOCK-START", "EVOLVE-BLOCK-END"


class RuleViolation(ValueError):
    """A change the target's rules forbid; the message says which rule and which path."""


def matches(path: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, g) or fnmatch.fnmatchcase(path, g.rstrip("/") + "/*") for g in globs)


def check_path(path: str) -> None:
    """Refuse paths that could leave the workspace or touch git's own files."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or path.startswith("~"):
        raise RuleViolation(f"{path!r}: paths must be relative to the repository root")
    if ".." in p.parts:
        raise RuleViolation(f"{path}: '..' would escape the workspace")
    if ".git" in p.parts:
        raise RuleViolation(f"{path}: git's own files may not be changed")


def check_editable(target: Target, path: str) -> None:
    check_path(path)
    if path == KNOBS_FILE:
        return
    if matches(path, target.frozen):
        raise RuleViolation(f"{path} is frozen (validation, timing, logging and data loading stay as they are)")
    if not matches(path, target.editable):
        raise RuleViolation(f"{path} is not editable; editable paths: {', '.join(target.editable)}")


def outside_blocks(text: str) -> list[str]:
    """The text outside EVOLVE-BLOCK regions, one piece per gap; ValueError on unbalanced markers."""
    pieces, current, inside = [], [], False
    for line in text.splitlines():
        if BLOCK_START in line:
            if inside:
                raise ValueError("nested EVOLVE-BLOCK-START")
            current.append(line)
            pieces.append("\n".join(current))
            current, inside = [], True
        elif BLOCK_END in line:
            if not inside:
                raise ValueError("EVOLVE-BLOCK-END without a START")
            current, inside = [line], False
        elif not inside:
            current.append(line)
    if inside:
        raise ValueError("EVOLVE-BLOCK-START without an END")
    pieces.append("\n".join(current))
    return pieces


def check_markers(path: str, old: str, new: str) -> None:
    try:
        before = outside_blocks(old)
    except ValueError:
        return  # the base itself has no usable markers: the whole file is editable
    if len(before) == 1:
        return
    try:
        after = outside_blocks(new)
    except ValueError as e:
        raise RuleViolation(f"{path}: {e}; EVOLVE-BLOCK markers must stay as they are") from None
    if after != before:
        raise RuleViolation(f"{path}: changes outside the EVOLVE-BLOCK-START/END regions are not allowed")


def check_change(target: Target, changes: dict[str, tuple[str | None, str | None]],
                 symlinks: tuple[str, ...] = ()) -> None:
    """Validate a whole change: path -> (old text or None if new, new text or None if deleted)."""
    for path in symlinks:
        raise RuleViolation(f"{path}: symbolic links may not be added or changed")
    if not changes:
        raise RuleViolation("the change is empty: it leaves the trainer as it was")
    for path, (old, new) in sorted(changes.items()):
        check_editable(target, path)
        if target.markers and old is not None and new is not None:
            check_markers(path, old, new)
