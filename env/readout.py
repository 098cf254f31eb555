"""Read a run: the log stream (or a JSON-lines metrics file) becomes a curve of Points, live.

The reader also checks that the log is believable: steps rise, the clock never runs backwards, the
total is the one asked for. A log that breaks these is not trusted (a trainer that lies in its log).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from search_space.records import Point
from search_space.target import Readout

CLOCK_CHECK_MS = 2000  # in shorter runs untimed validation and start-up can be most of the time


class CurveReader:
    def __init__(self, readout: Readout, total_steps: int):
        self.readout = readout
        self.total_steps = total_steps
        self.pattern = re.compile(readout.line_regex)
        self.points: list[Point] = []
        self.nonfinite: str | None = None
        self.problem: str | None = None
        self.arrivals: list[float] = []  # when each point's line arrived (monotonic seconds)

    def feed(self, line: str) -> Point | None:
        """One line of output; returns the new point when the line is a validation line."""
        m = self.pattern.search(line)
        if not m:
            return None
        groups = m.groupdict()
        try:
            step, loss, ms = int(groups["step"]), float(groups["val_loss"]), float(groups["train_ms"])
        except ValueError:
            self._flag(f"unreadable validation line: {line.strip()[:200]}")
            return None
        return self.add(step, loss, ms, groups.get("total"), line)

    def add(self, step: int, loss: float, ms: float, total: str | int | None = None, line: str = "") -> Point | None:
        if not math.isfinite(loss):
            self.nonfinite = self.nonfinite or f"val_loss is {loss} at step {step}"
            return None
        if total is not None and int(total) != self.total_steps:
            self._flag(f"log claims {total} total steps, the run was asked for {self.total_steps}")
        last = self.points[-1] if self.points else None
        if last and step <= last.step:
            self._flag(f"step {step} logged after step {last.step}")
            return None
        if last and ms < last.train_ms:
            self._flag(f"train_time went backwards ({last.train_ms:.0f}ms at step {last.step}, "
                       f"{ms:.0f}ms at step {step})")
        if step > self.total_steps:
            self._flag(f"step {step} beyond the {self.total_steps} steps asked for")
        point = Point(step, loss, ms)
        self.points.append(point)
        self.arrivals.append(time.monotonic())
        return point

    def _flag(self, problem: str) -> None:
        self.problem = self.problem or problem

    def read_metrics_file(self, workdir: Path) -> None:
        """For `jsonl` targets: {"step", "val_loss", "train_ms"} per line, read once the run ended."""
        path = workdir / self.readout.metrics_file
        if not path.exists():
            return
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.add(int(rec["step"]), float(rec["val_loss"]), float(rec["train_ms"]), rec.get("total"))
            except (ValueError, KeyError, TypeError) as e:
                self._flag(f"{self.readout.metrics_file} line {n}: {e}")

    def clock_problem(self) -> str | None:
        """A log that claims much less training time than passed between its validation lines lies
        about its clock (validation is untimed, but it cannot take most of the run)."""
        if len(self.points) < 2 or not self.arrivals or self.readout.format != "speedrun":
            return None
        wall_ms = (self.arrivals[-1] - self.arrivals[0]) * 1000
        claimed = self.points[-1].train_ms - self.points[0].train_ms
        if wall_ms > CLOCK_CHECK_MS and claimed < self.readout.min_timed_fraction * wall_ms:
            return (f"the log claims {claimed:.0f}ms of training between its first and last validation, "
                    f"but {wall_ms:.0f}ms passed")
        return None

    def incomplete(self) -> str | None:
        """Why the curve does not cover the whole run, or None when it does."""
        if not self.points:
            return "the run printed no validation line"
        if self.points[-1].step != self.total_steps:
            return f"the last validation was at step {self.points[-1].step} of {self.total_steps}"
        return None
