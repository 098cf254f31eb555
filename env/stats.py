"""The baseline band (a curve clearly worse than the base's stops early) and the mean curve over seeds.

The verdict (objective per run, speed-up, confirmation test) lives in search_space/judge.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from search_space.judge import run_objective
from search_space.records import Point, RunResult, Status


@dataclass(frozen=True)
class Band:
    """The baseline's validation loss per step (mean and spread over seeds) at one fidelity.

    A curve is clearly worse when it lies above mean + max(k * std, rel * mean) at a step past
    `min_fraction` of the run: early points are too noisy to judge.
    """

    steps: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_ms: tuple[float, ...]
    k: float = 4.0
    rel: float = 0.03
    min_fraction: float = 0.2

    @classmethod
    def from_runs(cls, runs: list[RunResult], **kw) -> Band:
        ok = [r for r in runs if r.status == Status.OK and r.curve]
        if not ok:
            raise ValueError("no successful baseline run to build a band from")
        common = sorted(set.intersection(*({p.step for p in r.curve} for r in ok)))
        by = [{p.step: p for p in r.curve} for r in ok]
        loss = np.array([[b[s].val_loss for s in common] for b in by])
        ms = np.array([[b[s].train_ms for s in common] for b in by])
        std = loss.std(axis=0, ddof=1) if len(ok) > 1 else np.zeros(len(common))
        return cls(tuple(common), tuple(loss.mean(0)), tuple(std), tuple(ms.mean(0)), **kw)

    @property
    def final_loss(self) -> float:
        return self.mean[-1]

    @property
    def total_ms(self) -> float:
        return self.train_ms[-1]

    def limit(self, step: int) -> float | None:
        if not self.steps or step < self.min_fraction * self.steps[-1] or step not in self.steps:
            return None
        i = self.steps.index(step)
        return self.mean[i] + max(self.k * self.std[i], self.rel * self.mean[i])

    def worse(self, point: Point) -> bool:
        lim = self.limit(point.step)
        return lim is not None and point.val_loss > lim

    def to_dict(self) -> dict:
        return {"steps": list(self.steps), "mean": list(self.mean), "std": list(self.std),
                "train_ms": list(self.train_ms)}

    @classmethod
    def from_dict(cls, d: dict) -> Band:
        return cls(tuple(d["steps"]), tuple(d["mean"]), tuple(d["std"]), tuple(d["train_ms"]))


def mean_curve(runs: list[RunResult]) -> list[Point]:
    """Mean over seeds at the steps every run validated."""
    ok = [r for r in runs if r.curve]
    if not ok:
        return []
    common = sorted(set.intersection(*({p.step for p in r.curve} for r in ok)))
    by = [{p.step: p for p in r.curve} for r in ok]
    return [Point(s, float(np.mean([b[s].val_loss for b in by])), float(np.mean([b[s].train_ms for b in by])))
            for s in common]


def objective(kind: str, runs: list[RunResult], target_loss: float) -> float | None:
    """The objective of the seeds' mean curve (lower is better): inf when the mean curve never
    reaches the target, None when any seed did not finish. A single number for a reward or a
    rung; the speed-up a candidate is judged by is `search_space.judge.speedup` over pairs."""
    if not runs or any(r.status != Status.OK for r in runs):
        return None
    obs = run_objective(kind, mean_curve(runs), target_loss)
    if obs is None:
        return None
    return math.inf if obs.censored else obs.value
