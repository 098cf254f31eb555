"""Records results off the loop's thread, in order, so a finished run frees its worker at once.

One thread runs the database writes (Optuna, artifacts, git notes) in the order they were asked
for; the loop only waits for them at the end (`flush`). Git commits stay on the loop's thread.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from runs_db.db import RunsDB
from search_space.records import RunResult


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


def record_run(db: RunsDB, number: int, result: RunResult, log_text: str) -> None:
    db.save_run(number, result, log_text=log_text)
    run_dir = Path(result.log).parent
    if run_dir.name.startswith(f"t{number}-") and run_dir.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)  # the log now lives in the artifacts
