"""The closing summary's best confirmed candidate, for both kinds of speed-up."""

from types import SimpleNamespace

from agent.meter import Summary


def _trial(commit: str, estimate: float, kind: str):
    return SimpleNamespace(commit=commit, title=commit, speedup_text=f"{estimate}",
                           speedup={"estimate": estimate, "kind": kind})


def test_best_is_the_largest_ratio():
    s = Summary()
    assert s.confirm(_trial("a", 1.2, "time_to_target"))
    assert not s.confirm(_trial("b", 1.1, "time_to_target"))
    assert s.confirm(_trial("c", 1.5, "time_to_target")) and s.best_commit == "c"
    assert [c for c, *_ in s.confirmed] == ["a", "b", "c"]


def test_best_loss_at_budget_is_the_largest_reduction():
    """A loss difference (candidate - base) is better when lower: -0.05 beats -0.02."""
    s = Summary()
    assert s.confirm(_trial("a", -0.02, "loss_at_budget"))
    assert s.confirm(_trial("b", -0.05, "loss_at_budget"))
    assert not s.confirm(_trial("c", -0.03, "loss_at_budget"))
    assert s.best_commit == "b" and s.best_speedup == -0.05
