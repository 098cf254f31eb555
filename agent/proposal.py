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


@dataclass(frozen=True)
class Outcome:
    """What became of a proposal at one rung: the one thing every proposer is told.

    A proposer hears once per rung its candidate was measured at (`final` False) and once more when
    the candidate leaves the ladder (`final` True, with `won`). A proposal rejected before it ran
    (a twin, an edit that does not apply) gets one final outcome with status "rejected".
    """

    rung: str  # where it was measured ("" when it never ran)
    status: str  # ok | failed | timeout | pruned | invalid | rejected | interrupted
    value: float | None = None  # the target's objective at that rung (lower is better)
    score: float | None = None  # value / the baseline's value at that rung: < 1 beats the base
    won: bool = False  # final only: it improved on its parent at the highest rung both reached
    final: bool = False
    verdict: str = ""  # final only: pass | fail | stopped | unconfirmed | untrusted
    speedup: str = ""  # the one speed-up's words (Speedup.text()), when there is one
    reason: str = ""  # why it failed or stopped

    def line(self, title: str) -> str:
        """One line for a model's context."""
        words = self.speedup or (f"score {self.score:.3f} (objective / baseline's)" if self.score else "")
        tail = f": {self.reason[:300]}" if self.reason else ""
        return f"{title[:80]} -> {self.rung or 'not run'} {self.status} {words}{tail}".replace("  ", " ")


class Proposer(Protocol):
    name: str

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        """One proposal for `ctx.parent`, or None when this proposer has nothing (left) to offer."""
        ...

    def tell(self, proposal: Proposal, outcome: Outcome) -> None:
        """What became of `proposal` (see Outcome). Must be idempotent for a final outcome: a
        resumed search tells every finished candidate again so the proposer can rebuild."""
        ...
