"""The worker's side of run state (env/run_state.py): a checkpointed run restores its saved state,
a watcher sends each new state back, and a continued run's log and curve are spliced.

A continued run's curve is the saved points up to the checkpoint plus the new run's points after
it (a step printed again is taken once); its clock is the sum of the observed intervals: the saved
segment up to the checkpoint, then the new one from its first line (the gap and the restart are not
counted, as an unbroken run would not have them). Under `[trust]` the restart is held to the
start-up allowance a fresh run's first line is held to: a trainer that trained silently before its
first line would otherwise have that time left off its clock. A state at a validation step is taken
once that step's line has arrived, and its moment is that line's arrival (what the run did after
it, the continued run does again).

Under `[trust]` the trusted evaluator's weight checkpoints (env/trusted_log.py CheckpointKeeper: copied
by the host when each validation line arrived, so the run never had a chance to rewrite them) go to
the store too, each once, those at or before the state's step, before the state that counts on
them. A continued run gets them back in its keep folder, so every validation step, before and after
the break, is measured, and the run can be `trusted`. They are capped together at `[checkpoint]
max_mb`: past it they stop going, the run still continues, and stays `untrusted` with that reason.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from env.readout import CurveReader
from env.run_state import GRACE_S, LOG_CHARS, POLL_S, RESUME_DIR, Saved, pack, read_step, unpack
from env.trusted_log import CheckpointKeeper
from search_space.records import Point
from search_space.target import Readout, RunCheckpoint


class ContinuedReader(CurveReader):
    """A CurveReader that starts with the saved curve. Its clock is virtual: the saved segment's
    times, then (from the new run's first line on) the new run's, as if no gap had been."""

    continued = True

    def __init__(self, readout: Readout, total_steps: int, pause_regex: str | None, saved: Saved,
                 allowance_s: float | None = None):
        super().__init__(readout, total_steps, pause_regex)
        self.floor = saved.step
        self.saved = saved
        self.points = [Point(*p) for p in saved.points]
        self._set_start(time.monotonic() - saved.elapsed_s)  # until the first line: the gap ends now
        self._seeded = True
        self._rebased = False
        self.allowance_s = allowance_s  # the longest restart (launch to first line); None: not checked
        self.launched: float | None = None  # when this segment's run started (evaluate says so)

    def _set_start(self, start: float) -> None:
        s = self.saved
        self._start = start
        self.arrivals = [start + a for a in s.arrivals]
        self.first_line = start + s.first_line if s.first_line is not None else None
        self.pauses = {int(k): start + v for k, v in s.pauses.items()}

    @property
    def started(self) -> float | None:  # type: ignore[override]
        return getattr(self, "_start", None)

    @started.setter
    def started(self, value: float | None) -> None:
        if not getattr(self, "_seeded", False):  # evaluate's "the run starts now" does not reset the virtual clock
            self._start = value  # type: ignore[assignment]
        else:
            self.launched = value

    def feed(self, line: str, now: float | None = None) -> Point | None:
        now = time.monotonic() if now is None else now
        if not self._rebased:  # the new run's first line: its start-up was not part of the work
            self._rebased = True
            self._set_start(now - self.saved.elapsed_s)
            took = now - self.launched if self.launched is not None else 0.0
            if self.allowance_s is not None and took > self.allowance_s:
                self._flag(f"start-up: the continued run printed its first line {took:.1f} s after it started, the "
                           f"allowance is {self.allowance_s:g} s (time before it is left off the clock)")
        return super().feed(line, now)

    def add(self, step: int, loss: float, ms: float, total: str | int | None = None,
            now: float | None = None) -> Point | None:
        if step <= self.floor:  # printed again by the continued run: the saved point stands
            return None
        return super().add(step, loss, ms, total, now)


def _cut_after(text: bytes, reader: CurveReader, step: int) -> bytes:
    """The log up to the line of the first point (or pause marker) past the checkpoint's `step`
    (printed after the state was taken, before it was seen: the continued run prints it again)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        for pattern in filter(None, (reader.pattern, reader.pause)):
            m = pattern.search(line.decode(errors="replace"))
            counted = m and (m.groupdict().get("step") or m.groupdict().get("epoch"))
            if counted and counted.isdigit() and int(counted) > step:
                return b"".join(lines[:i])
    return text


class Continuation:
    """One checkpointed run on its worker: restores a saved state, watches for new ones, splices."""

    def __init__(self, spec, store: Any, key: str):
        self.config: RunCheckpoint = spec.target.checkpoint
        trust = spec.target.checked_trust
        self.allowance_s = trust.startup_allowance_s + spec.target.resources.startup_s if trust else None
        self.store, self.key, self.run_id = store, key, spec.run_id
        self.total = spec.target.steps(spec.fidelity)
        got = ray.get(store.get.remote(key)) if store is not None else None
        self.saved: Saved | None = None
        self.blob = b""
        if got is not None:
            meta, self.blob = got
            self.saved = Saved(**{**meta, "pauses": {int(k): v for k, v in (meta.get("pauses") or {}).items()}})
        self.reader: CurveReader | None = None
        self.sent: tuple[int, int] | None = None
        self.log_sent = 0  # bytes of this segment's log already with the store
        self.prefix = ""  # a continued run's log before its own: the saved log and a line that says so
        if self.saved is not None:
            counts = spec.target.readout.counts
            self.prefix = (self.saved.log + ("\n" if self.saved.log and not self.saved.log.endswith("\n") else "")
                           + f"--- speedsearch: the run was lost; it continues from its checkpoint after "
                             f"{counts} {self.saved.step} ---\n")
        self.log_kept = self.prefix
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.problem = ""
        self.keeper: CheckpointKeeper | None = None  # the trusted evaluator's, under `[trust]`
        self.kept_sent: dict[int, int] = {}  # trusted checkpoints with the store: step -> bytes
        self.kept_problem = self.saved.kept_problem if self.saved else ""
        self.pending: tuple[tuple[int, int], float] | None = None  # a state waiting for its step's line

    # before the run
    def restore(self, workdir: Path) -> str:
        """Put the saved state in the new workdir; the `{resume}` value ("" when starting fresh). It
        goes beside `path`, not into it: given files are read-only to an isolated run (it may not
        replace the caller's files), so the trainer reads the old state there and writes its new
        states to `path` as it did before the break."""
        if self.saved is None:
            return ""
        unpack(self.blob, workdir / RESUME_DIR)
        self.blob = b""
        return RESUME_DIR

    def restore_kept(self, keeper: CheckpointKeeper) -> None:
        """Under `[trust]`: the weight checkpoints kept before the break, back into the keep folder
        of this run's keeper, as if its own keeper had copied them."""
        self.keeper = keeper
        if self.saved is None or not self.saved.kept or self.store is None:
            return
        got = ray.get(self.store.get_kept.remote(self.key, self.saved.step))
        keeper.keep_dir.mkdir(parents=True, exist_ok=True)
        for step in self.saved.kept:
            if step in got:
                suffix, data = got[step]
                dest = keeper.keep_dir / f"step_{step:06d}{suffix}"
                dest.write_bytes(data)
                keeper.kept[step] = dest
                self.kept_sent[step] = len(data)

    def untrusted_before(self) -> tuple[int, str]:
        """(-1, why it is whole) when every saved point's weights came back (all can be measured);
        else (the break's step, why the points up to it stay claimed)."""
        if self.saved is None:
            return -1, ""
        missing = [p[0] for p in self.saved.points if p[0] not in self.kept_sent]
        if not missing:
            return -1, (f"continued after {self.saved.step}: the checkpoints up to it were copied on the host "
                        f"before the break and came back with its state")
        why = self.kept_problem or f"no checkpoint came back for step {missing[0]}"
        return self.saved.step, f"losses up to step {self.saved.step} are claimed: {why}"

    def make_reader(self, readout: Readout, total: int, pause_regex: str | None) -> CurveReader:
        self.reader = (CurveReader(readout, total, pause_regex) if self.saved is None
                       else ContinuedReader(readout, total, pause_regex, self.saved, self.allowance_s))
        return self.reader

    def env(self, resume: str) -> dict[str, str]:
        return {"SPEEDSEARCH_RESUME": resume, "SPEEDSEARCH_STATE_DIR": self.config.path,
                "SPEEDSEARCH_CHECKPOINT_EVERY": str(self.config.every)}

    # during the run
    def watch(self, workdir: Path, log_path: Path, keeper: CheckpointKeeper | None = None) -> None:
        self.keeper = keeper or self.keeper
        if self.store is None:
            return
        self.store.progress.remote(self.key, {  # running from now on, at its saved point
            "run": self.run_id, "step": self.saved.step if self.saved else 0, "total": self.total,
            "counts": self.reader.readout.counts if self.reader else "step",
            "elapsed_s": round(self.saved.elapsed_s, 3) if self.saved else 0.0,
            "resumed_from": self.saved.step if self.saved else None})
        self.last_progress: Any = None  # (step, arrival) of the last progress sent
        self.thread = threading.Thread(target=self._loop, args=(workdir, log_path), name="run-state", daemon=True)
        self.thread.start()

    def _loop(self, workdir: Path, log_path: Path) -> None:
        while not self.stop.wait(POLL_S):
            try:
                self._take(workdir / self.config.path, log_path)
                self.last_progress = self._progress(self.last_progress)
            except Exception as e:  # the run goes on; it only cannot continue from here
                self.problem = self.problem or f"{type(e).__name__}: {e}"

    def _take(self, folder: Path, log_path: Path) -> None:
        first = read_step(folder)
        if first is None or first == self.sent or first[0] <= (self.saved.step if self.saved else 0):
            return
        step = first[0]
        if step % self.config.every and step != self.total:
            return
        reader = self.reader
        now = time.monotonic()
        assert reader is not None and reader.started is not None
        arrivals = list(reader.arrivals)  # first: a point is appended before its arrival
        points = list(reader.points)[:len(arrivals)]
        n = sum(1 for p in points if p.step <= step)
        keeper = self.keeper
        if not self._ready(first, points, n, step, now):
            return
        blob, why = pack(folder, self.config.max_mb << 20)
        if blob is None:
            self.problem, self.sent = why, first  # not this one again
            return
        if read_step(folder) != first:  # the trainer wrote meanwhile: the next look takes it
            return
        if keeper is not None:
            self._send_kept(keeper, [p.step for p in points[:n]])
        start = reader.started
        # a state at a validation step belongs to that step's line: the continued run's first line
        # comes straight after it on the clock (the time since was the watcher's, not the run's)
        moment = arrivals[n - 1] if n and points[n - 1].step == step else now
        with open(log_path, "rb") as f:
            f.seek(self.log_sent)
            more = f.read()
        more = _cut_after(more, reader, step)
        self.log_sent += len(more)
        self.log_kept = (self.log_kept + more.decode(errors="replace"))[-LOG_CHARS:]
        saved = Saved(step=step, points=[(p.step, p.val_loss, p.train_ms) for p in points[:n]],
                      arrivals=[a - start for a in arrivals[:n]], elapsed_s=moment - start,
                      first_line=None if reader.first_line is None else reader.first_line - start,
                      pauses={k: v - start for k, v in reader.pauses.items() if k <= step},
                      log=self.log_kept, breaks=self.saved.breaks + [self.saved.step] if self.saved else [],
                      kept=sorted(s for s in self.kept_sent if s <= step), kept_problem=self.kept_problem)
        # the progress first (the store's calls run in order): a state is never seen ahead of it
        self.last_progress = self._progress(self.last_progress)
        ray.get(self.store.put.remote(self.key, asdict(saved), blob))
        self.sent, self.pending = first, None

    def _ready(self, first: tuple[int, int], points: list[Point], n: int, step: int, now: float) -> bool:
        """A state is taken once its step's line has been read (the trainer saves before printing)
        and, under `[trust]`, the keeper has copied the checkpoints of every point up to it; a state
        between validations (no such line) goes after GRACE_S."""
        if self.pending is None or self.pending[0] != first:
            self.pending = (first, now)
        if now - self.pending[1] >= GRACE_S:
            return True
        if not points or points[-1].step < step:
            return False
        keeper = self.keeper
        return keeper is None or all(p.step in keeper.kept or p.step in keeper.missing for p in points[:n])

    def _send_kept(self, keeper: CheckpointKeeper, steps: list[int]) -> None:
        """The trusted checkpoints of `steps` not yet with the store, each once, while the run's
        total stays under the cap; past it none more go, and the reason is kept with the state."""
        cap = self.config.max_mb << 20
        for step in steps:
            path = keeper.kept.get(step)
            if path is None or step in self.kept_sent or self.kept_problem:
                continue
            size = path.stat().st_size
            if sum(self.kept_sent.values()) + size > cap:
                self.kept_problem = (f"the trusted checkpoints up to step {step} are over the cap of "
                                     f"{self.config.max_mb} MiB ([checkpoint] max_mb)")
                return
            ray.get(self.store.put_kept.remote(self.key, step, path.suffix, path.read_bytes()))
            self.kept_sent[step] = size

    def _progress(self, last: Any) -> Any:
        reader = self.reader
        if reader is None or not reader.points or reader.started is None:
            return last
        p, at = reader.points[-1], reader.arrivals[len(reader.points) - 1]
        if (p.step, at) == last:
            return last
        self.store.progress.remote(self.key, {
            "run": self.run_id, "step": p.step, "total": self.total, "counts": reader.readout.counts,
            "elapsed_s": round(at - reader.started, 3), "resumed_from": self.saved.step if self.saved else None})
        return (p.step, at)

    # after the run
    def finish(self, log_path: Path, provenance: dict) -> None:
        """Stop watching; a continued run's log gets the saved log before its own."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)
        if self.store is not None:
            self.store.ended.remote(self.key)
        if self.problem:
            provenance["checkpoint_problem"] = self.problem[:300]
        if self.saved is None:
            return
        provenance["continued"] = {"from": self.saved.step, "breaks": self.saved.breaks + [self.saved.step]}
        try:
            own = log_path.read_text(errors="replace")
        except OSError:
            own = ""
        log_path.write_text((self.prefix + own)[-LOG_CHARS:])
