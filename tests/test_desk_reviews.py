"""The review desk reads the reviews only when they may have changed (issue #8: no query per loop
tick), and what the proposers are given is never stale: a review the page queued, once written, and
one written by another process holding the writer lock both reach the next proposal's context.
Real Search, RunsDB (Optuna/SQLite, git) and recorder thread; the statements counted are SQLAlchemy's."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from agent.live import Live
from agent.loop import Search
from agent.review.desk import Desk
from agent.runner import build_proposers, open_search
from agent.settings import SearchSettings
from env.pool import Pool
from runs_db import reviews as rv
from tests.toy import make_toy


class LoopStatements:
    """SQL statements run on this (the loop's) thread while counting."""

    def __init__(self) -> None:
        self.n = 0

    def _seen(self, *_args) -> None:
        if threading.current_thread() is threading.main_thread():
            self.n += 1

    def __enter__(self) -> LoopStatements:
        event.listen(Engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(Engine, "before_cursor_execute", self._seen)


@pytest.fixture
def search(ray_cluster, tmp_path: Path) -> Iterator[Search]:
    toy = make_toy(tmp_path / "toy")
    settings = SearchSettings(target=str(toy.source), proposers=("ideas",), workers=2)
    db, settings = open_search(tmp_path / "search", settings)
    with db:
        s = Search(db, toy, settings, Pool(run_root=tmp_path / "runs"), build_proposers(settings, toy, db),
                   Live(enabled=False))
        try:
            yield s
        finally:
            s.recorder.close()
            s.committer.close()
            s.teller.shutdown()


def candidate(s: Search, line: str) -> str:
    base = s.db.base_commit
    text = s.db.files(base, ["train.py"])["train.py"]
    commit, _ = s.db.commit_candidate(base, {"train.py": text + f"\n{line}\n"}, line, "why", "ideas")
    return commit


def tick(desk: Desk) -> None:
    desk.next_at = 0.0  # a tick now, not a second after the last
    desk.tick()


def notes(s: Search) -> list[str]:
    return s.candidates.context(s.db.base_commit, "").notes


def test_a_queued_review_reaches_the_next_context_and_quiet_ticks_read_nothing(search: Search):
    s, d = search, search.db.dir
    cand = candidate(s, "# A = 1")
    desk = Desk(s)
    try:
        assert desk.lock.held and s.candidates.rejected == set() and notes(s) == []
        with LoopStatements() as q:
            for _ in range(3):
                tick(desk)
        assert q.n == 0, "a tick with nothing new read the study"

        rv.request(d, cand, decision="reject", note="NOTE-91: keep the rate")  # what the page does
        tick(desk)  # hands the apply to the recorder
        s.recorder.flush()
        tick(desk)  # sees it written: reads again
        assert s.candidates.rejected == {cand}
        got = notes(s)
        assert len(got) == 1 and "NOTE-91: keep the rate" in got[0] and cand[:8] in got[0] and "rejected" in got[0]
        assert not rv.queued(d)

        rv.request(d, cand, decision=None)  # the reject taken back, the note kept
        tick(desk)
        s.recorder.flush()
        tick(desk)
        assert s.candidates.rejected == set() and "rejected" not in notes(s)[0] and "NOTE-91" in notes(s)[0]
        with LoopStatements() as q:
            tick(desk)
        assert q.n == 0
    finally:
        desk.close()


def test_while_another_process_is_the_writer_every_tick_reads(search: Search):
    s, d = search, search.db.dir
    cand = candidate(s, "# B = 2")
    with rv.writer(d) as held:  # the review page, say, holding the folder as the search starts
        assert held
        desk = Desk(s)
        try:
            assert not desk.lock.held
            rv.set_review(s.db, cand, decision="reject", note="NOTE-17")  # written by that writer, not queued
            s.db.set_state("notes", ["the search's own note"])
            tick(desk)
            assert s.candidates.rejected == {cand}
            got = notes(s)
            assert got[0] == "the search's own note" and "NOTE-17" in got[1]
        finally:
            desk.close()
