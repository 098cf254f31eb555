"""Records results off the loop's thread, in order, so a finished run frees its worker at once.

One thread runs the database writes (Optuna, artifacts, git notes) in the order they were asked
for; the loop only waits for them at the end (`flush`). Git commits stay on the loop's thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


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
