"""Resume rebuilds every candidate's Trial from the runs database and returns it as data."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.names import Rung, Verdict
from agent.resume import INTERRUPTED, counted_trials, restore, rewards
from agent.trial import BASE, CANDIDATE
from runs_db.db import RunsDB, SchemaError
from search_space.judge import fresh_seeds
from search_space.records import Point, RunResult, Status
from tests.toy import make_toy


def result(seed: int, loss: float = 2.0, fidelity: str = "short") -> RunResult:
    curve = [Point(0, 4.0, 0.0), Point(5, 3.0, 50.0), Point(10, loss, 100.0)]
    return RunResult(Status.OK, curve=curve, seed=seed, fidelity=fidelity, log="log\n")


def candidate(db: RunsDB, title: str, proposer: str = "ideas") -> str:
    commit, _ = db.commit_candidate(db.base_commit, {"train.py": f"# {title}\n"}, title, "why", proposer)
    return commit


@pytest.fixture
def db(tmp_path: Path):
    toy = make_toy(tmp_path / "toy")
    d = RunsDB.create(tmp_path / "search", {"plots": False}, toy)
    yield d
    d.close()


def test_an_empty_search_restores_nothing(db):
    r = restore(db, ["short", "full"], 3)
    assert (r.next_number, r.continuing, r.ended, r.base_runs, r.candidates) == (0, [], [], {}, 0)


def test_trials_come_back_where_they_stood(db, tmp_path):
    base = db.start_trial(db.base_commit, None, "baseline", "baseline", "short", {"seeds": [0, 1]})
    db.finish_trial(base, 100.0, [result(0), result(1)], {"target_loss": 2.05}, "complete")
    # A: ended after short, a reward for its arm
    a = candidate(db, "A")
    n = db.start_trial(a, None, "ideas", "A", "smoke", {"arm": "ideas", "ideas": ["x"], "seeds": [0]})
    db.finish_trial(n, float("inf"), [result(0, fidelity="smoke")], {"next": "short", "status": "ok"}, "complete")
    n = db.start_trial(a, None, "ideas", "A", "short", {"arm": "ideas", "seeds": [0]})
    db.finish_trial(n, 120.0, [result(0)], {"next": "", "verdict": "stopped", "won": False, "score": 1.2,
                                            "status": "ok"}, "complete")
    # B: passed smoke, its short never started
    b = candidate(db, "B", "knobs")
    n = db.start_trial(b, None, "knobs", "B", "smoke", {"arm": "knobs", "knobs": {"rate": 2.0}, "knob_trial": 4})
    db.finish_trial(n, float("inf"), [result(0, fidelity="smoke")], {"next": "short"}, "complete")
    # C: its confirm was running when the controller died
    c = candidate(db, "C")
    for rung, score in (("smoke", None), ("short", 0.6), ("full", 0.7)):
        n = db.start_trial(c, None, "ideas", "C", rung, {"arm": "ideas"})
        nxt = {"smoke": "short", "short": "full", "full": "confirm"}[rung]
        db.finish_trial(n, 70.0, [result(0, fidelity=rung)], {"next": nxt, "score": score}, "complete")
    confirm = db.start_trial(c, None, "ideas", "C", "confirm", {"arm": "ideas", "alpha": 0.004, "seeds": [11, 12]})
    # D: committed, then the controller died before its first trial
    d = candidate(db, "D", "llm")
    e, _ = db.commit_candidate(db.base_commit, {"train.py": "# E\n"}, "E", "why", "llm", model="m-1")
    db.close()
    with RunsDB.open(tmp_path / "search") as again:  # another session: C's running trial is stale
        r = restore(again, ["short", "full"], 3)
        assert again.trial(confirm).state == "fail" and again.trial(confirm).reason == INTERRUPTED
    # 7 study trials of candidates; the interrupted one is not spent (its rung runs again)
    assert r.next_number == confirm + 1 and r.interrupted == 1 and r.candidates == 6
    assert r.target_loss == {"short": 2.05} and [x.seed for x in r.base_runs["short"]] == [0, 1]
    assert r.base_seed == {"short": 2}
    (ended,) = r.ended
    assert (ended.commit, ended.verdict, ended.won, ended.scores) == (a, Verdict.STOPPED, False, {"short": 1.2})
    assert ended.proposal.ideas == ("x",) and rewards(r.ended) == [("ideas", False)]
    by = {t.commit: t for t in r.continuing}
    assert set(by) == {b, c, d, e}
    # never started: its arm comes from its commit, so the bandit hears of it when it ends
    assert (by[d].arm, by[e].arm, by[e].model) == (None, "llm:m-1", "m-1")
    assert (by[b].rung, by[b].batch, by[b].number) == (Rung.SHORT, (0,), None)
    assert by[b].proposal.meta == {"knob_trial": 4} and by[b].proposal.knobs == {"rate": 2.0}
    assert by[c].rung == Rung.CONFIRM and by[c].alpha == 0.004  # the FDR level it was given stays
    assert by[c].batch == tuple(fresh_seeds(c, "confirm", 0, 3)) and by[c].scores == {"short": 0.6, "full": 0.7}
    assert (by[d].rung, by[d].who) == (Rung.SMOKE, "llm")
    assert {rec.rung for rec in r.records if rec.commit == c} == {"smoke", "short", "full", "confirm"}


def test_a_candidate_that_started_at_short_comes_back_with_its_proposal(db, tmp_path):
    """A ladder without smoke (a GPU target, --smoke auto): the first study trial is at short, and it
    holds the proposal; interrupted there, the candidate runs short again with its knobs."""
    base = db.start_trial(db.base_commit, None, "baseline", "baseline", "short", {"seeds": [0]})
    db.finish_trial(base, 100.0, [result(0)], {"target_loss": 2.05}, "complete")
    f = candidate(db, "F", "knobs")
    n = db.start_trial(f, None, "knobs", "F", "short", {"arm": "knobs", "knobs": {"rate": 3.0}, "knob_trial": 7,
                                                         "seeds": [0]})
    db.close()
    with RunsDB.open(tmp_path / "search") as again:
        r = restore(again, ["short", "full"], 3)
        assert again.trial(n).reason == INTERRUPTED
    (t,) = r.continuing
    assert (t.commit, t.rung, t.number, t.arm) == (f, Rung.SHORT, None, "knobs")
    assert t.proposal.knobs == {"rate": 3.0} and t.proposal.meta == {"knob_trial": 7}


def test_an_older_search_is_refused_in_one_line(db):
    db.study.set_user_attr("schema", 1)
    with pytest.raises(SchemaError) as info:
        db.check_schema()
    assert "older speedsearch" in str(info.value) and "\n" not in str(info.value)
    db.study.set_user_attr("schema", 2)
    db.check_schema()


def test_status_reads_an_older_search_and_resume_refuses_it_in_one_line(db):
    import subprocess
    import sys

    db.study.set_user_attr("schema", 1)
    folder = str(db.dir)
    db.close()
    status = subprocess.run([sys.executable, "-m", "agent", "status", "--dir", folder], capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    resume = subprocess.run([sys.executable, "-m", "agent", "launch", "--dir", folder, "--resume"],
                            capture_output=True, text=True, timeout=120)
    assert resume.returncode == 2 and "Traceback" not in resume.stdout + resume.stderr
    assert "older speedsearch" in resume.stdout + resume.stderr


def test_an_interrupted_confirm_keeps_its_finished_pairs_and_costs_no_budget(db, tmp_path):
    c = candidate(db, "C")
    for rung in ("smoke", "short", "full"):
        n = db.start_trial(c, None, "ideas", "C", rung, {"arm": "ideas"})
        nxt = {"smoke": "short", "short": "full", "full": "confirm"}[rung]
        db.finish_trial(n, 70.0, [result(0, fidelity=rung)], {"next": nxt, "score": 0.7}, "complete")
    seeds = fresh_seeds(c, "confirm", 0, 5)  # a first batch of 3, then a look that added 2 pairs
    confirm = db.start_trial(c, None, "ideas", "C", "confirm", {"arm": "ideas", "alpha": 0.01, "seeds": seeds[:3]})
    base = db.start_trial(db.base_commit, None, "baseline", "beside", "confirm", {"pairs_for": confirm})
    for s in seeds[:4]:  # four pairs finished; the fifth only on the candidate's side
        db.save_run(confirm, result(s, 1.9, "full"))
        db.save_run(base, result(s, 2.0, "full"))
    db.save_run(confirm, result(seeds[4], 1.9, "full"))
    db.close()
    with RunsDB.open(tmp_path / "search") as again:
        r = restore(again, ["short", "full"], 3)
        spent = counted_trials(again)
    (t,) = r.continuing
    assert t.rung == Rung.CONFIRM and t.number is None and t.alpha == 0.01
    assert t.batch == tuple(seeds)  # grown to cover every finished run, in the order seeds are drawn
    # the whole pairs only: the fifth seed's lone candidate run is run again, beside a new base run
    assert set(t.carried) == {(CANDIDATE, s) for s in seeds[:4]} | {(BASE, s) for s in seeds[:4]}
    assert all(x.final.val_loss == 1.9 for k, x in t.carried.items() if k[0] == CANDIDATE)
    assert r.candidates == spent == 3  # smoke, short, full: the interrupted confirm is not counted


def test_an_interrupted_paired_screening_keeps_whole_pairs_only(db, tmp_path):
    """A `short` rung screened beside base runs (a busy machine) was cut off with seed 0's pair done
    and seed 1 done on the candidate's side only: seed 1 runs again as a pair, never its base alone."""
    c = candidate(db, "S")
    n = db.start_trial(c, None, "ideas", "S", "smoke", {"arm": "ideas"})
    db.finish_trial(n, 70.0, [result(0, fidelity="smoke")], {"next": "short", "score": 0.7}, "complete")
    short = db.start_trial(c, None, "ideas", "S", "short", {"arm": "ideas", "seeds": [0, 1]})
    base = db.start_trial(db.base_commit, None, "baseline", "beside", "short", {"pairs_for": short})
    db.save_run(short, result(0, 1.9))
    db.save_run(base, result(0, 2.0))
    db.save_run(short, result(1, 1.9))
    db.close()
    with RunsDB.open(tmp_path / "search") as again:
        (t,) = restore(again, ["short", "full"], 3).continuing
    assert t.rung == Rung.SHORT and set(t.carried) == {(CANDIDATE, 0), (BASE, 0)}


