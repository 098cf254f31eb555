"""Candidates' loss-curve plots, drawn in a child process.

A plot costs about 0.3 s of matplotlib and a read of the whole study; drawn on the recorder thread
for every candidate that reached `full`, it took more than half of that thread's time in a
1000-trial search, and the recorder's pace bounds how many runs a search keeps going. So the
view (runs_db.dashboard) hands each plot to one child process that opens the search folder
itself. The view trial names the plot's path when the candidate ends (an ended Optuna trial
cannot change); the search's end waits for what is still queued.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import sys
import threading
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


class PlotQueue:
    """One child process (`python -m runs_db.plot_queue DIR PROPOSERS`) drawing plots in order: the
    commits go down its stdin, one per line; it answers each with a line when drawn. A plain
    subprocess, not multiprocessing: nothing of the caller's main module runs in it, and it ends
    with its stdin, so it never outlives the search. `drain` waits for the queue, then ends it."""

    def __init__(self, db_dir: Path, proposers: frozenset[str]):
        self.db_dir, self.proposers = Path(db_dir), proposers
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._feeder: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.submitted = self.drawn = 0

    def submit(self, commit: str) -> None:
        with self._lock:
            if self._feeder is None:
                self._feeder = threading.Thread(target=self._feed, name="plot-queue", daemon=True)
                self._feeder.start()
            self.submitted += 1
        self._queue.put(commit)

    def _feed(self) -> None:
        log_path = self.db_dir / "plots.log"
        try:
            with open(log_path, "ab") as err:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "runs_db.plot_queue", str(self.db_dir), ",".join(sorted(self.proposers))],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        except OSError as e:
            log.warning("plots: no drawing process: %s", e)
            return
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        reader = threading.Thread(target=self._count, args=(proc.stdout,), daemon=True)
        reader.start()
        try:
            while (commit := self._queue.get()) is not None:
                proc.stdin.write(commit + "\n")
                proc.stdin.flush()
        except OSError as e:  # the child died: later plots are lost, not the search
            log.warning("plots: the drawing process ended: %s", e)
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
        reader.join()

    def _count(self, out) -> None:
        for _ in out:
            self.drawn += 1

    def drain(self, timeout: float = 300.0) -> int:
        """Wait for the queued plots (up to `timeout`), then end the child; how many were not drawn."""
        with self._lock:
            feeder, self._feeder = self._feeder, None
        if feeder is None:
            return 0
        self._queue.put(None)
        feeder.join(timeout)
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(max(1.0, timeout / 10) if feeder.is_alive() else timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return self.submitted - self.drawn


def main(argv: list[str]) -> None:
    """The drawing process: one plot per commit read from stdin, one line out for each."""
    from runs_db.db import RunsDB

    proposers = frozenset(p for p in argv[1].split(",") if p)
    with RunsDB.open(argv[0]) as db:
        for line in sys.stdin:
            if commit := line.strip():
                draw(db, commit, proposers)
                print(commit, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
