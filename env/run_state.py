"""Run state for continuation: a long run that is lost, or cut off by a stop, goes on from its last
checkpoint instead of starting again (issue #12, section 4). Not env/trusted_log.py's CheckpointKeeper,
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
The worker's side (restore, watch, splice) is env/continuation.py.
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
from dataclasses import dataclass, field
from pathlib import Path

import ray

from env.run_progress import PROGRESS_FILE

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
    regular: a run must not make the worker read (and ship) a file outside its workdir. The cap is on
    the tar itself, headers included: many empty files with long names cost nothing in file bytes
    and hundreds of bytes each on the controller's disk."""
    buf = io.BytesIO()
    over = f"the state is over its cap of {max_bytes / 2**20:g} MiB ([checkpoint] max_mb)"
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for root, dirs, files in os.walk(folder, followlinks=False):
            rel_root = Path(root).relative_to(folder)
            for d in sorted(dirs):
                st = os.lstat(Path(root) / d)
                if stat.S_ISDIR(st.st_mode):
                    info = tarfile.TarInfo(str(rel_root / d))
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    if buf.tell() > max_bytes:
                        return None, over
            for name in sorted(files):
                try:
                    fd = os.open(Path(root) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError:
                    continue  # a link, or gone already
                with os.fdopen(fd, "rb") as f:
                    st = os.fstat(f.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    if buf.tell() + st.st_size > max_bytes:
                        return None, over
                    data = f.read(st.st_size)
                info = tarfile.TarInfo(str(rel_root / name))
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
                if buf.tell() > max_bytes:
                    return None, over
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
            self.folder.chmod(0o700)  # every run's state and weights: no sandboxed run may read another's
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