def test_resume_writes_lost_git_notes_again(db, tmp_path):
    import subprocess

    a = candidate(db, "A")
    n = db.start_trial(a, None, "ideas", "A", "smoke", {"arm": "ideas"})
    db.finish_trial(n, float("inf"), [result(0, fidelity="smoke")], {"next": "short", "status": "ok"}, "complete")
    db.flush()
    assert "speedsearch: A" in db.note(a)
    repo = str(db.repo_path)
    db.close()
    # a crash lost the notes (the background writer never ran): the ref is gone
    subprocess.run(["git", "-C", repo, "update-ref", "-d", "refs/notes/speedsearch"], check=True)
    with RunsDB.open(tmp_path / "search") as again:
        assert again.note(a) == ""
        restore(again, ["short", "full"], 3)
        again.flush()
        note = again.note(a)
    assert "speedsearch: A" in note and "smoke" in note


def test_a_resumed_search_reuses_the_runs_an_interrupted_trial_had_finished(ray_cluster, tmp_path):
    """The candidate's smoke run had finished when the controller died: the resumed search records
    it in the rung's new trial and does not run it again."""
    from agent.live import Live
    from agent.loop import Search
    from agent.runner import build_proposers, open_search
    from agent.settings import SearchSettings
    from env.pool import Pool

    toy = make_toy(tmp_path / "toy")
    settings = SearchSettings(target=str(toy.source), proposers=("ideas",), seeds=2, allow_untrusted=True,
                              max_fidelity="smoke", budget_trials=1, workers=2)
    db, settings = open_search(tmp_path / "search", settings)
    c = candidate(db, "carried over")
    n = db.start_trial(c, None, "ideas", "carried over", "smoke", {"arm": "ideas", "seeds": [0]})
    kept = RunResult(Status.OK, curve=[Point(0, 4.0, 0.0), Point(2, 1.2345, 20.0)], seed=0, fidelity="smoke",
                     log="the run that finished before the crash\n")
    db.save_run(n, kept)
    db.close()  # the controller dies with trial n running
    with RunsDB.open(tmp_path / "search") as again:
        pool = Pool(run_root=tmp_path / "runs")
        summary = Search(again, toy, settings, pool, build_proposers(settings, toy, again), Live(enabled=False)).run()
        trials = again.trials()
        assert again.trial(n).reason == INTERRUPTED
        (redo,) = [t for t in trials if t.commit == c and t.number != n]
        runs = again.runs(redo.number)
    assert summary.trials == 1  # the interrupted trial was not counted, its redo was
    assert redo.state == "complete" and redo.fidelity == "smoke"
    assert [r.final.val_loss for r in runs] == [1.2345]  # the finished run, not a new one
    assert "finished before the crash" in Path(runs[0].log).read_text()
