"""The drain (`--drain-minutes`): at the minutes budget nothing new starts, and a confirmation
already under way may finish for up to the drain's minutes; with no drain it is cut off, and the
search says so (a `--resume` runs it again).

The real loop, real Ray (logical GPUs), the toy trainer and the real idea library. One thing is
arranged: WHEN the minutes budget ends. A wall-clock budget would fall inside a confirmation only
by luck on a shared machine, so the search below ends its budget at the moment its first
confirmation starts (the budget is set to the time elapsed then); everything after that moment is
the loop's own behaviour.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from agent import ladder
from agent.live import Live
from agent.loop import Search
from agent.names import Rung, Verdict
from agent.resume import INTERRUPTED
from agent.runner import build_proposers, open_search
from agent.settings import SearchSettings
from env.pool import Pool
from runs_db.db import RunsDB
from search_space import judge
from tests.toy import make_toy

DRAIN_MIN = 1.0  # the drain allowed; the toy's confirmation needs a few seconds of it


class BudgetEndsAtFirstConfirm(Search):
    """The real Search; its minutes budget runs out as its first confirmation starts."""

    cut_at: float | None = None
    confirming = None  # that candidate's Trial
    trials_at_cut = 0
    asked_after_cut = 0  # proposals asked for after the budget ran out

    def _start(self, t):
        number = super()._start(t)
        if self.cut_at is None and t.rung == Rung.CONFIRM and not t.is_baseline:
            self.cut_at = time.time()
            self.settings = dataclasses.replace(self.settings, budget_minutes=(self.cut_at - self.started) / 60)
            self.confirming, self.trials_at_cut = t, self.summary.trials
        return number

    def _propose(self) -> None:
        before = set(self.ahead.futures)
        super()._propose()
        if self.cut_at is not None:
            self.asked_after_cut += len(set(self.ahead.futures) - before)


def search(tmp_path: Path, drain_minutes: float):
    toy = make_toy(tmp_path / "toy", gpus=1, sleep=0.02, full=20, short=10)
    # budget_minutes 5 only until the first confirmation starts; budget_trials a backstop if none ever does
    settings = SearchSettings(target=str(toy.source), proposers=("ideas",), seeds=2, workers=4,
                              allow_untrusted=True,  # the toy declares no trusted evaluator
                              budget_minutes=5, budget_trials=30, drain_minutes=drain_minutes)
    db, settings = open_search(tmp_path / "search", settings)
    live = Live(enabled=False)  # keeps its notes; the CLI prints the same ones
    with db:
        s = BudgetEndsAtFirstConfirm(db, toy, settings, Pool(run_root=tmp_path / "runs"),
                                     build_proposers(settings, toy, db), live)
        summary = s.run()
    ended = time.time()
    assert s.cut_at is not None, f"no candidate reached confirm: {summary}"
    with RunsDB.open(tmp_path / "search") as db:
        trials = {t.number: t for t in db.trials()}
    return s, summary, ended, trials, live.notes


def common_checks(s, summary, trials) -> None:
    """At the budget: the search stopped for it, and no new candidate was proposed or started."""
    assert summary.stopped_by == "minutes", summary
    assert s.asked_after_cut == 0, f"{s.asked_after_cut} proposals were asked for after the budget"
    assert summary.trials == s.trials_at_cut, "a candidate rung started after the budget"
    t = s.confirming
    later = [n for n, r in trials.items() if n > t.base_number and r.proposer != "baseline"]
    assert later == [], f"candidate trials started after the budget: {later}"
    assert not [n for n, r in trials.items() if r.state == "running"], "a trial was left RUNNING"


def test_a_confirmation_under_way_finishes_within_the_drain(ray_cluster, tmp_path: Path):
    s, summary, ended, trials, notes = search(tmp_path, DRAIN_MIN)
    common_checks(s, summary, trials)
    t = s.confirming
    # its verdict is recorded, in the study and in the summary, and the search ended within the drain
    assert t.verdict in (Verdict.PASS, Verdict.FAIL), t.verdict
    record = trials[t.numbers[Rung.CONFIRM]]
    assert record.state == "complete" and record.attrs.get("verdict") == t.verdict, record
    assert record.attrs.get("pairs", 0) >= 6  # the sequential test's first look, at least
    assert trials[t.base_number].state == "complete"  # its paired baseline runs are kept
    assert len(summary.confirmed) + summary.rejected == 1
    assert ended - s.cut_at < DRAIN_MIN * 60
    assert any("finishing 1 confirmation(s) under way" in n for n in notes), notes


def test_with_no_drain_the_confirmation_is_cut_off_and_says_so(ray_cluster, tmp_path: Path):
    s, summary, _, trials, notes = search(tmp_path, 0.0)
    common_checks(s, summary, trials)
    t = s.confirming
    assert t.verdict == "", "a verdict was reached although the search had no time to drain"
    for number in (t.numbers[Rung.CONFIRM], t.base_number):  # both marked for a resume to run again
        assert trials[number].state == "fail" and trials[number].reason == INTERRUPTED, trials[number]
    assert summary.confirmed == [] and summary.rejected == 0
    assert any("cut off" in n and "1 confirmation" in n for n in notes), notes
    assert "nothing was confirmed" in notes[-1]



class Watched(Search):
    """The real Search, watched: what it sends to Ray, in order, and when each confirmation ends."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.events: list[tuple] = []  # ("run", trial number, role, seed, rung) | ("verdict", trial number)
        self.most_inflight = 0

    def _dispatch(self) -> None:
        before = set(self.inflight)
        super()._dispatch()
        self.most_inflight = max(self.most_inflight, len(self.inflight))
        for ref in [r for r in self.inflight if r not in before]:  # dicts keep the order of submission
            t, role, seed = self.inflight[ref]
            self.events.append(("run", t.number, role, seed, t.rung))

    def _end(self, t, verdict, attrs) -> None:
        super()._end(t, verdict, attrs)
        if t.rung == Rung.CONFIRM:
            self.events.append(("verdict", t.number))


