"""The ladder's decisions, pure: where a candidate goes after each rung, and confirm's pairs."""

from __future__ import annotations

import random

from agent import ladder
from agent.names import LADDER, Rung, Verdict
from search_space import judge
from search_space.judge import Obs
from search_space.records import Point, RunResult, Status


def sp(estimate: float, kind: str = "time_to_target") -> judge.Speedup:
    return judge.Speedup(kind, 2.0, estimate, float("nan"), float("nan"), 1)


def test_smoke_climbs_to_short_with_one_seed():
    assert ladder.after_rung(Rung.SMOKE, LADDER, True, False) == ladder.Step(Rung.SHORT, 1)


def test_a_failed_rung_stops_the_candidate():
    for rung in (Rung.SMOKE, Rung.SHORT, Rung.FULL):
        assert ladder.after_rung(rung, LADDER, False, True) == ladder.Step(None, verdict=Verdict.STOPPED)


def test_short_and_full_climb_only_when_they_beat_the_baseline():
    assert ladder.after_rung(Rung.SHORT, LADDER, True, False).verdict == Verdict.STOPPED
    assert ladder.after_rung(Rung.SHORT, LADDER, True, True) == ladder.Step(Rung.FULL, 1)
    assert ladder.after_rung(Rung.FULL, LADDER, True, True, first_batch=3) == ladder.Step(Rung.CONFIRM, 3)


def test_the_top_rung_allowed_ends_unconfirmed():
    assert ladder.after_rung(Rung.SHORT, LADDER[:2], True, True) == ladder.Step(None, verdict=Verdict.UNCONFIRMED)


def test_untrusted_results_never_enter_confirm_unless_allowed():
    assert ladder.after_rung(Rung.FULL, LADDER, True, True, trusted=False).verdict == Verdict.UNTRUSTED
    assert ladder.after_rung(Rung.FULL, LADDER, True, True, trusted=False, allow_untrusted=True).rung == Rung.CONFIRM


def test_beats_needs_the_ratio_or_a_lower_loss():
    assert ladder.beats(sp(1.2), 1.0) and not ladder.beats(sp(1.2), 1.3) and not ladder.beats(sp(0.9), 1.0)
    assert ladder.beats(sp(0.95), 0.9)  # a bar below 1 lets a slightly slower measurement climb
    assert ladder.beats(sp(-0.01, "loss_at_budget"), 1.0) and not ladder.beats(sp(0.01, "loss_at_budget"), 1.0)
    assert not ladder.beats(None, 1.0)


