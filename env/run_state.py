"""Run state for continuation: a long run that is lost, or cut off by a stop, goes on from its last
checkpoint instead of starting again (issue #12, section 4). Not env/trusted.py's CheckpointKeeper,
which keeps model weights for the trusted evaluator.

The protocol with the trainer (a target's `[checkpoint] every, path`): it writes its resumable
state into `path` inside its workdir, and last a file `path/STEP` holding the step (or epoch) the
state is after; before it touches the folder again it deletes STEP. `{resume}` in the command (and
SPEEDSEARCH_RESUME) is the folder a saved state was restored to (`.resume`, read-only to the run:
it writes its next states to `path` as before), "" when the run starts fresh.

On the worker, a watcher thread reads STEP, packs the folder, and reads STEP again: the same step
and file both times means the trainer did not touch the folder in between (a sequence lock, no
pause of the run needed). The state goes back BY VALUE (no shared filesystem) to `RunStateStore`,
an actor on the controller's node that keeps it under the search folder, with the curve points,
their observed times and the log up to that moment. The store is keyed by (target, source tree,
patch, seed, fidelity, steps): a state is only ever restored into the very same run, never into
another seed or candidate. The store also keeps each such run's progress for `status`.

A continued run's curve is the saved points up to the checkpoint plus the new run's points after
it (a step printed again is taken once); its clock is the sum of the observed intervals: the saved
segment up to the checkpoint, then the new one from its first line (the gap and the restart are not
counted, as an unbroken run would not have them). A state at a validation step is taken once that
step's line has arrived, and its moment is that line's arrival (what the run did after it, the
continued run does again).

Under `[trust]` the trusted evaluator's weight checkpoints (env/trusted.py CheckpointKeeper: copied
by the host when each validation line arrived, so the run never had a chance to rewrite them) go to
the store too, each once, those at or before the state's step, before the state that counts on
them. A continued run gets them back in its keep folder, so every validation step, before and after
the break, is measured, and the run can be `trusted`. They are capped together at `[checkpoint]
max_mb`: past it they stop going, the run still continues, and stays `untrusted` with that reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from env.readout import CurveReader
from env.run_progress import PROGRESS_FILE
from env.trusted import CheckpointKeeper
from search_space.records import Point
from search_space.target import Readout, RunCheckpoint

STEP_FILE = "STEP"
RESUME_DIR = ".resume"  # in the workdir: a continued run's saved state, `{resume}`
POLL_S = 0.5  # how often the watcher looks at STEP (and sends progress)
GRACE_S = 5.0  # how long a state waits for its step's line (and checkpoint) before it goes without
LOG_CHARS = 4_000_000  # as much of the log as travels back with a result (env/pool.py)


def state_key(spec) -> str:
    """The run a state belongs to: the same source tree (or commit), patch, seed, fidelity and steps."""
    source = spec.source[0] if spec.source is not None else (spec.commit or "base")
    patch = hashlib.sha256((spec.patch or "").encode()).hexdigest()[:16]
    parts = [spec.target.name, source, patch, str(spec.seed), spec.fidelity, str(spec.target.steps(spec.fidelity))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


@dataclass
class Saved:
    """What the controller keeps of a run at its last checkpoint (the state's bytes apart)."""

    step: int  # the step/epoch the state is after
    points: list[tuple[int, float, float]]  # the curve up to `step`: (step, loss, claimed/observed ms)
    arrivals: list[float]  # each point's arrival, seconds after the run's (virtual) start
    elapsed_s: float  # observed seconds from the start to the moment the state was taken
    first_line: float | None = None  # seconds after the start (the trusted clock's start-up)
    pauses: dict[int, float] = field(default_factory=dict)
    log: str = ""  # the log up to that moment, every segment so far
    breaks: list[int] = field(default_factory=list)  # the checkpoint steps earlier segments resumed from
    kept: list[int] = field(default_factory=list)  # trusted weight checkpoints with the store (<= step)
    kept_problem: str = ""  # why some were not sent (over the cap)


# --- the state's bytes: regular files and folders only, never a link the run planted ----------------
def pack(folder: Path, max_bytes: int) -> tuple[bytes | None, str]:
    """The folder as tar bytes, or (None, why). Files are opened without following links and must be
    regular: a run must not make the worker read (and ship) a file outside its workdir."""
    buf, total = io.BytesIO(), 0
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for root, dirs, files in os.walk(folder, followlinks=False):
            rel_root = Path(root).relative_to(folder)
            for d in sorted(dirs):
                st = os.lstat(Path(root) / d)
                if stat.S_ISDIR(st.st_mode):
                    info = tarfile.TarInfo(str(rel_root / d))
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            for name in sorted(files):
                try:
                    fd = os.open(Path(root) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError:
                    continue  # a link, or gone already
                with os.fdopen(fd, "rb") as f:
                    st = os.fstat(f.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    total += st.st_size
                    if total > max_bytes:
                        return None, f"the state is over its cap of {max_bytes / 2**20:g} MiB ([checkpoint] max_mb)"
                    data = f.read(st.st_size)
                info = tarfile.TarInfo(str(rel_root / name))
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), ""


def unpack(blob: bytes, dest: Path) -> None:
    """Restore a packed state into `dest` (emptied first): plain files and folders under it only."""
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if Path(m.name).is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
                continue
            path = dest.joinpath(*parts) if parts else dest
            if m.isdir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            path.write_bytes(src.read())


def read_step(folder: Path) -> tuple[int, int] | None:
    """(step, the STEP file's inode and change time folded) or None when there is no complete state."""
    try:
        fd = os.open(folder / STEP_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        text = f.read(32).decode(errors="replace").strip()
    try:
        return int(text), hash((st.st_ino, st.st_mtime_ns, st.st_size))
    except ValueError:
        return None


# --- the controller's side ---------------------------------------------------------------------------
@ray.remote(num_cpus=0, max_concurrency=64)
class RunStateStore:
    """Kept on the controller's node: each run's last state (under `folder`, so a resumed search
    finds it; in memory when there is none) and each checkpointed run's progress."""

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None
        self.mem: dict[str, tuple[dict, bytes]] = {}
        self.kept_mem: dict[str, dict[int, tuple[str, bytes]]] = {}
        self.live: dict[str, dict] = {}
        self.lock = threading.Lock()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / PROGRESS_FILE).unlink(missing_ok=True)  # a dead controller's runs are not running

    def put(self, key: str, meta: dict, blob: bytes) -> None:
        with self.lock:
            if self.folder is None:
                self.mem[key] = (meta, blob)
                return
            head = json.dumps(meta).encode()
            tmp = self.folder / f".{key}.tmp"
            with open(tmp, "wb") as f:  # one file, replaced at once: the meta never belongs to another state
                f.write(len(head).to_bytes(8, "big") + head)
                f.write(blob)
            os.replace(tmp, self.folder / f"{key}.state")

    def get(self, key: str) -> tuple[dict, bytes] | None:
        with self.lock:
            if self.folder is None:
                return self.mem.get(key)
            try:
                data = (self.folder / f"{key}.state").read_bytes()
                n = int.from_bytes(data[:8], "big")
                return json.loads(data[8:8 + n]), data[8 + n:]
            except (OSError, ValueError):
                return None

    def put_kept(self, key: str, step: int, suffix: str, data: bytes) -> None:
        """One trusted weight checkpoint of the run (host-copied on its worker), kept beside its state."""
        with self.lock:
            if self.folder is None:
                self.kept_mem.setdefault(key, {})[step] = (suffix, data)
                return
            folder = self.folder / f"{key}.kept"
            folder.mkdir(exist_ok=True)
            tmp = folder / f".{step}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, folder / f"{step}{suffix}")

    def get_kept(self, key: str, upto: int) -> dict[int, tuple[str, bytes]]:
        """The run's trusted checkpoints at or before step `upto` (later ones belong to no state)."""
        with self.lock:
            if self.folder is None:
                return {s: v for s, v in self.kept_mem.get(key, {}).items() if s <= upto}
            out: dict[int, tuple[str, bytes]] = {}
            for f in (self.folder / f"{key}.kept").glob("[0-9]*"):
                stem, _, suffix = f.name.partition(".")
                if stem.isdigit() and int(stem) <= upto:
                    out[int(stem)] = ("." + suffix if suffix else "", f.read_bytes())
            return out

    def drop(self, key: str) -> None:
        """The run ended with a result the controller has: its state is of no more use."""
        with self.lock:
            self.mem.pop(key, None)
            self.kept_mem.pop(key, None)
            self.live.pop(key, None)
            if self.folder is not None:
                (self.folder / f"{key}.state").unlink(missing_ok=True)
                shutil.rmtree(self.folder / f"{key}.kept", ignore_errors=True)
                self._write_progress()

    def progress(self, key: str, info: dict) -> None:
        with self.lock:
            self.live[key] = {**info, "at": time.time()}
            self._write_progress()

    def ended(self, key: str) -> None:
        """The run's task ended (its result on its way, or a stop): no longer running."""
        with self.lock:
            if self.live.pop(key, None) is not None:
                self._write_progress()

    def running(self) -> dict[str, dict]:
        with self.lock:
            return dict(self.live)

    def _write_progress(self) -> None:
        if self.folder is None:
            return
        tmp = self.folder / f".{PROGRESS_FILE}.tmp"
        tmp.write_text(json.dumps(self.live))
        os.replace(tmp, self.folder / PROGRESS_FILE)


# --- the worker's side -------------------------------------------------------------------------------
class ContinuedReader(CurveReader):
    """A CurveReader that starts with the saved curve. Its clock is virtual: the saved segment's
    times, then (from the new run's first line on) the new run's, as if no gap had been."""

    def __init__(self, readout: Readout, total_steps: int, pause_regex: str | None, saved: Saved):
        super().__init__(readout, total_steps, pause_regex)
        self.floor = saved.step
        self.saved = saved
        self.points = [Point(*p) for p in saved.points]
        self._set_start(time.monotonic() - saved.elapsed_s)  # until the first line: the gap ends now
        self._seeded = True
        self._rebased = False

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

    def feed(self, line: str, now: float | None = None) -> Point | None:
        now = time.monotonic() if now is None else now
        if not self._rebased:  # the new run's first line: its start-up was not part of the work
            self._rebased = True
            self._set_start(now - self.saved.elapsed_s)
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
                       else ContinuedReader(readout, total, pause_regex, self.saved))
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
        self.thread = threading.Thread(target=self._loop, args=(workdir, log_path), name="run-state", daemon=True)
        self.thread.start()

    def _loop(self, workdir: Path, log_path: Path) -> None:
        last_progress = None
        while not self.stop.wait(POLL_S):
            try:
                self._take(workdir / self.config.path, log_path)
                last_progress = self._progress(last_progress)
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