def test_two_workers_finish_one_confirmation_before_the_next_and_send_pairs_together(ray_cluster, tmp_path: Path,
                                                                                   monkeypatch):
    """The idea library's two real gains (a higher rate, less sleep) reach confirm close together on
    2 workers. Ray never holds more runs than there are workers; a pair's two runs are sent
    together; the confirmation started second sends no run before the first has its verdict. The
    machine is taken as busy (ladder.PAIR_SPREAD below any spread), so short and full run beside a
    base partner too, recorded in its own base trial, and judged against it."""
    monkeypatch.setattr(ladder, "PAIR_SPREAD", -1.0)
    toy = make_toy(tmp_path / "toy", gpus=1, sleep=0.02, full=20, short=10)
    settings = SearchSettings(target=str(toy.source), proposers=("ideas",), seeds=2, workers=2,
                              allow_untrusted=True, budget_trials=12)
    db, settings = open_search(tmp_path / "search", settings)
    with db:
        s = Watched(db, toy, settings, Pool(run_root=tmp_path / "runs"), build_proposers(settings, toy, db),
                    Live(enabled=False))
        s.run()
    assert s.most_inflight <= 2, f"{s.most_inflight} runs were in Ray at once on 2 workers"
    runs = [e for e in s.events if e[0] == "run"]
    for k, e in enumerate(runs):  # every base partner right after its candidate run, with the same seed
        if e[2] == "base":
            assert runs[k - 1][1:] == (e[1], "candidate", e[3], e[4]), f"pair not sent together: {runs[k - 1:k + 1]}"
    confirm = [e for e in runs if e[4] == Rung.CONFIRM]
    order = []  # confirmations in the order they started
    for e in confirm:
        if e[1] not in order:
            order.append(e[1])
    assert len(order) >= 2, f"fewer than two confirmations ran: {s.events}"
    for first, second in zip(order, order[1:], strict=False):
        done = s.events.index(("verdict", first)) if ("verdict", first) in s.events else len(s.events)
        early = [e for e in s.events[:done] if e[0] == "run" and e[1] == second]
        assert early == [], f"confirmation {second} ran {early} before {first} had its verdict"
    with RunsDB.open(tmp_path / "search") as db:
        trials = db.trials()
        partners = {t.attrs["pairs_for"]: t for t in trials if t.attrs.get("pairs_for") is not None}
        screened = [t for t in trials if t.proposer != "baseline" and t.fidelity in ("short", "full")
                    and t.state == "complete"]
        assert screened
        for t in screened:
            b = partners.get(t.number)
            assert b is not None and b.fidelity == t.fidelity and b.state == "complete", (t, b)
            assert [r.seed for r in db.runs(b.number)] == [0]
            assert "its base run side by side" in t.attrs["speedup_text"], t.attrs["speedup_text"]
        for t in trials:  # confirm's partners: its fresh seeds only, never a screening partner's seed 0
            if t.proposer != "baseline" and t.fidelity == "confirm" and t.number in partners:
                assert min(r.seed for r in db.runs(partners[t.number].number)) >= judge.SEED_FLOOR
