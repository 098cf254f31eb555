"""The offline proposer: entries of the target's idea library, applied on top of the parent.

An idea counts as already in the parent when every one of its REPLACE texts is there; ideas that
conflict with one already in the parent are skipped, so combinations stay compatible.
"""

from __future__ import annotations

import random
import threading

from agent.proposal import Proposal, ProposalContext
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

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        inside = [i for i in self.ideas if present(i, ctx.files)]
        with self.lock:
            order = self.ideas[:]
            self.rng.shuffle(order)
            # ideas that already helped elsewhere go first: they are the likeliest to combine well
            order.sort(key=lambda i: -self.wins.get(i.name, 0))
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

    def tell(self, proposal: Proposal, value: float | None, improved: bool = False) -> None:
        if improved and proposal.ideas:
            with self.lock:
                self.wins[proposal.ideas[-1]] = self.wins.get(proposal.ideas[-1], 0) + 1
