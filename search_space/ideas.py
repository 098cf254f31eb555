"""Ideas: a target's library of named, self-contained edits (the offline proposer's moves).

An ideas file is TOML:

    [[idea]]
    name = "rotary"
    title = "Rotary position embeddings instead of learned positions"
    rationale = "..."
    conflicts = ["other-idea"]      # optional: ideas that edit the same lines
    edits = '''
    train.py
    <<<<<<< SEARCH
    ...
    '''
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from search_space.edits import Edit, EditError, apply_edits, parse_edits


@dataclass(frozen=True)
class Idea:
    name: str
    title: str
    rationale: str
    edits: tuple[Edit, ...]
    conflicts: tuple[str, ...] = ()

    def compatible(self, other: Idea) -> bool:
        return other.name not in self.conflicts and self.name not in other.conflicts


def load_ideas(path: Path | None) -> list[Idea]:
    if path is None or not path.exists():
        return []
    raw = tomllib.loads(path.read_text())
    ideas = []
    for i, entry in enumerate(raw.get("idea", [])):
        where = f"{path.name}: idea[{i}]"
        for key in ("name", "title", "rationale", "edits"):
            if not isinstance(entry.get(key), str):
                raise ValueError(f"{where}.{key}: missing or not a string")
        try:
            edits = tuple(parse_edits(entry["edits"]))
        except EditError as e:
            raise ValueError(f"{where} ({entry['name']}): {e}") from None
        ideas.append(Idea(entry["name"], entry["title"], entry["rationale"], edits,
                          tuple(entry.get("conflicts", ()))))
    names = [i.name for i in ideas]
    if len(set(names)) != len(names):
        raise ValueError(f"{path.name}: idea names must be unique")
    return ideas


def apply_ideas(files: dict[str, str], ideas: list[Idea]) -> dict[str, str]:
    """Apply ideas in order on top of each other; returns every file they changed."""
    current = dict(files)
    changed: dict[str, str] = {}
    for idea in ideas:
        try:
            out = apply_edits(current, list(idea.edits))
        except EditError as e:
            raise EditError(f"idea {idea.name}: {e}") from None
        current.update(out)
        changed.update(out)
    return changed
