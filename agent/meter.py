"""What a search did (the closing summary) and where the controller's time went (the benchmarks)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Summary:
    """What a search did, for the closing table."""

    trials: int = 0  # study trials of candidates started (one per rung; what budget_trials counts)
    best_commit: str | None = None  # the best CONFIRMED candidate; None when nothing was confirmed
    best_title: str = ""
    best_speedup: float = 0.0
    best_text: str = ""  # its speed-up in the one wording (Speedup.text())
    best_rung: str = ""
    best_kind: str = ""  # the objective's kind of best_speedup (loss_at_budget: a difference, lower is better)
    confirmed: list[tuple[str, str, str]] = field(default_factory=list)  # (commit, title, speed-up words)
    rejected: int = 0  # candidates the confirmation rejected
    guarantee: str = ""  # the error rate the search guarantees for its confirmations
    stopped_by: str = ""
    dollars: float = 0.0
    worker_hours: float = 0.0

    def confirm(self, t) -> bool:
        """Count a confirmed candidate (an agent.trial.Trial); True when it is the new best."""
        self.confirmed.append((t.commit, t.title, t.speedup_text))
        sp = t.speedup or {}
        est = sp.get("estimate", 0.0)
        # Better is a larger ratio, or a larger loss reduction (a more negative difference) for loss_at_budget.
        gain = -est if sp.get("kind") == "loss_at_budget" else est
        best = -self.best_speedup if self.best_kind == "loss_at_budget" else self.best_speedup
        if self.best_commit is not None and gain <= best:
            return False
        self.best_kind = sp.get("kind", "")
        self.best_commit, self.best_title, self.best_speedup, self.best_text = t.commit, t.title, est, t.speedup_text
        self.best_rung = "confirm"
        return True

    def verdict_line(self) -> str:
        """What the search may claim: confirmed candidates only, and plainly nothing when none."""
        if not self.confirmed:
            return (f"nothing was confirmed ({self.rejected} rejected by confirmation; {self.guarantee})"
                    if self.guarantee else "nothing was confirmed")
        return (f"confirmed {len(self.confirmed)} candidate(s) ({self.guarantee}); best: {self.best_title[:60]}: "
                f"{self.best_text}")


@dataclass
class Meter:
    """Where the controller's time goes, for the benchmarks (bench/loop.py)."""

    controller_s: dict[int, float] = field(default_factory=dict)  # trial -> main-thread seconds spent on it
    spans: list[tuple[float, float, str]] = field(default_factory=list)  # each run: start, end, worker slot
    active: list[tuple[float, float]] = field(default_factory=list)  # each run: its end, the trainer's own seconds
    busy_s: float = 0.0  # main-thread time not spent waiting for runs
    waited: float = 0.0
    idle: dict[str, float] = field(default_factory=dict)  # free slot-seconds: "starved" (nothing to run) or "lag"

    def charge(self, trial: int, t0: float, extra: float = 0.0) -> None:
        self.controller_s[trial] = self.controller_s.get(trial, 0.0) + extra + time.perf_counter() - t0

    def iteration(self, t0: float, free_slots: int, starved: bool = True) -> None:
        dt = time.perf_counter() - t0
        if free_slots > 0:
            key = "starved" if starved else "lag"
            self.idle[key] = self.idle.get(key, 0.0) + free_slots * dt
        self.busy_s += dt - self.waited
        self.waited = 0.0