def pairs(gain: float, n: int, sd: float = 0.01, seed: int = 0) -> list[tuple[Obs, Obs]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = 1000 * (1 + rng.gauss(0, sd))
        out.append((Obs(base / gain * (1 + rng.gauss(0, sd))), Obs(base)))
    return out


def test_confirm_passes_a_clear_gain_and_fails_no_gain():
    n = judge.MIN_PAIRS
    assert ladder.after_confirm("time_to_target", pairs(1.5, n), 0.05).verdict == Verdict.PASS
    step = ladder.after_confirm("time_to_target", pairs(0.8, n), 0.05)
    assert step == ladder.Step(None, verdict=Verdict.FAIL)  # slower: futility


def test_confirm_asks_for_more_pairs_until_max():
    few = pairs(1.5, 1)
    step = ladder.after_confirm("time_to_target", few, 0.05, 10, add=2, min_pairs=3)
    assert step.rung == Rung.CONFIRM and step.seeds == 2 and step.verdict == Verdict.MORE
    capped = ladder.after_confirm("time_to_target", few, 0.05, 2, add=4, min_pairs=3)
    assert capped.rung == Rung.CONFIRM and capped.seeds == 1  # never past max_pairs


def test_confirm_reads_every_prefix_once():
    # A pass at the first look stands even when the next pair, arriving in the same batch, is poor.
    good = pairs(1.5, judge.MIN_PAIRS, sd=0.001)
    bad = good + [(Obs(5000.0), Obs(1000.0))]
    assert judge.decide("time_to_target", bad, 0.05) != "pass"
    assert ladder.after_confirm("time_to_target", bad, 0.05).verdict == Verdict.PASS


def run(seed: int, t_ms: float, node: str, status: Status = Status.OK) -> RunResult:
    curve = [Point(0, 4.0, 0.0), Point(10, 1.0, t_ms)]
    return RunResult(status, curve=curve, seed=seed, provenance={"worker": f"{node}/cpu-1"})


def test_pairs_form_on_one_node_in_draw_order():
    order = [7, 3, 5, 9]
    cand = [run(3, 500, "a"), run(7, 400, "a"), run(5, 450, "a"), run(9, 300, "a")]
    base = {3: run(3, 1000, "a"), 7: run(7, 800, "a"), 5: run(5, 900, "b"), 9: run(9, 1, "a", Status.FAILED)}
    got, lost = ladder.confirm_pairs(cand, base, "time_to_target", 2.0, order)
    assert lost == 2  # seed 5 ran on two nodes, seed 9's baseline failed
    assert [(round(c.value), round(b.value)) for c, b in got] == [(267, 533), (333, 667)]  # seeds 7 then 3


def test_screening_pairs_only_on_a_busy_machine_with_two_workers():
    assert ladder.screen_paired(0.5, 2)  # this shared machine's spread of one run
    assert not ladder.screen_paired(0.03, 64)  # a quiet machine: the base's mean is the better yardstick
    assert not ladder.screen_paired(0.5, 1)  # one worker cannot run a pair side by side
    assert ladder.screen_paired(0.0, 8, packed=True)  # runs packed on a GPU: always beside a base run
    assert not ladder.screen_paired(0.0, 1, packed=True)
    # the slack is only at full, and only when paired
    assert ladder.screen_bar(Rung.FULL, 1.0, True) == ladder.PAIRED_FULL_SLACK < 1.0
    assert ladder.screen_bar(Rung.SHORT, 1.0, True) == 1.0
    assert ladder.screen_bar(Rung.FULL, 1.0, False) == 1.0


def test_the_bases_spread_decides_screening(tmp_path):
    """Baselines.spread: the sd of the base's log time to the target over its recent runs."""
    from agent.baseline import Baselines
    from tests.toy import make_toy

    def base_run(seed: int, t_ms: float) -> RunResult:
        return RunResult(Status.OK, curve=[Point(0, 4.0, 0.0), Point(10, 2.0, t_ms / 2), Point(20, 1.0, t_ms)],
                         seed=seed)

    quiet, busy = Baselines(make_toy(tmp_path / "q")), Baselines(make_toy(tmp_path / "b"))
    quiet.add("full", [base_run(s, t) for s, t in enumerate((1000, 1020, 990, 1010))])
    busy.add("full", [base_run(s, t) for s, t in enumerate((1000, 1900, 700, 1400))])
    assert quiet.spread("full") < ladder.PAIR_SPREAD < busy.spread("full")
    assert not ladder.screen_paired(quiet.spread("full"), 2) and ladder.screen_paired(busy.spread("full"), 2)
    assert quiet.spread("short") == 0.0  # not measured there: nothing to pair by


def test_a_long_start_up_skips_smoke_unless_told():
    """SearchSettings.smoke: where a run's declared start-up is long, short pays it again, so `auto`
    starts candidates at short there; elsewhere smoke stays; on/off say so everywhere."""
    import pytest

    from agent.settings import LONG_STARTUP_S, SearchSettings
    from search_space.errors import UserError

    auto, no_smoke = SearchSettings(), (Rung.SHORT, Rung.FULL, Rung.CONFIRM)
    assert auto.ladder(0.0) == auto.ladder(LONG_STARTUP_S - 1) == LADDER
    assert auto.ladder(LONG_STARTUP_S) == auto.ladder(600.0) == no_smoke
    assert SearchSettings(smoke="on").ladder(600.0) == LADDER
    assert SearchSettings(smoke="off").ladder(0.0) == no_smoke
    assert SearchSettings(max_fidelity="smoke").ladder(600.0) == (Rung.SMOKE,)  # auto keeps the only rung asked for
    with pytest.raises(UserError, match="ladder would be empty"):
        SearchSettings(smoke="off", max_fidelity="smoke")
    with pytest.raises(UserError, match="--smoke maybe"):
        SearchSettings(smoke="maybe")
    # without smoke a candidate's first rung is short: it climbs from there as before, and a crash
    # there stops it as smoke would have
    assert ladder.after_rung(Rung.SHORT, no_smoke, True, True) == ladder.Step(Rung.FULL, 1)
    assert ladder.after_rung(Rung.SHORT, no_smoke, False, False).verdict == Verdict.STOPPED
    # a trial interrupted at smoke in a search whose ladder has none goes on to the next rung it has
    assert ladder.after_rung(Rung.SMOKE, no_smoke, True, False) == ladder.Step(Rung.SHORT, 1)
    assert ladder.following(Rung.FULL, (Rung.SHORT, Rung.FULL)) is None
