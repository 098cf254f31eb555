"""ProcessSandbox: the default sandbox. One command in its own cgroups and namespaces, as an
unprivileged user, with a scrubbed environment, rlimits, capped log and disk, and a kill that
leaves nothing behind (see the class docstring; env/cgroup.py, env/namespaces.py, env/volume.py).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from env.cache_layer import mount_reader
from env.cgroup import RunCgroup, cgroup_support, reap_orphans
from env.guardian import guardian, pdeath_argv
from env.namespaces import RUN_GID, RUN_UID, bwrap_argv, chown_for_run, namespace_support, open_for_run
from env.proctree import ProcessTree, private_mb
from env.sandbox import Limits, LineCallback, SandboxOutcome, SandboxRequest
from env.volume import Volume, Workspaces, unmount_nested, volume_support
from env.warm import BoundVolume, Slot, new_folder, python_script, slot_key, stub_source

SCRATCH_DIRNAME = ".sandbox"  # inside the workdir: home/ and tmp/ of the run
# Safety switches for NCCL/torch on machines where NVLink multicast misbehaves: the operator sets
# them for every job, so they must reach candidates unchanged.
# NVLink multicast stays off on shared hosts; CUDA's library paths are configuration, not secrets.
MULTICAST_OFF = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
PASSTHROUGH_VARS = (*MULTICAST_OFF, "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH")
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
MAX_LINE_BYTES = 1 << 20  # a line longer than this reaches on_line in pieces
DRAIN_S = 0.5  # after the leader exited and the rest was killed: how long to read what is left
# Launches of a run whose namespaces could not be built (see `run`), waiting setup_wait_s between
# them: about 6 s in all. Mounts churn while many runs start and end; a worker killed with its slots
# up has its volumes unmounted one by one for a second or more, and 6 tries in 1 s once all failed
# (a trusted model process in the suite, beside test_resume_after_sigkill).
SETUP_ATTEMPTS = 10


def setup_wait_s(attempt: int) -> float:
    return min(1.0, 0.05 * 2 ** attempt)

WARM_READY_S = 120.0  # how long a run waits for its warm slot's start-up before it starts cold


def sandbox_env(request: SandboxRequest, home: str, tmp: str) -> dict[str, str]:
    """The environment a candidate sees, built from scratch (an allow-list, never os.environ).

    CPUs: `limits.cpus` sizes the thread pools (OpenMP, MKL, inductor's compile workers).

    GPUs: `limits.gpu_ids` is the whole truth. Empty means "no GPU" (CUDA_VISIBLE_DEVICES=""), as in
    the Docker sandbox, which exposes no device then; a caller that really wants the host's view
    passes CUDA_VISIBLE_DEVICES in `request.env`, which is applied last.
    """
    limits = request.limits
    python_bin = os.path.dirname(sys.executable)
    path = [python_bin, *SYSTEM_PATH]
    if os.path.isdir("/usr/local/cuda/bin"):
        path.append("/usr/local/cuda/bin")
    env = {
        "PATH": ":".join(dict.fromkeys(path)),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": tmp,
        "OMP_NUM_THREADS": str(limits.cpus),
        "MKL_NUM_THREADS": str(limits.cpus),
        # Inductor's default is a pool of cpu_count() compile workers, each ~300 MB of private memory:
        # 5 GB on a 16-core host for one torch.compile, far past a 4 GB run.
        "TORCHINDUCTOR_COMPILE_THREADS": str(limits.cpus),
        "CUDA_VISIBLE_DEVICES": ",".join(limits.gpu_ids),
        "PYTHONUNBUFFERED": "1",
    }
    cache = run_cache(request, Path(home).parent)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
        env["TRITON_CACHE_DIR"] = str(cache / "triton")
    env.update({k: os.environ[k] for k in PASSTHROUGH_VARS if k in os.environ})
    env.update(request.env)
    return env


def run_cache(request: SandboxRequest, scratch: Path) -> Path | None:
    """The compile-cache folder the run sees: the shared one for a run that fills it, else its own
    overlay of it in the workspace's scratch (env/cache_layer.py; mounted by `_ready_folder`)."""
    if request.cache_dir is None:
        return None
    return Path(request.cache_dir) if request.cache_write else scratch / "cache"


def _bound_cache(request: SandboxRequest) -> Path | None:
    """What bwrap binds writable besides the workspace: only a filling run's shared cache (a reader's
    overlay lies inside its workspace, and the shared folder stays out of its sight)."""
    return request.cache_dir if request.cache_write else None


def cpu_time_limit_s(limits: Limits) -> int:
    """RLIMIT_CPU per process: generous (twice every allowed core busy for the whole timeout), only a
    backstop against a runaway that the wall-clock timeout would catch anyway."""
    return int(2 * limits.timeout_s * max(limits.cpus, 1)) + 60


def containment_support() -> dict[str, str]:
    """What a run in this sandbox gets on this machine, for the launch header (said once there, and
    in every result's provenance): a value starting with "none (" says what is missing and why."""
    return {"cgroup": cgroup_support(), "namespaces": namespace_support(), "disk": volume_support()}


_names = itertools.count()


@functools.cache
def _workspaces() -> Workspaces:
    """One registry of mounted workspaces per process, shared by every sandbox object (the pool
    makes one per run). Making it first clears what callers killed earlier left behind: their
    volumes (in `Workspaces`) and their cgroups."""
    if os.geteuid() == 0:
        reap_orphans()
    return Workspaces()


class _Watch:
    """The run's state, shared by the reading (calling) thread and the watchdog thread: the limits
    the kernel does not enforce by itself (wall time, cancel, disk) and the kill."""

    def __init__(self, pid: int, request: SandboxRequest, cgroup: RunCgroup, volume: Volume | None,
                 cancel: threading.Event | None, grace_s: float, interval_s: float):
        self.pid, self.limits, self.cancel = pid, request.limits, cancel
        self.cgroup, self.volume = cgroup, volume
        self.grace_s, self.interval_s = grace_s, interval_s
        self.tree = None if cgroup.active else ProcessTree(pid)  # the fallback without cgroups
        self.deadline = time.monotonic() + self.limits.timeout_s
        self.killed: str | None = None
        self.detail = ""
        self.peak_mb = 0.0
        self.done = threading.Event()
        self.kill_lock = threading.Lock()

    def alive(self) -> list[int]:
        if self.tree is None:
            return self.cgroup.pids()
        return [p.pid for p in self.tree.members() if not p.zombie]

    def kill_all(self, grace_s: float) -> None:
        """SIGTERM to every process but the leader (bwrap: killing it tears the namespace down at
        once, which would deny the grace), up to `grace_s` for them to go, then the hard kill."""
        if grace_s > 0:
            others = [pid for pid in self.alive() if pid != self.pid]
            for pid in others:
                try:
                    os.kill(pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace_s
            while others and time.monotonic() < deadline and [p for p in self.alive() if p != self.pid]:
                time.sleep(0.02)
        if self.tree is None:
            self.cgroup.kill()
        else:
            self.tree.kill(0)

    def stop(self, reason: str, detail: str, grace_s: float | None = None) -> None:
        with self.kill_lock:
            if self.killed is None:
                self.killed, self.detail = reason, detail
            self.kill_all(self.grace_s if grace_s is None else grace_s)

    def leader_exited(self) -> bool:
        # WNOWAIT: look without reaping, so the pid (= the group id) cannot be reused under us.
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def watch(self) -> None:
        while not self.done.wait(self.interval_s):
            if self.killed is not None:
                continue
            if self.cancel is not None and self.cancel.is_set():
                self.stop("cancelled", "cancelled by the caller")
            elif time.monotonic() > self.deadline:
                self.stop("timeout", f"time limit {self.limits.timeout_s:g} s exceeded")
            elif self.volume is not None and self.volume.full():
                self.stop("disk", f"disk quota ({self.limits.disk_mb} MB)", grace_s=0)
            else:
                members = self.alive()
                self.peak_mb = max(self.peak_mb, sum(private_mb(pid) for pid in members))
                if self.peak_mb > self.limits.memory_mb and self.cgroup.memory_dir is None:
                    # Only without a memory cgroup (the kernel's limit is exact; this sum counts pages
                    # shared copy-on-write once per process). No grace: a run over its memory must not
                    # get the chance to take the machine down.
                    self.stop("memory", f"memory limit {self.limits.memory_mb} MB exceeded "
                                        f"(peak {self.peak_mb:.0f} MB)", grace_s=0)
                elif self.leader_exited() and any(pid != self.pid for pid in members):
                    # The command is done but left processes behind (they may hold the pipe open).
                    with self.kill_lock:
                        self.kill_all(0)


class _Lines:
    """Splits the output into lines for on_line and writes it to the log, up to the log cap."""

    def __init__(self, log, cap_bytes: int, on_line: LineCallback | None, watch: _Watch,
                 start_token: bytes | None = None):
        self.log, self.cap, self.on_line, self.watch = log, cap_bytes, on_line, watch
        self.written = 0
        self.over = False  # a byte past the cap arrived: the run is being stopped
        self.pending = b""
        # The first line the run's own shell prints once bwrap has built its view; never logged.
        self.token = start_token + b"\n" if start_token else b""
        self.started = not start_token
        self.head = b""

    def feed(self, chunk: bytes) -> None:
        if not self.started:
            self.head += chunk
            if self.token.startswith(self.head):
                return  # the token so far: wait for the rest
            if self.head.startswith(self.token):
                self.started, chunk = True, self.head[len(self.token):]
            else:
                chunk = self.head  # bwrap's own error: the run never started
            self.head = b""
        self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        if self.over or not chunk:
            return  # over the cap: the run is being stopped; nothing more is kept
        keep = chunk[:self.cap - self.written]
        if keep:
            self.log.write(keep)
            self.log.flush()
            self.written += len(keep)
        if len(keep) < len(chunk):  # a byte past the cap: this chunk's, or (a log exactly at the cap) the next one's
            self.over = True
            self.watch.stop("log", f"log over {self.cap >> 20} MB", grace_s=0)
            return
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            self.emit(line)
        while len(self.pending) >= MAX_LINE_BYTES:
            self.emit(self.pending[:MAX_LINE_BYTES])
            self.pending = self.pending[MAX_LINE_BYTES:]

    def emit(self, raw: bytes) -> None:
        for start in range(0, max(len(raw), 1), MAX_LINE_BYTES):  # a very long line goes in pieces
            # (bwrap's own errors, before the run started, are logged but are not the run's lines)
            if self.on_line is not None and self.watch.killed is None and self.started:
                if self.on_line(raw[start:start + MAX_LINE_BYTES].decode("utf-8", "replace").rstrip("\r")):
                    self.watch.stop("stopped", "stopped by on_line")

    def close(self) -> None:
        if self.head:  # a beginning too short to tell: the run did not start
            head, self.head = self.head, b""
            self._take(head)
        if self.pending:
            self.emit(self.pending)
            self.pending = b""


class ProcessSandbox:
    """Runs `/bin/sh -c command` in `workdir` with:

    - its own cgroups (`env.cgroup`): a process limit (`pids`), a memory limit the kernel enforces,
      and a kill that reaches every process the run made, daemons included;
    - its own namespaces as uid nobody (`env.namespaces`): it cannot see, signal or read the caller,
      cannot reach localhost, and can write only its workspace and the compile caches;
    - its workspace on a size-capped volume (`env.volume`), left mounted until `release`;
    - an allow-listed environment (`sandbox_env`), HOME and TMPDIR in `<workdir>/.sandbox/`;
    - RLIMIT_CORE=0 and a generous RLIMIT_CPU (no address-space limit: it breaks CUDA);
    - memory also sampled every `interval_s` as the summed private RSS of its processes (the
      reported peak, and the limit where there is no memory cgroup; a run shorter than one interval
      reports about 0);
    - timeout, `cancel` and `on_line` returning True: SIGTERM to everything, `grace_s`, kill;
    - log bytes capped at `log_mb` (killed="log"), disk at `disk_mb` (killed="disk").

    Where cgroups, namespaces or loop devices are missing, it runs without them (a process-tree
    kill, the caller's uid, an uncapped folder) and says so in `SandboxOutcome.containment`.

    stdout and stderr are merged, written to `log_path` as they come and passed to `on_line` line by
    line (without the newline) in the calling thread. Whatever the exit path, no process of the run
    is left running when `run` returns, and a process holding the pipe never keeps it waiting.
    """

    name = "process"

    def __init__(self, grace_s: float = 2.0, interval_s: float = 0.1, warm: bool = False):
        self.grace_s = grace_s
        self.interval_s = interval_s
        self.workspaces = _workspaces()
        # warm: keep one slot started ahead for the next `request.warm` run (env/warm.py). Slots are
        # started by one long-lived thread: bwrap dies with the thread that started it.
        self.warm = warm
        self._slot: Slot | None = None
        self._slot_lock = threading.Lock()
        self._spawns: queue.SimpleQueue | None = None
        if warm:
            atexit.register(self.close)

    def close(self) -> None:
        """Discard the warm slot, if one waits."""
        with self._slot_lock:
            slot, self._slot = self._slot, None
        if slot is not None:
            slot.discard()

    def release(self, workdir: Path, keep: bool = False) -> None:
        unmount_nested(Path(workdir))  # a cache overlay in a workspace without a volume of its own
        self.workspaces.release(workdir, keep)

    def _prepare(self, request: SandboxRequest, isolated: bool) -> tuple[Path, Volume | None]:
        workdir = Path(request.workdir).resolve()
        volume = self.workspaces.mount(workdir, request.limits.disk_mb) if request.limits.disk_mb > 0 else None
        self._ready_folder(request, workdir, isolated)
        return workdir, volume

    @staticmethod
    def _ready_folder(request: SandboxRequest, workdir: Path, isolated: bool) -> None:
        """Scratch HOME and TMPDIR, the compile caches, and a workspace the run may add files to."""
        scratch = workdir / SCRATCH_DIRNAME
        (scratch / "home").mkdir(parents=True, exist_ok=True)
        (scratch / "tmp").mkdir(parents=True, exist_ok=True)
        if request.cache_dir is not None:
            for sub in ("", "inductor", "triton"):
                (Path(request.cache_dir) / sub).mkdir(parents=True, exist_ok=True)
        # the run's uid owns the shared folder (a reader's overlay too: its merged folders keep the owners)
        if isolated and request.cache_dir is not None and Path(request.cache_dir).stat().st_uid != RUN_UID:
            chown_for_run(Path(request.cache_dir))
        if request.cache_dir is not None and not request.cache_write:
            mount_reader(Path(request.cache_dir), scratch, (RUN_UID, RUN_GID) if isolated else None)
        if isolated:
            open_for_run(workdir)

    def run(self, request: SandboxRequest, on_line: LineCallback | None = None,
            cancel: threading.Event | None = None) -> SandboxOutcome:
        t0 = time.monotonic()
        namespaces = namespace_support()
        isolated = not namespaces.startswith("none")
        script = python_script(request.command) if self.warm and request.warm else None
        if script is not None:
            slot = self._take_slot(request, script[0], isolated)
            if slot is not None:
                outcome = self._run_warm(slot, request, script[1], on_line, cancel)
                outcome.containment["namespaces"] = namespaces
                outcome.wall_s = time.monotonic() - t0
                return outcome
        workdir, volume = self._prepare(request, isolated)
        scratch = workdir / SCRATCH_DIRNAME
        env = sandbox_env(request, str(scratch / "home"), str(scratch / "tmp"))
        Path(request.log_path).parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(SETUP_ATTEMPTS):
            outcome, started = self._attempt(request, workdir, volume, env, isolated, on_line, cancel)
            # bwrap copies the machine's mount table; a mount point deleted meanwhile (another run's
            # workspace being removed) makes it fail before the run starts: build it again.
            if started or outcome.killed is not None:
                break
            time.sleep(setup_wait_s(attempt))
        outcome.containment = {"cgroup": outcome.containment["cgroup"], "namespaces": namespaces,
                               "disk": volume.kind if volume is not None else "none (disk_mb = 0)"}
        outcome.wall_s = time.monotonic() - t0
        return outcome

    def _take_slot(self, request: SandboxRequest, interpreter: str, isolated: bool) -> Slot | None:
        """The waiting slot if it fits `request` (else it is discarded); a new one is started for the
        run after this one either way."""
        key = slot_key(request, interpreter, isolated)
        with self._slot_lock:
            slot, self._slot = self._slot, None
        if slot is not None and (slot.key != key or not slot.wait_ready(WARM_READY_S)):
            slot.discard()
            slot = None
        if self._spawns is None:
            self._spawns = queue.SimpleQueue()
            threading.Thread(target=self._spawner, name="sandbox-warm", daemon=True).start()
        self._spawns.put((request, key, interpreter, isolated))
        return slot

    def _spawner(self) -> None:
        assert self._spawns is not None
        while True:
            request, key, interpreter, isolated = self._spawns.get()
            try:
                slot = self._start_slot(request, key, interpreter, isolated)
            except Exception:  # no slot: the next run starts cold
                continue
            with self._slot_lock:
                old, self._slot = self._slot, slot
            if old is not None:
                old.discard()
            self._read_token(slot)

    def _start_slot(self, request: SandboxRequest, key: tuple, interpreter: str, isolated: bool) -> Slot:
        """A sandbox like the one `request` would get, at a folder of its own, around the stub."""
        limits = request.limits
        folder = new_folder(Path(request.workdir).resolve().parent.parent)
        volume = Volume(folder, limits.disk_mb) if limits.disk_mb > 0 else None
        if volume is None or not volume.mounted:
            if volume is not None:
                volume.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise OSError("warm slots need the workspace volume")
        try:
            self._ready_folder(request, folder, isolated)
            scratch = folder / SCRATCH_DIRNAME
            env = sandbox_env(request, str(scratch / "home"), str(scratch / "tmp"))
            cgroup = RunCgroup(f"{os.getpid()}-{next(_names)}-{uuid.uuid4().hex[:6]}", limits.memory_mb,
                               limits.pids)
        except BaseException:
            volume.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        token = f"speedsearch-warm-{uuid.uuid4().hex}"
        shell = f'ulimit -c 0 && ulimit -t {cpu_time_limit_s(limits)} && exec "$1" -c "$2"'
        inner = ["/bin/sh", "-c", shell, "sandbox", interpreter, stub_source(request.warm_imports, token)]
        if isolated:
            gpus = bool(limits.gpu_ids) or bool(request.env.get("CUDA_VISIBLE_DEVICES"))
            inner = bwrap_argv(folder, request.data, _bound_cache(request), tuple(request.hide), inner, gpus)
        # The leader dies with the thread that starts it (a worker killed with -9 included): env/guardian.py.
        argv = ["/bin/sh", "-c", f'{cgroup.add_pid_command()} && exec "$@"', "enter", *pdeath_argv(), *inner]

        def launch() -> subprocess.Popen:
            return subprocess.Popen(argv, cwd=folder, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc = launch()
        except BaseException:
            cgroup.close()
            volume.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Slot(key, proc, cgroup, volume, folder, token.encode(), threading.Event(), relaunch=launch)

    @classmethod
    def _read_token(cls, slot: Slot) -> None:
        """Wait for the stub's token (its start-up done); anything else means it failed. A slot whose
        namespaces could not be built (the mount race `run` retries too) is launched again."""
        for attempt in range(SETUP_ATTEMPTS):
            slot.failed = cls._token(slot)
            if not slot.failed.startswith("bwrap:") or attempt == SETUP_ATTEMPTS - 1:
                break
            time.sleep(setup_wait_s(attempt))
            if not slot.launch_again():
                break
        slot.ready.set()

    @staticmethod
    def _token(slot: Slot) -> str:
        """"" when the stub's token came, else what came instead."""
        assert slot.proc.stdout is not None
        fd, head = slot.proc.stdout.fileno(), b""
        expected = slot.token + b"\n"
        deadline = time.monotonic() + WARM_READY_S
        while len(head) < len(expected) and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(fd, len(expected) - len(head))
            if not chunk:
                break
            head += chunk
        if head != expected:
            return (head.decode(errors="replace").strip() or "no token")[-300:]
        return ""

    def _run_warm(self, slot: Slot, request: SandboxRequest, argv: list[str], on_line: LineCallback | None,
                  cancel: threading.Event | None) -> SandboxOutcome:
        """Hand the materialised workdir to the slot and start its run."""
        workdir = Path(request.workdir).resolve()
        shutil.copytree(workdir, slot.folder, symlinks=True, dirs_exist_ok=True)  # given files keep their modes
        if slot.key[-1]:  # isolated: the run (as nobody) may add files anywhere in its workspace
            open_for_run(slot.folder)
        bound = BoundVolume(workdir, slot.volume, slot.folder)
        self.workspaces.adopt(workdir, bound)
        scratch = slot.folder / SCRATCH_DIRNAME
        env = sandbox_env(request, str(scratch / "home"), str(scratch / "tmp"))
        Path(request.log_path).parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        slot.go(argv, env)
        outcome, _ = self._supervise(slot.proc, request, slot.cgroup, bound, "", on_line, cancel)
        outcome.began = began
        outcome.containment = {"cgroup": outcome.containment["cgroup"], "disk": bound.kind,
                               "start": "warm slot"}
        return outcome

    def _attempt(self, request: SandboxRequest, workdir: Path, volume: Volume | None, env: dict[str, str],
                 isolated: bool, on_line: LineCallback | None,
                 cancel: threading.Event | None) -> tuple[SandboxOutcome, bool]:
        """One launch of the run; returns its outcome and whether the command started."""
        limits = request.limits
        cgroup = RunCgroup(f"{os.getpid()}-{next(_names)}-{uuid.uuid4().hex[:6]}", limits.memory_mb, limits.pids)
        token = f"speedsearch-started-{uuid.uuid4().hex}" if isolated else ""
        # rlimits are set by the shell before it execs the command, not in a preexec_fn (which can
        # deadlock in a multi-threaded parent such as a Ray worker).
        shell = f"ulimit -c 0 && ulimit -t {cpu_time_limit_s(limits)} && exec /bin/sh -c \"$1\""
        inner = ["/bin/sh", "-c", f"echo {token} && {shell}" if token else shell, "sandbox", request.command]
        if isolated:
            gpus = bool(limits.gpu_ids) or bool(request.env.get("CUDA_VISIBLE_DEVICES"))
            inner = bwrap_argv(workdir, request.data, _bound_cache(request), tuple(request.hide), inner, gpus)
        # The leader enters the cgroups first, then execs: the run is inside before it can fork.
        # The leader dies with the thread that starts it (a worker killed with -9 included): env/guardian.py.
        argv = ["/bin/sh", "-c", f'{cgroup.add_pid_command()} && exec "$@"', "enter", *pdeath_argv(), *inner]
        began = time.monotonic()  # the workspace volume is made; bwrap's own start counts from here
        try:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            cgroup.close()
            raise
        outcome, started = self._supervise(proc, request, cgroup, volume, token, on_line, cancel)
        outcome.began = began
        return outcome, started

    def _supervise(self, proc: subprocess.Popen, request: SandboxRequest, cgroup: RunCgroup, volume,
                   token: str, on_line: LineCallback | None,
                   cancel: threading.Event | None) -> tuple[SandboxOutcome, bool]:
        """Read a started run to its end, enforce its limits, kill what it leaves; free its cgroups."""
        limits = request.limits
        keeper = guardian()  # kills what the run leaves if this process dies under it
        if keeper is not None:
            keeper.watch("pg", proc.pid)
        try:
            with open(request.log_path, "wb") as log:
                watch = _Watch(proc.pid, request, cgroup, volume, cancel, self.grace_s, self.interval_s)
                watchdog = threading.Thread(target=watch.watch, name=f"sandbox-watch-{proc.pid}", daemon=True)
                watchdog.start()
                lines = _Lines(log, limits.log_mb << 20, on_line, watch, token.encode() or None)
                try:
                    self._pump(proc, lines, watch)
                except BaseException as e:  # on_line raised, or KeyboardInterrupt: still leave nothing behind
                    watch.stop("cancelled", f"on_line raised {type(e).__name__}: {e}")
                    raise
                finally:
                    status = self._finish(proc, watch, watchdog)
                    # Read before the cgroups go: what the kernel enforced on its own.
                    oom, hits, cgroup_peak = cgroup.oom_killed(), cgroup.pids_limit_hits(), cgroup.peak_mb()
                    cpu1 = cgroup.cpu_s()
        finally:
            cgroup.close()
            if keeper is not None:
                keeper.unwatch("pg", proc.pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if watch.killed is None and oom:
            watch.killed = "memory"
            watch.detail = f"memory limit {limits.memory_mb} MB exceeded (the kernel's OOM killer fired)"
            watch.peak_mb = max(watch.peak_mb, cgroup_peak)
        elif watch.killed is None and volume is not None and volume.full() and exit_code != 0:
            watch.killed, watch.detail = "disk", f"disk quota ({limits.disk_mb} MB)"
        if hits:
            note = f"process limit (pids {limits.pids}) reached: {hits} forks refused"
            watch.detail = f"{watch.detail}; {note}" if watch.detail else note
        outcome = SandboxOutcome(exit_code=None if watch.killed else exit_code, killed=watch.killed,
                                 peak_rss_mb=watch.peak_mb, detail=watch.detail,
                                 # all the cgroup counted: a warm slot's interpreter start and imports
                                 # too, as a cold start counts them (the cpu guard compares the two)
                                 cpu_s=None if cpu1 is None else round(cpu1, 3),
                                 containment={"cgroup": cgroup.kind})
        return outcome, lines.started

    @staticmethod
    def _pump(proc: subprocess.Popen, lines: _Lines, watch: _Watch) -> None:
        """Read until EOF, or until the leader has exited and everything else was killed: a process
        that escaped the kill and holds the pipe gets a short drain, never an endless wait."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        drain_until = None
        while True:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                lines.feed(chunk)
            elif drain_until is not None:
                if time.monotonic() > drain_until:
                    break
            elif watch.leader_exited():
                with watch.kill_lock:
                    watch.kill_all(0)
                drain_until = time.monotonic() + DRAIN_S
        lines.close()

    @staticmethod
    def _finish(proc: subprocess.Popen, watch: _Watch, watchdog: threading.Thread) -> int:
        # Wait for the leader without reaping it (its pid is the group id the fallback still
        # signals), kill whatever it left behind, stop the watchdog, and only then reap.
        while True:
            try:
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break
        with watch.kill_lock:
            watch.kill_all(0)
        watch.done.set()
        watchdog.join()
        # (Not wait4's ru_maxrss for the peak: it counts the pages of this process at fork time.)
        try:
            status = os.waitpid(proc.pid, 0)[1]
        except ChildProcessError:
            status = 0
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits on a reused pid
        if proc.stdout is not None:
            proc.stdout.close()
        return status
