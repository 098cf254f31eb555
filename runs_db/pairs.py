"""A candidate's runs paired with the base runs recorded beside them, and the search's target loss.

Pairs come only from rungs that ran fresh seeds beside the base (confirm, replay): a trial of the
base whose attrs say `pairs_for: <candidate trial>` holds the partners, matched by seed, and a
pair counts only when both runs finished OK on the same node. The single-seed rungs that selected
the candidate are never pooled in: their seeds are left out even if one came back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from runs_db.db import RunsDB
from search_space import judge
from search_space.records import RunResult, Status
from search_space.target import Target

REPLAY = "replay"  # the proposer of `speedsearch replay` trials (agent.names.Who.REPLAY)
PAIRED_RUNGS = ("confirm",)  # rungs whose trials carry base partners (replay records its trials at confirm)


@dataclass
class Paired:
    """OK candidate runs and their base partners, in the same order."""

    candidate: list[RunResult] = field(default_factory=list)
    base: list[RunResult] = field(default_factory=list)
    lost: int = 0  # candidate runs without a usable partner (failed, other node, a selecting seed)

    @property
    def untrusted(self) -> int:
        return sum(not r.trusted for r in self.candidate + self.base)

    def obs(self, kind: str, target_loss: float) -> list[tuple[judge.Obs, judge.Obs]]:
        out = []
        for c, b in zip(self.candidate, self.base, strict=True):
            co, bo = judge.run_objective(kind, c.curve, target_loss), judge.run_objective(kind, b.curve, target_loss)
            if co is not None and bo is not None:
                out.append((co, bo))
        return out

    def speedup(self, kind: str, target_loss: float, budget: str = "") -> judge.Speedup:
        return judge.speedup(kind, target_loss, self.obs(kind, target_loss), budget=budget)


def pair_up(candidate: list[RunResult], base: list[RunResult], exclude_seeds: set[int] = frozenset()) -> Paired:
    """Match candidate and base runs by seed; keep a pair only when both are OK on one node."""
    by_seed = {r.seed: r for r in base}
    out = Paired()
    for c in candidate:
        b = by_seed.get(c.seed)
        if (c.seed in exclude_seeds or b is None or c.status != Status.OK or b.status != Status.OK
                or not c.curve or not b.curve or c.node != b.node):
            out.lost += 1
            continue
        out.candidate.append(c)
        out.base.append(b)
    return out


def _partners(db: RunsDB, trials) -> dict[int, list[RunResult]]:
    """The base's paired runs, by the number of the candidate trial they were paired with."""
    partners: dict[int, list[RunResult]] = {}
    for t in trials:
        if t.commit == db.base_commit and t.attrs.get("pairs_for") is not None:
            partners.setdefault(int(t.attrs["pairs_for"]), []).extend(db.runs(t.number))
    return partners


def paired_runs(db: RunsDB, commit: str) -> Paired:
    """Every pair recorded for `commit` (confirm and replay trials), the selecting seeds left out."""
    trials = db.trials()
    partners = _partners(db, trials)
    mine = [t for t in trials if t.commit == commit]
    selecting = {r.seed for t in mine if t.fidelity not in PAIRED_RUNGS for r in db.runs(t.number)}
    out = Paired()
    for t in mine:
        if t.fidelity in PAIRED_RUNGS and t.number in partners:
            p = pair_up(db.runs(t.number), partners[t.number], selecting)
            out.candidate += p.candidate
            out.base += p.base
            out.lost += p.lost
    return out


def search_target_loss(db: RunsDB, target: Target, fidelity: str = "full") -> float | None:
    """The target loss the search judged by: the first baseline trial's at `fidelity` (the loop
    fixes it there), else the target's number, else one chosen from the recorded base runs."""
    for t in sorted(db.trials(), key=lambda t: t.number):
        tl = t.attrs.get("target_loss")
        if t.commit == db.base_commit and t.fidelity == fidelity and isinstance(tl, int | float) and math.isfinite(tl):
            return float(tl)
    if fidelity == "full" and isinstance(target.target_loss, int | float):
        return float(target.target_loss)
    finals = [r.final.val_loss for r in db.baseline(fidelity) if r.final]
    return judge.choose_target_loss(finals) if finals else None


def budget_words(target: Target, fidelity: str) -> str:
    """loss_at_budget's budget in words, e.g. "300 steps"."""
    fid = target.fidelities.get(fidelity)
    budget = getattr(target.objective, "budget", None)  # search_space/budget.py: tokens, epochs, wall time
    if budget is not None and fid is not None:
        return budget.words(fid.steps)
    return f"{fid.steps} steps" if fid is not None and getattr(fid, "steps", None) else fidelity


def replay_pairs(db: RunsDB, commit: str, steps: int | None = None) -> Paired:
    """The pairs of `commit`'s replays only (proposer "replay"), at `steps` when given: fresh seeds
    that no rung, confirm included, used to select the candidate. A seed seen twice counts once."""
    trials = db.trials()
    partners = _partners(db, trials)
    mine = [t for t in trials if t.commit == commit]
    replays = [t for t in mine if t.proposer == REPLAY and t.number in partners
               and (steps is None or t.attrs.get("steps", steps) == steps)]
    selecting = {r.seed for t in mine if t not in replays and t.proposer != REPLAY for r in db.runs(t.number)}
    out = Paired()
    for t in replays:
        p = pair_up(db.runs(t.number), partners[t.number], selecting)
        for c, b in zip(p.candidate, p.base, strict=True):
            if c.seed in selecting:
                out.lost += 1
                continue
            selecting.add(c.seed)  # a repeated seed is never counted twice
            out.candidate.append(c)
            out.base.append(b)
        out.lost += p.lost
    return out
