"""The loop's bookkeeping types: a trial waiting for a worker, a trial running, the summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.proposal import Proposal
from search_space.records import RunResult

SEARCH_PROPOSERS = ("ideas", "knobs", "llm")  # trials of the search itself, not the baseline or a replay


@dataclass
class Pending:
    """A trial waiting for a worker."""

    commit: str
    parent: str
    rung: str
    seeds: tuple[int, ...]
    title: str
    proposer: str
    model: str | None = None
    proposal: Proposal | None = None
    arm: str | None = None
    trial: int | None = None  # set when the trial already exists (confirm adding seeds)
    changes: dict[str, str] | None = None  # a proposal not yet committed: committed when its trial starts


@dataclass
class Open:
    """A started trial and its runs."""

    number: int
    pending: Pending
    waiting: set[int]
    results: dict[int, RunResult] = field(default_factory=dict)
    worker_s: float = 0.0


@dataclass
class Summary:
    """What a search did, for the closing table."""

    trials: int = 0
    best_commit: str | None = None
    best_title: str = ""
    best_speedup: float = 0.0
    best_rung: str = ""
    stopped_by: str = ""
    dollars: float = 0.0
    worker_hours: float = 0.0


@dataclass
class Meter:
    """Where the controller's time goes, for the benchmarks (bench/loop.py)."""

    controller_s: dict[int, float] = field(default_factory=dict)  # trial -> main-thread seconds spent on it
    spans: list[tuple[float, float, str]] = field(default_factory=list)  # each run: start, end, worker slot
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
