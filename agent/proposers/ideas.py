"""The offline proposer: entries of the target's idea library, applied on top of the parent.

An idea counts as already in the parent when every one of its REPLACE texts is there; ideas that
conflict with one already in the parent are skipped, so combinations stay compatible.

What it learns: every final Outcome counts for the idea a proposal added (its last name): a win
when the candidate improved on its parent (`Outcome.won`), a loss otherwise. Ideas are tried in the
order of a draw from each one's Beta(1 + wins, 1 + losses), so ideas that win elsewhere come first
and ideas that keep losing sink, without ever being shut out.
"""

from __future__ import annotations

import random
import threading

from agent.proposal import Outcome, Proposal, ProposalContext
from search_space.edits import EditError
from search_space.ideas import Idea
from search_space.rules import RuleViolation


def present(idea: Idea, files: dict[str, str]) -> bool:
    return all(e.replace.strip() and e.replace in files.get(e.path, "") for e in idea.edits)


class IdeasProposer:
    name = "ideas"

    def __init__(self, ideas: list[Idea], seed: int = 0):
        self.ideas = ideas
        self.rng = random.Random(seed)
        self.tried: set[tuple[str, str]] = set()  # (parent, idea name)
        self.lock = threading.Lock()
        self.wins: dict[str, int] = {}
        self.losses: dict[str, int] = {}

    def weight(self, name: str) -> float:
        """A Thompson draw of the idea's win rate."""
        return self.rng.betavariate(1 + self.wins.get(name, 0), 1 + self.losses.get(name, 0))

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        inside = [i for i in self.ideas if present(i, ctx.files)]
        with self.lock:
            draws = {i.name: self.weight(i.name) for i in self.ideas}
            order = sorted(self.ideas, key=lambda i: -draws[i.name])
            for idea in order:
                if (ctx.parent, idea.name) in self.tried or idea in inside:
                    continue
                if not all(idea.compatible(other) for other in inside):
                    continue
                self.tried.add((ctx.parent, idea.name))
                try:
                    if ctx.check is not None:
                        ctx.check(list(idea.edits))
                except (EditError, RuleViolation):
                    continue
                return Proposal(title=idea.title, rationale=idea.rationale, proposer=self.name, parent=ctx.parent,
                                edits=idea.edits, ideas=tuple(i.name for i in inside) + (idea.name,))
        return None

    def tell(self, proposal: Proposal, outcome: Outcome) -> None:
        if not proposal.ideas:
            return
        name = proposal.ideas[-1]
        with self.lock:
            self.tried.add((proposal.parent, name))  # a resumed search never proposes it there again
            if outcome.final and outcome.status != "rejected":
                book = self.wins if outcome.won else self.losses
                book[name] = book.get(name, 0) + 1
