"""Candidates' loss-curve plots, drawn in a child process.

A plot costs about 0.3 s of matplotlib and a read of the whole study; drawn on the recorder thread
for every candidate that reached `full`, it took more than half of that thread's time in a
1000-trial search, and the recorder's pace bounds how many runs a search keeps going. So the
view (runs_db.dashboard) hands each plot to one spawned process that opens the search folder
itself. The view trial names the plot's path when the candidate ends (an ended Optuna trial
cannot change); the search's end waits for what is still queued.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

from runs_db.study import TrialRecord
from search_space.records import RunResult

if TYPE_CHECKING:
    from runs_db.db import RunsDB

log = logging.getLogger(__name__)

FULL_LENGTH = ("full", "confirm")  # rungs whose runs go all the steps
BASELINE = "baseline"  # runs_db.db.BASELINE
BAND_RUNS = 16  # the base's latest runs at full that make a plot's band: its recent state, bounded cost


def draw(db: RunsDB, commit: str, proposers: frozenset[str], trials: list[TrialRecord] | None = None) -> str | None:
    """The candidate's full-length runs against the base's band; the plot's path in the search
    folder, or None when it never reached `full`. A plot never costs a result: errors are logged."""
    try:
        trials = db.trials() if trials is None else trials
        mine: list[RunResult] = []
        last: TrialRecord | None = None
        for t in trials:
            if t.commit == commit and t.proposer in proposers:
                last = t
                if t.fidelity in FULL_LENGTH:
                    mine += db.runs(t.number)
        if last is None or not any(r.curve for r in mine):
            return None
        base: list[RunResult] = []
        for t in reversed(trials):
            if t.proposer == BASELINE and t.state == "complete" and len(base) < BAND_RUNS:
                base += [r for r in db.runs(t.number) if r.fidelity == "full" and r.status == "ok"]
        from runs_db.plots import plot_loss_curves  # matplotlib loads only when drawing

        detail = last.attrs.get("speedup_detail") or {}
        text = last.attrs.get("speedup_text") or ""
        drawn = plot_loss_curves(mine, base[:BAND_RUNS], db.artifacts.candidate_plot_path(commit),
                                 target_loss=detail.get("target_loss"),
                                 title=f"{last.title}: {text}" if text else last.title)
        return str(drawn.relative_to(db.dir)) if drawn else None
    except Exception as e:
        log.warning("candidate %s: plot failed: %s", commit[:12], e)
        return None


def _draw_in_child(db_dir: str, commit: str, proposers: frozenset[str]) -> str | None:
    from runs_db.db import RunsDB

    with RunsDB.open(db_dir) as db:
        return draw(db, commit, proposers)


class PlotQueue:
    """One child process drawing plots in order. `drain` waits for the queue, then stops the child."""

    def __init__(self, db_dir: Path, proposers: frozenset[str]):
        self.db_dir, self.proposers = str(db_dir), proposers
        self._pool: ProcessPoolExecutor | None = None
        self._futures: set[Future] = set()
        self._lock = threading.Lock()

    def submit(self, commit: str) -> None:
        with self._lock:
            if self._pool is None:  # spawned, not forked: the controller has threads (Ray, the recorder)
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            future = self._pool.submit(_draw_in_child, self.db_dir, commit, self.proposers)
            self._futures.add(future)

        def finished(f: Future) -> None:
            with self._lock:
                self._futures.discard(f)
            try:
                f.result()
            except Exception as e:  # the child died: the plot is lost, not the search
                log.warning("candidate %s: plot not drawn: %s", commit[:12], e)

        future.add_done_callback(finished)

    def drain(self, timeout: float = 300.0) -> int:
        """Wait for the queued plots (up to `timeout`), then stop the child; how many were left."""
        with self._lock:
            pool, futures, self._pool = self._pool, set(self._futures), None
        if pool is None:
            return 0
        _, left = wait(futures, timeout=timeout)
        for f in left:
            f.cancel()
        pool.shutdown(wait=not left, cancel_futures=True)
        return len(left)
