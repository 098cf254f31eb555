"""The baseline: the base measured with several seeds at each rung; it sets target losses and bands."""

from __future__ import annotations

import math
from dataclasses import dataclass

from env.stats import Band, objective
from search_space.records import RunResult, Status
from search_space.target import Target


def run_fidelity(rung: str) -> str:
    """The trainer fidelity a rung runs at: `confirm` repeats `full` with new seeds."""
    return "full" if rung == "confirm" else rung


@dataclass(frozen=True)
class Baseline:
    """The base's numbers at one trainer fidelity."""

    fidelity: str
    band: Band
    target_loss: float
    value: float  # the objective the base itself reaches
    runs: int

    def speedup(self, value: float | None) -> float:
        """baseline / candidate on the objective: above 1 is faster (or lower loss)."""
        if value is None or value <= 0 or math.isinf(value):
            return 0.0
        return self.value / value

    def line(self) -> str:
        return (f"baseline @ {self.fidelity}: target loss {self.target_loss:.4f}, objective {self.value:.1f}, "
                f"{self.runs} seeds, final loss {self.band.final_loss:.4f} ± {self.band.std[-1]:.4f}")


def build_baseline(target: Target, fidelity: str, runs: list[RunResult]) -> Baseline:
    ok = [r for r in runs if r.status == Status.OK]
    if not ok:
        reasons = "; ".join(sorted({r.reason.splitlines()[0] if r.reason else r.status.value for r in runs}))
        raise RuntimeError(f"the baseline failed at {fidelity}: {reasons}")
    band = Band.from_runs(ok)
    if fidelity == "full" and isinstance(target.target_loss, float):
        target_loss = target.target_loss
    else:
        target_loss = band.final_loss
    value = objective(target.objective, ok, target_loss)
    if value is None or math.isinf(value):
        # a numeric target the base does not reach: judge candidates against the base's whole run
        value = band.steps[-1] if target.objective == "steps_to_target" else band.total_ms
    return Baseline(fidelity, band, target_loss, float(value), len(ok))
