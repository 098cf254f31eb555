"""Statistics over runs: the baseline band, the objective, the speedrun's t-test, timing ratios."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

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


def crossing(curve: list[Point], target_loss: float, axis: str = "train_ms") -> float:
    """Where the curve first reaches target_loss, interpolated linearly; inf when it never does."""
    prev = None
    for p in curve:
        if p.val_loss <= target_loss:
            x = getattr(p, axis)
            if prev is None or prev.val_loss == p.val_loss:
                return float(x)
            px = getattr(prev, axis)
            frac = (prev.val_loss - target_loss) / (prev.val_loss - p.val_loss)
            return float(px + frac * (x - px))
        prev = p
    return math.inf


def objective(kind: str, runs: list[RunResult], target_loss: float) -> float | None:
    """The objective over seeds (lower is better); None when any seed did not finish."""
    if not runs or any(r.status != Status.OK for r in runs):
        return None
    curve = mean_curve(runs)
    if kind == "loss_at_budget":
        return curve[-1].val_loss
    return crossing(curve, target_loss, "train_ms" if kind == "time_to_target" else "step")


def loss_pvalue(losses: list[float], target_loss: float) -> float:
    """One-sided t-test that the mean final loss is below the target (the speedrun's p < 0.01)."""
    if len(losses) < 2:
        return 1.0
    if np.std(losses) == 0:
        return 0.0 if np.mean(losses) < target_loss else 1.0
    return float(stats.ttest_1samp(losses, target_loss, alternative="less").pvalue)


@dataclass(frozen=True)
class Ratio:
    """candidate / baseline, with a confidence interval from the log-ratios' t distribution."""

    ratio: float
    low: float
    high: float
    n: int


def timing_ratio(candidate_ms: list[float], baseline_ms: list[float], confidence: float = 0.95,
                 paired: bool = True) -> Ratio:
    """candidate / baseline as a ratio of geometric means, with a t interval on log times.

    Paired when asked and the lists have equal length (runs interleaved on one machine); otherwise
    Welch's unequal-variance interval.
    """
    c, b = np.log(candidate_ms), np.log(baseline_ms)
    if paired and len(c) == len(b) and len(c) > 1:
        d = c - b
        m, se, df = d.mean(), d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1
    else:
        m = c.mean() - b.mean()
        vc = c.var(ddof=1) / len(c) if len(c) > 1 else 0.0
        vb = b.var(ddof=1) / len(b) if len(b) > 1 else 0.0
        se = math.sqrt(vc + vb)
        df = (vc + vb) ** 2 / (vc**2 / max(len(c) - 1, 1) + vb**2 / max(len(b) - 1, 1)) if se > 0 else 1
    t = stats.t.ppf(0.5 + confidence / 2, max(df, 1)) if se > 0 else 0.0
    return Ratio(math.exp(m), math.exp(m - t * se), math.exp(m + t * se), min(len(c), len(b)))


def decide(losses: list[float], target_loss: float, alpha: float = 0.01, max_seeds: int = 8) -> str:
    """Sequential confirmation: "pass", "fail", or "more" (add a seed while the answer is unclear)."""
    p = loss_pvalue(losses, target_loss)
    if p < alpha:
        return "pass"
    if len(losses) >= max_seeds:
        return "fail"
    if len(losses) >= 3 and np.mean(losses) > target_loss and loss_pvalue([-x for x in losses], -target_loss) < 0.05:
        return "fail"  # clearly above the target: more seeds would not change the answer
    return "more"
