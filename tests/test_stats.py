"""Band, objective, the speedrun's t-test, timing ratios, sequential confirmation."""

from __future__ import annotations

import math

import pytest

from env.stats import Band, crossing, decide, loss_pvalue, mean_curve, objective, timing_ratio
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


def test_crossing_interpolates_and_objectives():
    curve = [Point(0, 4.0, 0), Point(10, 3.0, 100), Point(20, 2.0, 200)]
    assert crossing(curve, 2.5) == pytest.approx(150.0)
    assert crossing(curve, 2.5, "step") == pytest.approx(15.0)
    assert crossing(curve, 1.0) == math.inf
    runs = [run([4.0, 3.0, 2.0]), run([4.0, 3.0, 2.2])]
    assert mean_curve(runs)[-1].val_loss == pytest.approx(2.1)
    assert objective("time_to_target", runs, 2.5) == pytest.approx(10 * (10 + 5 / 9 * 10))
    assert objective("loss_at_budget", runs, 0) == pytest.approx(2.1)
    assert objective("time_to_target", [runs[0], run([4.0], status=Status.FAILED)], 2.5) is None


def test_pvalue_and_decide():
    assert loss_pvalue([3.270, 3.271, 3.269, 3.272], 3.28) < 0.01
    assert loss_pvalue([3.29, 3.30, 3.28], 3.28) > 0.5
    assert loss_pvalue([3.2], 3.28) == 1.0  # one seed proves nothing
    assert decide([3.270, 3.271, 3.269], 3.28) == "pass"
    assert decide([3.30, 3.31, 3.305], 3.28) == "fail"
    assert decide([3.279, 3.281], 3.28) == "more"
    assert decide([3.279, 3.281] * 4, 3.28, max_seeds=8) == "fail"


def test_timing_ratio_paired_and_welch():
    r = timing_ratio([90.0, 91.0, 89.0], [100.0, 101.0, 99.0])
    assert r.ratio == pytest.approx(0.9, abs=0.005) and r.low < r.ratio < r.high < 1.0
    w = timing_ratio([90.0, 95.0, 85.0, 92.0], [100.0, 103.0], paired=False)
    assert w.low < w.ratio < w.high and w.n == 2
