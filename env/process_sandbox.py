"""ProcessSandbox: the default sandbox. One command in its own session, with a scrubbed environment,
rlimits, an RSS watchdog over the whole process tree and a kill that leaves nothing behind.

It is not a security boundary (the command runs as the caller's user and can read what the caller
can read); it is a clean, bounded, killable run. Use `DockerSandbox` for isolation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from env.sandbox import Limits, LineCallback, SandboxOutcome, SandboxRequest

SCRATCH_DIRNAME = ".sandbox"  # inside the workdir: home/ and tmp/ of the run
# Safety switches for NCCL/torch on machines where NVLink multicast misbehaves: the operator sets
# them for every job, so they must reach candidates unchanged.
# NVLink multicast stays off on shared hosts; CUDA's library paths are configuration, not secrets.
MULTICAST_OFF = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
PASSTHROUGH_VARS = (*MULTICAST_OFF, "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH")
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
MAX_LINE_BYTES = 1 << 20  # a line longer than this reaches on_line in pieces


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
    if request.cache_dir is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(request.cache_dir) / "inductor")
        env["TRITON_CACHE_DIR"] = str(Path(request.cache_dir) / "triton")
    env.update({k: os.environ[k] for k in PASSTHROUGH_VARS if k in os.environ})
    env.update(request.env)
    return env


def cpu_time_limit_s(limits: Limits) -> int:
    """RLIMIT_CPU per process: generous (twice every allowed core busy for the whole timeout), only a
    backstop against a runaway that the wall-clock timeout would catch anyway."""
    return int(2 * limits.timeout_s * max(limits.cpus, 1)) + 60


@dataclass
class _Proc:
    pid: int
    ppid: int
    pgrp: int
    session: int
    start: int  # clock ticks after boot: with the pid, an identity that survives pid reuse
    zombie: bool


def _scan_procs() -> dict[int, _Proc]:
    """One pass over /proc/*/stat: parents, groups and sessions at once (cheaper than psutil's
    per-process calls, and enough to find group members that were re-parented away from the tree)."""
    procs: dict[int, _Proc] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            f = data[data.rindex(b")") + 2:].split()
            procs[int(name)] = _Proc(int(name), int(f[1]), int(f[2]), int(f[3]), int(f[19]), f[0] in (b"Z", b"X"))
        except (OSError, ValueError, IndexError):
            continue
    return procs


def _private_mb(pid: int) -> float:
    """Resident anonymous and shared-memory pages of one process. Not the whole RSS: file pages (the
    torch and CUDA libraries) are shared by every process of the run and reclaimable, and counting
    them once per process made a torch.compile run on a GPU (a pool of compile workers, each mapping
    libtorch) look like 7 GB."""
    kb = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"RssAnon:", b"RssShmem:")):
                    kb += int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return kb / 1024


class _Tree:
    """Everything the run started: its session/process group, every descendant, and every process
    ever seen as a member (so a grandchild that called setsid and lost its parent is still killed)."""

    def __init__(self, root: int):
        self.root = root
        self.known: dict[int, int] = {}  # pid -> start time
        self.lock = threading.Lock()

    def members(self) -> list[_Proc]:
        procs = _scan_procs()
        children: dict[int, list[int]] = {}
        for p in procs.values():
            children.setdefault(p.ppid, []).append(p.pid)
        with self.lock:
            found = {p.pid for p in procs.values()
                     if p.session == self.root or p.pgrp == self.root
                     or self.known.get(p.pid) == p.start}
            found.add(self.root)
            stack = list(found)
            while stack:
                for c in children.get(stack.pop(), ()):
                    if c not in found:
                        found.add(c)
                        stack.append(c)
            out = [procs[pid] for pid in found if pid in procs]
            for p in out:
                self.known[p.pid] = p.start
            return out

    def signal(self, sig: int) -> list[_Proc]:
        """Send `sig` to the group and to every member; return the members still running."""
        try:
            os.killpg(self.root, sig)
        except (ProcessLookupError, PermissionError):
            pass
        alive = [p for p in self.members() if not p.zombie]
        for p in alive:
            try:
                os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return alive

    def kill(self, grace_s: float) -> None:
        """SIGTERM, up to `grace_s` for a clean exit, then SIGKILL until nothing is left running."""
        if grace_s > 0 and self.signal(signal.SIGTERM):
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                time.sleep(0.02)
                if not any(not p.zombie for p in self.members()):
                    return
        deadline = time.monotonic() + 5.0
        while self.signal(signal.SIGKILL) and time.monotonic() < deadline:
            time.sleep(0.01)


class _Watch:
    """The run's state, shared by the reading (calling) thread and the watchdog thread."""

    def __init__(self, pid: int, limits: Limits, cancel: threading.Event | None, grace_s: float,
                 interval_s: float):
        self.pid, self.limits, self.cancel = pid, limits, cancel
        self.grace_s, self.interval_s = grace_s, interval_s
        self.tree = _Tree(pid)
        self.deadline = time.monotonic() + limits.timeout_s
        self.killed: str | None = None
        self.detail = ""
        self.peak_mb = 0.0
        self.done = threading.Event()
        self._kill_lock = threading.Lock()

    def stop(self, reason: str, detail: str, grace_s: float | None = None) -> None:
        with self._kill_lock:
            if self.killed is None:
                self.killed, self.detail = reason, detail
            self.tree.kill(self.grace_s if grace_s is None else grace_s)

    def leader_exited(self) -> bool:
        # WNOWAIT: look without reaping, so the pid (= the group id) cannot be reused under us.
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def sample(self) -> list[_Proc]:
        members = self.tree.members()
        self.peak_mb = max(self.peak_mb, sum(_private_mb(p.pid) for p in members if not p.zombie))
        return members

    def watch(self) -> None:
        while not self.done.wait(self.interval_s):
            if self.killed is not None:
                continue
            if self.cancel is not None and self.cancel.is_set():
                self.stop("cancelled", "cancelled by the caller")
            elif time.monotonic() > self.deadline:
                self.stop("timeout", f"time limit {self.limits.timeout_s:g} s exceeded")
            else:
                members = self.sample()
                if self.peak_mb > self.limits.memory_mb:
                    # No grace: a run over its memory must not get the chance to take the machine down.
                    self.stop("memory", f"memory limit {self.limits.memory_mb} MB exceeded "
                                        f"(peak {self.peak_mb:.0f} MB)", grace_s=0)
                elif self.leader_exited() and any(p.pid != self.pid and not p.zombie for p in members):
                    # The command is done but left processes behind (they may hold the pipe open).
                    with self._kill_lock:
                        self.tree.kill(0)


class ProcessSandbox:
    """Runs `/bin/sh -c command` in `workdir`, in a new session, with:

    - an allow-listed environment (`sandbox_env`), HOME and TMPDIR in `<workdir>/.sandbox/`;
    - RLIMIT_CORE=0 and a generous RLIMIT_CPU (no address-space limit: it breaks CUDA);
    - memory: the summed anonymous + shared-memory RSS of the whole tree (`_private_mb`), sampled
      every `interval_s`, against `memory_mb` (also the reported peak, so a run shorter than one
      interval reports about 0);
    - timeout, `cancel` and `on_line` returning True: SIGTERM to everything, `grace_s`, SIGKILL.

    stdout and stderr are merged, written to `log_path` as they come and passed to `on_line` line by
    line (without the newline) in the calling thread. Whatever the exit path, no process of the run
    is left running when `run` returns.
    """

    name = "process"

    def __init__(self, grace_s: float = 2.0, interval_s: float = 0.1):
        self.grace_s = grace_s
        self.interval_s = interval_s

    def run(self, request: SandboxRequest, on_line: LineCallback | None = None,
            cancel: threading.Event | None = None) -> SandboxOutcome:
        t0 = time.monotonic()
        workdir = Path(request.workdir).resolve()
        scratch = workdir / SCRATCH_DIRNAME
        (scratch / "home").mkdir(parents=True, exist_ok=True)
        (scratch / "tmp").mkdir(parents=True, exist_ok=True)
        env = sandbox_env(request, str(scratch / "home"), str(scratch / "tmp"))
        log_path = Path(request.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # rlimits are set by the shell before it execs the command, not in a preexec_fn (which can
        # deadlock in a multi-threaded parent such as a Ray worker).
        limits = f"ulimit -c 0 && ulimit -t {cpu_time_limit_s(request.limits)} && exec /bin/sh -c \"$1\""
        argv = ["/bin/sh", "-c", limits, "sandbox", request.command]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            watch = _Watch(proc.pid, request.limits, cancel, self.grace_s, self.interval_s)
            watchdog = threading.Thread(target=watch.watch, name=f"sandbox-watch-{proc.pid}", daemon=True)
            watchdog.start()
            try:
                self._pump(proc, log, watch, on_line)
            except BaseException as e:  # on_line raised, or KeyboardInterrupt: still leave nothing behind
                watch.stop("cancelled", f"on_line raised {type(e).__name__}: {e}")
                raise
            finally:
                status = self._finish(proc, watch, watchdog)
        killed = watch.killed
        return SandboxOutcome(
            exit_code=None if killed else os.waitstatus_to_exitcode(status), killed=killed,
            wall_s=time.monotonic() - t0, peak_rss_mb=watch.peak_mb,
            detail=watch.detail)

    @staticmethod
    def _pump(proc: subprocess.Popen, log, watch: _Watch, on_line: LineCallback | None) -> None:
        assert proc.stdout is not None
        for raw in iter(lambda: proc.stdout.readline(MAX_LINE_BYTES), b""):
            log.write(raw)
            log.flush()
            if on_line is not None and watch.killed is None:
                if on_line(raw.decode("utf-8", "replace").rstrip("\r\n")):
                    watch.stop("stopped", "stopped by on_line")

    @staticmethod
    def _finish(proc: subprocess.Popen, watch: _Watch, watchdog: threading.Thread) -> int:
        # The pipe is closed: wait for the leader without reaping it (its pid is the group id we
        # still signal), kill whatever it left behind, stop the watchdog, and only then reap.
        while True:
            try:
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break
        with watch._kill_lock:
            watch.tree.kill(0)
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
