"""A candidate's life in one object: from proposal to verdict, every rung, seed, run and number.

The loop keeps one `Trial` per candidate (and one per measurement of the base, `who` BASELINE).
A study trial is one rung of it: `number` is the study trial of the rung now queued or running,
`numbers` every rung's. Deciding the next rung (agent.ladder), rewarding the learners
(agent.reward) and queueing (agent.loop) all read and write this one object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agent.names import LADDER, MEASURED, Rung, Verdict, Who, rung_index
from agent.proposal import Outcome, Proposal
from search_space.judge import fresh_seeds
from search_space.records import RunResult, Status

CANDIDATE, BASE = "candidate", "base"  # the two roles of a run; confirm runs one of each per seed


@dataclass
class Trial:
    commit: str  # "" until its accepted proposal is committed (agent/committer.py), before it is queued
    parent: str
    title: str
    who: str  # a Who: the proposer, or BASELINE for the base's own measurements
    model: str | None = None
    arm: str | None = None  # the bandit's arm that proposed it ("llm:<model>" for a model)
    proposal: Proposal | None = None
    changes: dict[str, str] | None = None  # accepted, not yet committed
    rung: str = Rung.SMOKE
    batch: tuple[int, ...] = (0,)  # seeds of the batch queued or running at `rung`
    number: int | None = None  # the study trial of `rung`, once started
    numbers: dict[str, int] = field(default_factory=dict)  # rung -> study trial
    base_number: int | None = None  # confirm: the study trial holding the paired baseline runs
    waiting: set[tuple[str, int]] = field(default_factory=set)  # (role, seed) runs in flight
    runs: dict[str, list[RunResult]] = field(default_factory=dict)  # rung -> the candidate's runs
    paired: dict[int, RunResult] = field(default_factory=dict)  # confirm: seed -> its baseline run
    values: dict[str, float] = field(default_factory=dict)  # rung -> objective (lower is better)
    scores: dict[str, float] = field(default_factory=dict)  # rung -> objective / baseline's objective
    alpha: float | None = None  # confirm: the test level the online FDR rule gave it when it started
    verdict: str = ""  # a Verdict once it has left the ladder
    speedup: dict[str, Any] | None = None  # the one speed-up (Speedup.to_dict()) at the latest measured rung
    speedup_text: str = ""
    status: str = "ok"  # the latest rung's worst run status
    reason: str = ""
    won: bool = False  # improved on its parent (set with the verdict)
    worker_s: float = 0.0  # every run of the current rung (both roles)
    # runs that had finished inside an interrupted rung, (role, seed) -> result: a resume reuses them
    carried: dict[tuple[str, int], RunResult] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    # --- what it is
    @property
    def is_baseline(self) -> bool:
        return self.who == Who.BASELINE

    @property
    def ended(self) -> bool:
        return bool(self.verdict)

    @property
    def highest(self) -> str | None:
        """The highest rung where it was measured (short, full); None before any."""
        done = [r for r in MEASURED if r in self.scores]
        return max(done, key=rung_index) if done else None

    def confirm_order(self) -> list[int]:
        """Confirm's seeds in the order they were drawn (the sequential test reads pairs in it)."""
        return fresh_seeds(self.commit, "confirm", 0, len(self.runs.get(Rung.CONFIRM, [])) + len(self.waiting))

    # --- runs
    def expect(self, seeds: tuple[int, ...], paired: bool) -> None:
        self.batch = seeds
        for s in seeds:
            self.waiting.add((CANDIDATE, s))
            if paired:
                self.waiting.add((BASE, s))

    def add_run(self, role: str, seed: int, result: RunResult) -> bool:
        """Record one run; True when the batch is complete."""
        self.waiting.discard((role, seed))
        self.worker_s += result.wall_s
        if role == BASE:
            self.paired[seed] = result
        else:
            self.runs.setdefault(self.rung, []).append(result)
        return not self.waiting

    def batch_runs(self) -> list[RunResult]:
        mine = set(self.batch)
        return sorted((r for r in self.runs.get(self.rung, []) if r.seed in mine), key=lambda r: r.seed)

    def worst(self, runs: list[RunResult]) -> RunResult | None:
        return next((r for r in runs if r.status != Status.OK), None)

    # --- what the learners hear
    def outcome(self, final: bool = False) -> Outcome:
        """At a rung: what was measured there. Final: the highest rung it was measured at (its
        best evidence; the rung it stopped at when never measured), with the verdict and reward."""
        rung = (self.highest or self.rung) if final else self.rung
        rung = rung if rung in LADDER else ""
        return Outcome(rung=rung, status=self.status, value=self.values.get(rung), score=self.scores.get(rung),
                       won=self.won and final, final=final, verdict=self.verdict if final else "",
                       speedup=self.speedup_text, reason=self.reason)

    def end(self, verdict: str, won: bool) -> None:
        self.verdict, self.won = verdict, won

    def attrs(self, sp, next_rung: str | None, trusted: bool, gpus: int) -> dict[str, Any]:
        """What the study keeps of the rung that just ended (`sp`: its judge.Speedup or None)."""
        return {"speedup": sp.estimate if sp else 0.0, "speedup_text": sp.text() if sp else "",
                "speedup_detail": sp.to_dict() if sp else None, "score": self.scores.get(self.rung),
                "worker_seconds": self.worker_s, "gpu_seconds": self.worker_s * gpus, "reason": self.reason,
                "status": self.status, "trusted": trusted, "next": next_rung or ""}

    def confirmed(self) -> bool:
        return self.verdict == Verdict.PASS


def whole_pairs(runs: dict[tuple[str, int], RunResult]) -> dict[tuple[str, int], RunResult]:
    """The (role, seed) -> run entries whose seed has both a candidate and a base run: a pair's two
    runs are compared as run side by side, so a lone one is never carried into a later pair."""
    return {k: r for k, r in runs.items() if (CANDIDATE, k[1]) in runs and (BASE, k[1]) in runs}


def rejected(proposal: Proposal, why: str) -> Outcome:
    """The outcome of a proposal that never ran."""
    return Outcome(rung="", status="rejected", final=True, verdict=Verdict.STOPPED, reason=why)
