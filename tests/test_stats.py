"""The baseline band, the mean curve and the mean-curve objective (the verdict is tests/test_judge.py)."""

from __future__ import annotations

import math

import pytest

from env.stats import Band, mean_curve, objective
from search_space.records import Point, RunResult, Status


def run(losses: list[float], ms_per_step: float = 10.0, seed: int = 0, status: Status = Status.OK) -> RunResult:
    steps = [0, 10, 20, 30, 40][: len(losses)]
    return RunResult(status, curve=[Point(s, v, s * ms_per_step) for s, v in zip(steps, losses, strict=True)],
                     total_steps=steps[-1], seed=seed)


def test_band_from_runs_and_worse():
    band = Band.from_runs([run([4.0, 3.0, 2.5, 2.2, 2.0]), run([4.0, 3.1, 2.6, 2.3, 2.1])])
    assert band.steps == (0, 10, 20, 30, 40) and band.final_loss == pytest.approx(2.05)
    assert band.limit(0) is None  # too early to judge
    assert not band.worse(Point(30, 2.3, 300))
    assert band.worse(Point(30, 3.0, 300))
    assert Band.from_dict(band.to_dict()).mean == band.mean


def test_mean_curve_and_objective():
    runs = [run([4.0, 3.0, 2.0]), run([4.0, 3.0, 2.2])]
    assert mean_curve(runs)[-1].val_loss == pytest.approx(2.1)
    assert objective("time_to_target", runs, 2.5) == pytest.approx(10 * (10 + 5 / 9 * 10))
    assert objective("steps_to_target", runs, 2.5) == pytest.approx(10 + 5 / 9 * 10)
    assert objective("loss_at_budget", runs, 0) == pytest.approx(2.1)
    assert objective("time_to_target", runs, 1.0) == math.inf  # the mean curve never reaches it
    assert objective("time_to_target", [runs[0], run([4.0], status=Status.FAILED)], 2.5) is None
