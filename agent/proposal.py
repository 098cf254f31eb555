"""The one type every proposer returns, and what a proposer is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from search_space.edits import Edit
from search_space.target import Target


@dataclass
class Cost:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    dollars: float = 0.0
    calls: int = 0

    def add(self, other: Cost) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Proposal:
    """A change to a parent candidate: SEARCH/REPLACE edits and/or knob values."""

    title: str
    rationale: str
    proposer: str  # "llm" | "ideas" | "knobs"
    parent: str  # the parent's commit
    edits: tuple[Edit, ...] = ()
    knobs: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    ideas: tuple[str, ...] = ()  # names of the library ideas this applies
    cost: Cost = field(default_factory=Cost)
    meta: dict[str, Any] = field(default_factory=dict)  # proposer-private bookkeeping (e.g. a sampler's trial)


@dataclass(frozen=True)
class Attempt:
    """A past candidate, as the prompt shows it."""

    title: str
    proposer: str
    diff: str
    status: str
    value: float | None = None  # the objective
    speedup: float | None = None  # baseline / candidate on the objective, >1 is better
    reason: str = ""  # failure reason or error tail


@dataclass
class ProposalContext:
    """Everything a proposer may look at when asked for one proposal."""

    target: Target
    parent: str  # commit
    files: dict[str, str]  # the parent's editable files, path -> text
    best: list[Attempt] = field(default_factory=list)
    failures: list[Attempt] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)  # titles of everything tried so far
    notes: list[str] = field(default_factory=list)  # reviewers' notes
    baseline: str = ""  # one line: the baseline's numbers
    # Applies edits to `files` and checks the target's rules; raises EditError / RuleViolation with
    # a reason a model can act on. Returns the changed files.
    check: Callable[[list[Edit]], dict[str, str]] | None = None


class Proposer(Protocol):
    name: str

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        """One proposal for `ctx.parent`, or None when this proposer has nothing (left) to offer."""
        ...

    def tell(self, proposal: Proposal, value: float | None) -> None:
        """The objective the proposal reached (None when it failed)."""
        ...
