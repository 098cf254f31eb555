"""Trusted measurement, the log's side (env/trusted.py is the model's): the checks that need only
the log and the sandbox's clock (validations where the target expects them, start-up within its
allowance, every claimed training interval against the observed one), the curve to record with
the observed times, and the keeper that copies each validation's checkpoint out of the run the
moment its line arrives.
"""

from __future__ import annotations

import os
import queue
import shutil
import stat
import threading
from pathlib import Path

from env.readout import CurveReader
from search_space.records import Point
from search_space.target import Trust


def expected_steps(total: int, every: int) -> list[int]:
    return sorted({*range(0, total, every), total})


def _steps_text(steps: list[int]) -> str:
    if len(steps) > 6:
        return f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
    return ", ".join(map(str, steps)) or "none"


def log_problems(trust: Trust, reader: CurveReader, total: int, started: float,
                 startup_s: float = 0.0) -> tuple[list[str], dict]:
    """The checks that need only the log and its arrival times: regular validations, start-up, clock.

    `startup_s` (the target's `[resources] startup_s`: compile and warm-up) widens the start-up
    allowance; what start-up left of it may also be spent inside the clock's intervals, where a
    trainer that compiles lazily (at its first training step, or on a new shape) compiles while
    its own timer is stopped. Only an under-claim (less training than observed: what a forger of
    speed writes) is a problem; an over-claim is counted in info["over_claims"] and left, since the
    recorded curve keeps the observed times either way, and a line the sandbox received late (Docker's
    attach stream hands lines over in bursts on a loaded machine) makes the next interval look short."""
    problems: list[str] = []
    info: dict = {}
    want, got = expected_steps(total, trust.every), [p.step for p in reader.points]
    if got != want:
        problems.append(f"log: validations expected at steps {_steps_text(want)}; the log has {_steps_text(got)}")
    allowance = trust.startup_allowance_s + startup_s
    compile_left = startup_s
    if reader.first_line is not None:
        info["startup_s"] = round(reader.first_line - started, 3)
        compile_left = max(0.0, min(startup_s, allowance - info["startup_s"]))
        if info["startup_s"] > allowance:
            problems.append(f"start-up: {info['startup_s']:.1f} s passed before step 0, the allowance is "
                            f"{allowance:g} s")
    bad, forgiven, over = [], 0.0, 0
    for i in range(1, len(reader.points)):
        prev, cur = reader.points[i - 1], reader.points[i]
        end = reader.pauses.get(cur.step, reader.arrivals[i])  # no marker: line to line (stricter)
        observed = 1000 * (end - reader.arrivals[i - 1])
        claimed = cur.train_ms - prev.train_ms
        tolerance = trust.clock_tolerance * observed + trust.clock_slack_ms
        excess_s = (observed - claimed - tolerance) / 1000
        if excess_s > 0 and excess_s <= compile_left:  # compile time the trainer's timer left out
            compile_left -= excess_s
            forgiven += (observed - claimed) / 1000
        elif excess_s > 0:
            bad.append((observed - claimed, prev.step, cur.step, claimed, observed))
        elif claimed - observed > tolerance:
            over += 1
    if forgiven:
        info["compile_in_clock_s"] = round(forgiven, 3)
    if over:
        info["over_claims"] = over
    if bad:
        _, a, b, claimed, observed = max(bad)
        more = f"; {len(bad) - 1} more intervals disagree" if len(bad) > 1 else ""
        problems.append(f"clock: the log claims {claimed:.0f} ms of training between steps {a} and {b}, the "
                        f"sandbox observed {observed:.0f} ms (tolerance {trust.clock_tolerance:.0%} + "
                        f"{trust.clock_slack_ms:g} ms){more}")
    return problems, info


def observed_curve(reader: CurveReader, losses: dict[int, float] | None = None) -> list[Point]:
    """The curve to record: each point's time is the sandbox's (since step 0's line, pauses included;
    for a regex readout whose first point is not step 0, e.g. epoch 1, since the run started);
    its loss the measured one where given, else the claimed one."""
    if not reader.points:
        return []
    t0 = reader.arrivals[0]
    if reader.readout.format == "regex" and reader.points[0].step != 0 and reader.started is not None:
        t0 = reader.started
    return [Point(p.step, (losses or {}).get(p.step, p.val_loss), round(1000 * (t - t0), 1))
            for p, t in zip(reader.points, reader.arrivals, strict=True)]


class CheckpointKeeper:
    """Copies each validation step's checkpoint out of the run when its line arrives, on a thread of
    its own: the thread that reads the log must not wait on a copy, or the next line's arrival (the
    clock check's observed time) is stamped late. On a loaded machine that alone made honest short
    runs fail the clock check. `settle()` waits for every copy asked for."""

    def __init__(self, trust: Trust, workdir: Path, keep_dir: Path):
        self.trust, self.workdir, self.keep_dir = trust, workdir, keep_dir
        self.kept: dict[int, Path] = {}
        self.missing: dict[int, str] = {}
        self.asked: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def take(self, step: int) -> None:
        """Copy step's checkpoint now (in the copier thread, in the order asked)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._copier, name="checkpoint-keeper", daemon=True)
            self.thread.start()
        self.asked.put(step)

    def settle(self) -> None:
        """Wait for the copies asked for (call it once the run has ended, before reading kept/missing)."""
        if self.thread is not None:
            self.asked.put(None)
            self.thread.join()
            self.thread = None

    def _copier(self) -> None:
        while (step := self.asked.get()) is not None:
            self.copy(step)

    def copy(self, step: int) -> None:
        src = self.workdir / self.trust.checkpoints.format(step=step)
        dest = self.keep_dir / f"step_{step:06d}{src.suffix}"
        try:
            # O_NOFOLLOW and O_NONBLOCK: a symlink or a FIFO planted by the run must not steer or block us
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            self.missing[step] = f"{src.relative_to(self.workdir)}: {e.strerror}"
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self.missing[step] = f"{src.relative_to(self.workdir)} is not a regular file"
                return
            self.keep_dir.mkdir(parents=True, exist_ok=True)
            with os.fdopen(fd, "rb", closefd=False) as f, open(dest, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
            self.kept[step] = dest
        finally:
            os.close(fd)

    def problems(self, steps: list[int]) -> list[str]:
        out = []
        for step in steps:
            if step not in self.kept:
                why = self.missing.get(step, "no checkpoint was saved before its validation line")
                out.append(f"checkpoint: no checkpoint for step {step} ({why})")
        return out
