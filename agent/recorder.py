"""Records results off the loop's thread, in order, so a finished run frees its worker at once.

One thread runs the database writes (Optuna, artifacts, git notes) in the order they were asked
for; the loop only waits for them at the end (`flush`). Candidate commits are made earlier, on
the committer's thread (agent/committer.py): a trial is started, and recorded here, only once its
commit exists.
The same thread keeps the search's candidate view (runs_db.dashboard, what optuna-dashboard
shows) beside the loop's own study: `attach_view` once, then `record_start` and `record_rung`.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from agent.names import SEARCH_PROPOSERS
from runs_db import dashboard
from runs_db.db import RunsDB
from search_space.records import RunResult
from search_space.target import Target

log = logging.getLogger(__name__)


class Recorder:
    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Callable, tuple, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="recorder", daemon=True)
        self._thread.start()
        self.error: BaseException | None = None
        self.busy_s = 0.0  # time spent writing (benchmarks)

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._queue.put((fn, args, fut))
        return fut

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args, fut = item
            t0 = time.perf_counter()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # kept for the loop to raise: a lost record must not pass silently
                self.error = self.error or e
                fut.set_exception(e)
            finally:
                self.busy_s += time.perf_counter() - t0
                self._queue.task_done()
        self._queue.task_done()

    def flush(self) -> None:
        """Wait for every write asked for so far; raise the first one that failed."""
        self._queue.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)


def record_start(db: RunsDB, number: int, commit: str, parent: str, who: str, title: str, rung: str, attrs: dict,
                 model: str | None) -> None:
    """Start study trial `number` (the loop numbers trials as it starts them, the study must agree)."""
    got = db.start_trial(commit, parent or None, who, title, rung, attrs, model=model)
    if got != number:
        raise RuntimeError(f"the study numbered a new trial {got}, not {number}: is another controller "
                           "writing to this search?")
    if (view := dashboard.view_of(db)) is not None:
        _keep(view, view.start, commit, parent, who, title, model)


def record_rung(db: RunsDB, number: int, value: float | None, runs: list[RunResult], attrs: dict,
                state: str) -> None:
    """End a candidate's rung in the study, then tell its view (the verdict, when `attrs` holds one)."""
    db.finish_trial(number, value, runs, attrs, state)
    if (view := dashboard.view_of(db)) is not None:
        _keep(view, lambda: view.rung_ended(db.trial(number)))


def attach_view(db: RunsDB, target: Target) -> None:
    """From now on the writes above keep `db`'s candidate view (`<study>-candidates`)."""
    dashboard.attach(db, target.knobs, target.objective, SEARCH_PROPOSERS)


def _keep(view: dashboard.CandidateView, fn: Callable[..., Any], *args: Any) -> None:
    """The view is derived from the study: a failed write is logged and repaired by the next
    write's catch-up (`sync`), never allowed to stop the search."""
    try:
        fn(*args)
    except Exception as e:
        view.dirty = True
        log.warning("candidate view %s: %s: %s (caught up at the next write)", view.name, type(e).__name__, e)


def record_run(db: RunsDB, number: int, result: RunResult, log_text: str | None) -> None:
    db.save_run(number, result, log_text=log_text)
    run_dir = Path(result.log).parent
    if run_dir.name.startswith(f"t{number}-") and run_dir.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)  # the log now lives in the artifacts
