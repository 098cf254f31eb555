"""Read a run: the log stream (or a JSON-lines metrics file) becomes a curve of Points, live.

The reader also checks that the log is believable: steps rise, the clock never runs backwards, the
total is the one asked for. A log that breaks these is not trusted (a trainer that lies in its log).
It stamps each validation line (and each pause marker, where the target prints one) with its
arrival on the host's monotonic clock: env/trusted.py checks the claimed clock against these.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from search_space.records import Point
from search_space.target import Readout


class CurveReader:
    """`started`: when the run started (monotonic seconds), the zero of a regex readout's clock where
    the log prints none (default: the first line's arrival)."""

    continued = False  # a run continued from a saved state (env/continuation.py): its clock is virtual

    def __init__(self, readout: Readout, total_steps: int, pause_regex: str | None = None,
                 started: float | None = None):
        self.readout = readout
        self.total_steps = total_steps
        self.started = started
        self.pattern = re.compile(readout.pattern if readout.format == "regex" else readout.line_regex)
        self.pause = re.compile(pause_regex) if pause_regex else None
        self.points: list[Point] = []
        self.nonfinite: str | None = None
        self.problem: str | None = None
        self.arrivals: list[float] = []  # when each point's line arrived (monotonic seconds)
        self.pauses: dict[int, float] = {}  # step -> when its pause marker arrived (the first one)
        self.first_line: float | None = None  # when the first pause marker or validation line arrived

    def feed(self, line: str, now: float | None = None) -> Point | None:
        """One line of output, arrived `now` (default: the monotonic clock now); returns the new point
        when the line is a validation line."""
        now = time.monotonic() if now is None else now
        if self.readout.format == "regex":
            return self._feed_any(line, now)
        m = self.pattern.search(line)
        if not m:
            if self.pause is not None and (p := self.pause.search(line)):
                self.first_line = now if self.first_line is None else self.first_line
                try:
                    self.pauses.setdefault(int(p.group("step")), now)
                except ValueError:
                    pass
            return None
        groups = m.groupdict()
        try:
            step, ms = int(groups["step"]), float(groups["train_ms"])
            loss = float(groups["val_loss"]) * self.readout.scale  # nats, or bpb (readout.unit)
        except ValueError:
            self._flag(f"unreadable validation line: {line.strip()[:200]}")
            return None
        return self.add(step, loss, ms, groups.get("total"), now)

    def _feed_any(self, line: str, now: float) -> Point | None:
        """A line of any log (format "regex"): the step (or epoch) where the pattern names one, else
        the match's rank; the value converted to the readout's unit; the trainer's clock where the
        pattern reads one, else the line's arrival since the run started."""
        self.started = now if self.started is None else self.started
        m = self.pattern.search(line)
        if not m:
            return None
        groups = m.groupdict()
        try:
            counted = groups.get("step") or groups.get("epoch")
            step = int(counted) if counted is not None else len(self.points) + 1
            value = self.readout.value(groups)
            ms = float(groups["ms"]) if groups.get("ms") is not None else (now - self.started) * 1000
        except (ValueError, ArithmeticError):
            self._flag(f"unreadable {self.readout.counts} line: {line.strip()[:200]}")
            return None
        return self.add(step, value, ms, None, now)

    def add(self, step: int, loss: float, ms: float, total: str | int | None = None,
            now: float | None = None) -> Point | None:
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
        self.arrivals.append(time.monotonic() if now is None else now)
        self.first_line = self.arrivals[-1] if self.first_line is None else self.first_line
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
                self.add(int(rec["step"]), float(rec["val_loss"]) * self.readout.scale, float(rec["train_ms"]),
                         rec.get("total"))
            except (ValueError, KeyError, TypeError) as e:
                self._flag(f"{self.readout.metrics_file} line {n}: {e}")

    def incomplete(self) -> str | None:
        """Why the curve does not cover the whole run, or None when it does."""
        counts = self.readout.counts
        if not self.points:
            return "the run printed no validation line" if counts == "step" else "the run printed no epoch line"
        if self.points[-1].step != self.total_steps:
            return f"the last validation was at {counts} {self.points[-1].step} of {self.total_steps}"
        return None
