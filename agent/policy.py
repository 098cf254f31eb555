"""Which parent to improve and which proposer to ask: a tree policy plus a Thompson-sampling bandit.

Parents: improve the best candidate, explore one of the top few, or draft from the base. Arms: the
proposers (and for the LLM, each model). An arm earns one reward per candidate, when the candidate
leaves the ladder: 1 when it improved on its parent at the highest rung both reached, else 0
(agent.reward.improved). Each candidate's reward is stored with its last study trial, so a resumed
search rebuilds the counts from the runs database (`rebuild`); `state()` is kept for people.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

STATE_KEY = "policy"


@dataclass
class Node:
    """A candidate as the policy sees it: the lower the score the better (objective / baseline)."""

    commit: str
    score: float  # candidate objective / baseline objective at its highest rung; 1.0 is the base
    rung: int  # index of the highest rung passed


@dataclass
class Policy:
    arms: list[str]
    seed: int = 0
    p_best: float = 0.6
    p_explore: float = 0.25  # the rest drafts from the base
    top_k: int = 5
    counts: dict[str, list[float]] = field(default_factory=dict)  # arm -> [successes, failures]
    exhausted: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        for arm in self.arms:
            self.counts.setdefault(arm, [0.0, 0.0])

    # --- arms
    def live_arms(self) -> list[str]:
        return [a for a in self.arms if a not in self.exhausted]

    def choose_arm(self) -> str | None:
        live = self.live_arms()
        if not live:
            return None
        draws = {a: self.rng.betavariate(1 + self.counts[a][0], 1 + self.counts[a][1]) for a in live}
        return max(draws, key=draws.get)

    def reward(self, arm: str, success: bool) -> None:
        if arm in self.counts:
            self.counts[arm][0 if success else 1] += 1

    def rebuild(self, rewards: list[tuple[str, bool]]) -> None:
        """The counts from every reward ever given (a resumed search's history)."""
        for arm in self.counts:
            self.counts[arm] = [0.0, 0.0]
        for arm, won in rewards:
            self.reward(arm, won)

    def retire(self, arm: str) -> None:
        self.exhausted.add(arm)

    # --- parents
    def choose_parent(self, base: str, nodes: list[Node]) -> tuple[str, str]:
        """(commit, why) with why in best | explore | draft."""
        ranked = sorted(nodes, key=lambda n: (-n.rung, n.score))
        better = [n for n in ranked if n.score < 1.0]
        r = self.rng.random()
        if better and r < self.p_best:
            return better[0].commit, "best"
        if better and r < self.p_best + self.p_explore:
            return self.rng.choice(better[: self.top_k]).commit, "explore"
        return base, "draft"

    # --- persistence
    def state(self) -> dict:
        return {"counts": self.counts, "rng": self.rng.random()}

    def load(self, state: dict | None) -> None:
        """The random state only: the counts come from `rebuild`, which cannot miss a reward."""
        if state:
            self.rng.seed(state.get("rng", self.seed))
