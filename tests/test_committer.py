"""Candidate commits are made on the committer's thread (agent/committer.py), never the loop's, and a
clean stop leaves no candidate branch that no study trial names. Real git, Optuna and Ray."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from agent.candidates import Candidates
from agent.committer import THREAD, Committer
from agent.live import Live
from agent.loop import Search
from agent.proposal import Proposal
from agent.runner import build_proposers, open_search
from agent.settings import SearchSettings
from agent.trial import Trial
from env.pool import Pool
from runs_db.db import RunsDB
from runs_db.history import History
from search_space.edits import parse_edits
from tests.test_loop import check_git_and_study_agree
from tests.toy import make_toy

# git's writing commands: a commit is made of these (runs_db/history.py)
WRITES = {"hash-object", "read-tree", "update-index", "write-tree", "commit-tree", "update-ref"}


def rate(parent: str, value: str, title: str = "", tail: str = "") -> Proposal:
    edit = f"train.py\n<<<<<<< SEARCH\nRATE = 1.0\n=======\nRATE = {value}{tail}\n>>>>>>> REPLACE\n"
    return Proposal(title or f"rate {value}", "why", "ideas", parent, edits=tuple(parse_edits(edit)))


def accepted(cands: Candidates, p: Proposal) -> Trial:
    changes, why = cands.accept(p)
    assert changes is not None, why
    return Trial("", p.parent, p.title, p.proposer, proposal=p, changes=changes)


def commit_threads(monkeypatch, made: set[str] | None = None) -> list[str]:
    """The names of the threads History.commit runs on (the real method, called through); the
    commits it returns go into `made`."""
    names: list[str] = []
    real = History.commit

    def spy(self, *args, **kw):
        names.append(threading.current_thread().name)
        commit, created = real(self, *args, **kw)
        if made is not None:
            made.add(commit)
        return commit, created

    monkeypatch.setattr(History, "commit", spy)
    return names


def assert_fsck_clean(repo: Path) -> None:
    out = subprocess.run(["git", "-C", str(repo), "fsck", "--full", "--strict"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    bad = [ln for ln in (out.stdout + out.stderr).splitlines() if not ln.startswith(("dangling", "Checking"))]
    assert not bad, bad  # dangling commits are the discarded ones: fine; anything else is not


@pytest.fixture
def db(tmp_path: Path):
    toy = make_toy(tmp_path / "toy")
    with RunsDB.create(tmp_path / "search", {"target": str(toy.source)}, toy) as db:
        yield db, toy


def test_commits_come_back_in_order_from_the_committer_thread(db, monkeypatch):
    db, toy = db
    threads = commit_threads(monkeypatch)
    cands, committer = Candidates(db, toy), Committer(db)
    base = db.base_commit
    trials = [accepted(cands, rate(base, v)) for v in ("2.0", "3.0", "4.0")]
    # the rules are checked and twins caught before anything is committed
    frozen = Proposal("touch data", "", "ideas", base, edits=tuple(parse_edits(
        "data.py\n<<<<<<< SEARCH\n# frozen\n=======\n# thawed\n>>>>>>> REPLACE\n")))
    assert cands.accept(frozen)[0] is None
    changes, why = cands.accept(rate(base, "2.0", "same, trailing blanks", tail="  \n"))
    assert changes is None and "a queued proposal" in why
    for t in trials:
        committer.submit(t)
    got = committer.collect(wait=True)
    assert [t.title for t, _ in got] == ["rate 2.0", "rate 3.0", "rate 4.0"] and committer.pending == 0
    commits = []
    for t, written in got:
        commit, why = cands.committed(t.proposal, t.changes, written)
        assert commit and not why
        assert written.diff == db.diff(commit) and "RATE = " in written.diff  # for proposers' contexts, no git
        commits.append(commit)
    assert threads and all(name.startswith(THREAD) for name in threads), threads
    assert [c for c, *_ in db.candidates()] == commits
    assert cands.unrecorded == set(commits)
    from_git = Candidates(db, toy)  # the files it knew without git are git's
    assert all(cands.files(c) == from_git.files(c) for c in commits)
    # a twin of a committed candidate names it, so the loop can hand it to a resume's proposal-less twin
    twin = rate(base, "3.0", "again")
    assert cands.accept(twin)[0] is None and twin.meta["twin"] == commits[1]
    # one started (its study trial recorded), two never: a stop deletes those two branches only
    db.start_trial(commits[0], base, "ideas", "rate 2.0", "smoke", {})
    cands.unrecorded.discard(commits[0])
    committer.close(discard=cands.unrecorded)
    assert [c for c, *_ in db.candidates()] == [commits[0]]
    assert_fsck_clean(db.repo_path)
    again = Candidates(db, toy)  # as a resume sees it: the discarded changes may be proposed again
    assert not again.unrecorded
    assert again.accept(rate(base, "3.0"))[0] is not None
    assert again.accept(rate(base, "2.0"))[0] is None


def test_a_crash_leftover_is_unrecorded_until_a_trial_names_it(db):
    db, toy = db
    left, _ = db.commit_candidate(db.base_commit, {"train.py": "# left\n"}, "left", "why", "ideas")
    kept, _ = db.commit_candidate(db.base_commit, {"train.py": "# kept\n"}, "kept", "why", "ideas")
    db.start_trial(kept, db.base_commit, "ideas", "kept", "smoke", {})
    cands = Candidates(db, toy)
    assert cands.unrecorded == {left}
    committer = Committer(db)
    committer.close(discard=cands.unrecorded)
    assert [c for c, *_ in db.candidates()] == [kept]


def test_the_loop_thread_makes_no_commit(ray_cluster, tmp_path: Path, monkeypatch):
    """A whole search: every candidate commit is made on the committer's thread and no git write
    runs on the loop's; at the stop, commits made ahead and never started leave no branch behind."""
    made: set[str] = set()
    threads = commit_threads(monkeypatch, made)
    git_on_loop: list[list[str]] = []  # every git process the loop's thread started
    real_init = subprocess.Popen.__init__

    def spy(self, args, *rest, **kw):
        argv = [str(a) for a in (args if isinstance(args, (list, tuple)) else [args])]
        if threading.current_thread() is threading.main_thread() and Path(argv[0]).name == "git":
            git_on_loop.append(argv)
        real_init(self, args, *rest, **kw)

    toy = make_toy(tmp_path / "toy", gpus=1, sleep=0.005, full=10, short=6)
    settings = SearchSettings(target=str(toy.source), proposers=("ideas", "knobs"), seeds=2, allow_untrusted=True,
                              budget_trials=14, workers=4, max_fidelity="short")
    db, settings = open_search(tmp_path / "search", settings)  # the base's commit: made here, before the search
    with db:
        search = Search(db, toy, settings, Pool(run_root=tmp_path / "runs"), build_proposers(settings, toy, db),
                        Live(enabled=False))
        monkeypatch.setattr(subprocess.Popen, "__init__", spy)
        summary = search.run()
        repo = db.repo_path
    assert summary.trials == 14, summary
    assert threads and all(name.startswith(THREAD) for name in threads), threads
    assert not [argv for argv in git_on_loop if WRITES & set(argv)], git_on_loop
    # nor reads one: its diff came with it, and its source was shipped to Ray's object store there too
    assert made and not [argv for argv in git_on_loop if made & set(argv)], git_on_loop
    assert len(git_on_loop) < len(made), git_on_loop  # the base's shipping, once; it used to be ~10 a commit
    check_git_and_study_agree(tmp_path / "search")  # every trial's commit is in git, every branch has a trial
    assert_fsck_clean(repo)
