"""The baseline: the base measured with several seeds at each trainer fidelity, and re-measured
during the search so that drift (a busier machine, a warmer GPU) moves the baseline with the
candidates instead of making them look slower or faster.

It sets the target loss (fixed once, when the fidelity is first measured), the band a run is
pruned against, and the objective a single-seed rung is compared with (over the latest WINDOW runs).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from agent.names import run_fidelity
from env.stats import Band
from search_space import judge
from search_space.judge import Obs
from search_space.records import RunResult, Status
from search_space.target import Target

__all__ = ["WINDOW", "Baseline", "build_baseline", "run_fidelity"]

WINDOW = 12  # the objective and band come from the latest this many baseline runs


@dataclass(frozen=True)
class Baseline:
    """The base's numbers at one trainer fidelity."""

    fidelity: str
    kind: str  # the target's objective
    band: Band
    target_loss: float
    value: float  # the base's objective: mean over its runs that reached the target
    runs: int

    @property
    def obs(self) -> Obs:
        return Obs(self.value, False)

    def line(self) -> str:
        return (f"baseline @ {self.fidelity}: target loss {self.target_loss:.4f}, objective {self.value:.1f}, "
                f"{self.runs} seeds, final loss {self.band.final_loss:.4f} ± {self.band.std[-1]:.4f}")


def build_baseline(target: Target, fidelity: str, runs: list[RunResult],
                   target_loss: float | None = None) -> Baseline:
    """From the base's runs at `fidelity` (the latest WINDOW OK ones). `target_loss` None picks
    it: the target's number at `full` when it has one, else a loss >= 95 % of the seeds reach."""
    ok = [r for r in runs if r.status == Status.OK and r.curve][-WINDOW:]
    if not ok:
        reasons = "; ".join(sorted({r.reason.splitlines()[0] if r.reason else r.status.value for r in runs}))
        raise RuntimeError(f"the baseline failed at {fidelity}: {reasons or 'no runs'}")
    band = Band.from_runs(ok)
    if target_loss is None:
        if fidelity == "full" and isinstance(target.target_loss, float):
            target_loss = target.target_loss
        else:
            target_loss = judge.choose_target_loss([r.final.val_loss for r in ok])
    kind = target.objective
    obs = [o for o in (judge.run_objective(kind, r.curve, target_loss) for r in ok) if o is not None]
    reached = [o.value for o in obs if not o.censored and math.isfinite(o.value)]
    if reached:
        value = statistics.fmean(reached)
    else:  # a numeric target the base does not reach: judge candidates against the base's whole run
        value = band.steps[-1] if kind == "steps_to_target" else band.total_ms
    return Baseline(fidelity, kind, band, float(target_loss), float(value), len(ok))


class Baselines:
    """The base's current numbers per fidelity, rebuilt as new base runs arrive (the search
    measures the base again every REFRESH_EVERY candidate runs at a fidelity, and confirm's paired
    baseline runs count at `full`), with the target loss fixed at the first build."""

    REFRESH_EVERY = 8

    def __init__(self, target: Target):
        self.target = target
        self.now: dict[str, Baseline] = {}
        self.runs: dict[str, list[RunResult]] = {}
        self.target_loss: dict[str, float] = {}
        self.next_seed: dict[str, int] = {}
        self.since: dict[str, int] = {}

    def __contains__(self, fid: str) -> bool:
        return fid in self.now

    def __getitem__(self, fid: str) -> Baseline:
        return self.now[fid]

    def line(self) -> str:
        return "; ".join(b.line() for b in self.now.values())

    def restore(self, runs: dict[str, list[RunResult]], target_loss: dict[str, float],
                next_seed: dict[str, int]) -> None:
        self.runs, self.target_loss, self.next_seed = runs, target_loss, next_seed
        for fid in list(runs):
            if runs[fid]:
                self.add(fid, [])

    def add(self, fid: str, runs: list[RunResult]) -> Baseline:
        """Take new base runs at `fid` (failed ones are ignored); raises RuntimeError when there is
        still no OK run to build from."""
        self.runs.setdefault(fid, []).extend(r for r in runs if r.status == Status.OK)
        b = build_baseline(self.target, fid, self.runs[fid] or runs, self.target_loss.get(fid))
        self.now[fid], self.target_loss[fid] = b, b.target_loss
        return b

    def spread(self, fid: str) -> float:
        """The sd of the log time to the target over the base's recent runs at `fid`: how much the
        machine's load moves one run (0 for objectives that load cannot move, or too few runs)."""
        b = self.now.get(fid)
        if b is None or b.kind != "time_to_target":
            return 0.0
        obs = [judge.run_objective(b.kind, r.curve, b.target_loss) for r in self.runs.get(fid, [])[-WINDOW:]]
        logs = [math.log(o.value) for o in obs if o is not None and not o.censored and o.value > 0]
        return statistics.stdev(logs) if len(logs) >= 3 else 0.0

    def seeds(self, fid: str, n: int) -> tuple[int, ...]:
        """`n` base seeds at `fid` not used before."""
        first = self.next_seed.get(fid, 0)
        self.next_seed[fid] = first + n
        return tuple(range(first, first + n))

    def count(self, fid: str) -> bool:
        """A candidate ran at `fid`: True when the base is due to run there again."""
        self.since[fid] = self.since.get(fid, 0) + 1
        if self.since[fid] < self.REFRESH_EVERY:
            return False
        self.since[fid] = 0
        return True
