"""Resume rebuilds every candidate's Trial from the runs database and returns it as data."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.names import Rung, Verdict
from agent.resume import INTERRUPTED, restore, rewards
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
    db.close()
    with RunsDB.open(tmp_path / "search") as again:  # another session: C's running trial is stale
        r = restore(again, ["short", "full"], 3)
        assert again.trial(confirm).state == "fail" and again.trial(confirm).reason == INTERRUPTED
    assert r.next_number == confirm + 1 and r.interrupted == 1 and r.candidates == 7  # study trials
    assert r.target_loss == {"short": 2.05} and [x.seed for x in r.base_runs["short"]] == [0, 1]
    assert r.base_seed == {"short": 2}
    (ended,) = r.ended
    assert (ended.commit, ended.verdict, ended.won, ended.scores) == (a, Verdict.STOPPED, False, {"short": 1.2})
    assert ended.proposal.ideas == ("x",) and rewards(r.ended) == [("ideas", False)]
    by = {t.commit: t for t in r.continuing}
    assert set(by) == {b, c, d}
    assert (by[b].rung, by[b].batch, by[b].number) == (Rung.SHORT, (0,), None)
    assert by[b].proposal.meta == {"knob_trial": 4} and by[b].proposal.knobs == {"rate": 2.0}
    assert by[c].rung == Rung.CONFIRM and by[c].alpha == 0.004  # the FDR level it was given stays
    assert by[c].batch == tuple(fresh_seeds(c, "confirm", 0, 3)) and by[c].scores == {"short": 0.6, "full": 0.7}
    assert (by[d].rung, by[d].who) == (Rung.SMOKE, "llm")
    assert {rec.rung for rec in r.records if rec.commit == c} == {"smoke", "short", "full", "confirm"}


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
