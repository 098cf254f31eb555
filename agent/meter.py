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
    idle: dict[str, float] = field(default_factory=dict)  # free slot-seconds by why (Search._why_free)
    # Each run's hand-offs: Ray's start after the loop sent it, and the loop's pick-up after it ended.
    sent: dict = field(default_factory=dict)  # ObjectRef -> wall-clock time it was sent
    to_start: list[float] = field(default_factory=list)  # seconds from sent to the task's start
    to_collect: list[float] = field(default_factory=list)  # seconds from the task's end to the loop's pick-up
    budget_at: float | None = None  # wall-clock time the budget was first reached (then only the tail runs)

    def handed(self, sent: float | None, started: float, ended: float) -> None:
        if sent is not None and started:
            self.to_start.append(max(0.0, started - sent))
        if ended:
            self.to_collect.append(max(0.0, time.time() - ended))

    def charge(self, trial: int, t0: float, extra: float = 0.0) -> None:
        self.controller_s[trial] = self.controller_s.get(trial, 0.0) + extra + time.perf_counter() - t0

    def iteration(self, t0: float, free_slots: int, why: str = "starved") -> None:
        """One loop iteration; `why` a free worker had nothing (Search._why_free: "lag" means
        something runnable was waiting)."""
        dt = time.perf_counter() - t0
        if free_slots > 0:
            self.idle[why] = self.idle.get(why, 0.0) + free_slots * dt
        self.busy_s += dt - self.waited
        self.waited = 0.0
