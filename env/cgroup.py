"""One run's cgroups: a process limit, a memory limit, and a kill that reaches every process the run
made (double-forked daemons that left the session included), on cgroup v2, v1, or the hybrid of both.

Why cgroups and not the process tree: a process that calls setsid and whose parent exits leaves the
tree and the session; the kernel still counts it in the cgroup it was born in, and nothing but root
can move it out. Why freeze before killing (where cgroup.kill is missing): a fork bomb outruns a
kill loop; a frozen cgroup cannot fork, so one pass over its task list kills everything.

The run's cgroups are made beside the caller's own (children of the caller's cgroup in each
hierarchy), so the limits the caller lives under still bound the run. Only root can make them;
elsewhere `RunCgroup.kind` says "none (...)" and the caller falls back to killing the process tree.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import time
from pathlib import Path

PREFIX = "speedsearch-"
KILL_WAIT_S = 10.0  # a kill that leaves tasks after this long is reported, not waited on forever


def _mounts() -> tuple[dict[str, Path], Path | None]:
    """(v1 controller -> mount point, the v2 mount point) from /proc/self/mounts."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return v1, v2
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        if parts[2] == "cgroup2":
            v2 = v2 or Path(parts[1])
        elif parts[2] == "cgroup":
            for opt in parts[3].split(","):
                if opt in ("pids", "memory", "freezer"):
                    v1.setdefault(opt, Path(parts[1]))
    return v1, v2


def _own_paths() -> tuple[dict[str, str], str]:
    """(v1 controller -> this process's cgroup path, its v2 path) from /proc/self/cgroup."""
    v1: dict[str, str] = {}
    v2 = "/"
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return v1, v2
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = path
        for c in controllers.split(","):
            v1[c] = path
    return v1, v2


def _parent(mount: Path, own: str) -> Path:
    """Where to make a child: under the caller's own cgroup when it is visible, else the mount root
    (inside a cgroup namespace the path may not exist under the mount)."""
    here = mount / own.lstrip("/")
    return here if here.is_dir() else mount


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _counter(path: Path, key: str) -> int:
    """A `key N` line of a flat-keyed cgroup file (memory.events, pids.events, memory.oom_control)."""
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0


def cpu_seconds(dirs: list[Path]) -> float | None:
    """CPU time the cgroup's processes have used, dead ones included (v2 `cpu.stat` usage_usec, which
    every v2 cgroup has; v1 `cpuacct.usage`); None where no dir has either."""
    for d in dirs:
        usec = _counter(d / "cpu.stat", "usage_usec") if (d / "cpu.stat").exists() else None
        if usec is not None:
            return usec / 1e6
        text = _read(d / "cpuacct.usage").strip()
        if text.isdigit():
            return int(text) / 1e9
    return None


def procs(dirs: list[Path]) -> list[int]:
    """Every process in these cgroups and their children cgroups."""
    found: set[int] = set()
    for d in dirs:
        for sub, _, _ in os.walk(d):
            found.update(int(p) for p in _read(Path(sub) / "cgroup.procs").split())
    return sorted(found)


def _kill_each(dirs: list[Path]) -> None:
    for pid in procs(dirs):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_once(d: Path) -> None:
    """One pass of the strongest kill this cgroup offers."""
    if (d / "cgroup.kill").exists():
        try:
            _write(d / "cgroup.kill", "1")
            return
        except OSError:
            pass
    if (d / "freezer.state").exists():  # v1 freezer
        state, frozen, thawed = d / "freezer.state", "FROZEN", "THAWED"
    elif (d / "cgroup.freeze").exists():  # v2 without cgroup.kill (kernels before 5.14)
        state, frozen, thawed = d / "cgroup.freeze", "1", "0"
    else:
        _kill_each([d])
        return
    try:
        _write(state, frozen)
        deadline = time.monotonic() + 1.0
        # v1 says FREEZING until every task stopped; v2 reports it in cgroup.events.
        while time.monotonic() < deadline and not _is_frozen(d):
            time.sleep(0.002)
        _kill_each([d])  # SIGKILL is queued on frozen tasks; they die on thaw
    finally:
        try:
            _write(state, thawed)
        except OSError:
            pass


def _is_frozen(d: Path) -> bool:
    if (d / "freezer.state").exists():
        return _read(d / "freezer.state").strip() == "FROZEN"
    return _counter(d / "cgroup.events", "frozen") == 1


def freeze_kill(dirs: list[Path]) -> None:
    """Kill every task in these cgroup dirs (a v1 freezer dir and/or a v2 dir): cgroup.kill where
    the dir offers it, else freeze, SIGKILL each task, thaw. Repeats until the dirs are empty or
    KILL_WAIT_S has passed (a task in uninterruptible sleep can take a moment to die)."""
    dirs = [Path(d) for d in dirs if Path(d).is_dir()]
    for d in dirs:
        # A wrong path here would kill far more than a run: a hierarchy's root holds every process
        # of the machine, and the caller's own cgroup holds the caller.
        if os.path.ismount(d) or not (d / "cgroup.procs").exists():
            raise ValueError(f"freeze_kill: {d} is not a run's cgroup (a hierarchy's root, or no cgroup)")
        if os.getpid() in procs([d]):
            raise ValueError(f"freeze_kill: {d} holds the caller itself")
    deadline = time.monotonic() + KILL_WAIT_S
    passes = 0
    while procs(dirs) and time.monotonic() < deadline:
        if passes % 25 == 0:  # once at first, then every ~50 ms while tasks remain
            for d in dirs:
                _kill_once(d)
        passes += 1
        time.sleep(0.002)


class RunCgroup:
    """One run's cgroups (root only). On a hybrid machine: v1 pids and memory for the limits, and
    a v2 child for cgroup.kill (or the v1 freezer where v2 has no cgroup.kill). On pure v2: one
    child with pids.max, memory.max and cgroup.kill. `kind` says which, for the provenance."""

    def __init__(self, name: str, memory_mb: int, pids_max: int):
        self.name = PREFIX + name
        self.memory_mb, self.pids_max = memory_mb, pids_max
        self.dirs: list[Path] = []  # every dir made, to enter and to remove
        self.kill_dirs: list[Path] = []
        self.memory_dir: Path | None = None
        self.pids_dir: Path | None = None
        self.closed = False
        try:
            self.kind = self._make()
        except OSError as e:
            self._rmdirs()
            self.kind = f"none (cannot make cgroups: {e.strerror or e})"

    def _mkdir(self, parent: Path) -> Path:
        d = parent / self.name
        d.mkdir()
        self.dirs.append(d)
        return d

    def _make(self) -> str:
        mounts, v2 = _mounts()
        own, own_v2 = _own_paths()
        if v2 is not None:
            parent = _parent(v2, own_v2)
            controllers = _read(parent / "cgroup.controllers").split()
            if {"pids", "memory"} <= set(controllers):  # pure v2 (or a v2 with the controllers)
                try:
                    _write(parent / "cgroup.subtree_control", "+pids +memory")
                except OSError:
                    pass  # already on, or refused (processes in the parent): checked below
                d = self._mkdir(parent)
                if (d / "pids.max").exists() and (d / "memory.max").exists():
                    _write(d / "pids.max", str(self.pids_max))
                    _write(d / "memory.max", str(self.memory_mb << 20))
                    if (d / "memory.swap.max").exists():
                        _write(d / "memory.swap.max", "0")
                    self.pids_dir = self.memory_dir = d
                    self.kill_dirs = [d]
                    return "v2"
                self._rmdirs()
        parts = []
        if "pids" in mounts:
            self.pids_dir = self._mkdir(_parent(mounts["pids"], own.get("pids", "/")))
            _write(self.pids_dir / "pids.max", str(self.pids_max))
            parts.append("pids")
        if "memory" in mounts:
            self.memory_dir = self._mkdir(_parent(mounts["memory"], own.get("memory", "/")))
            _write(self.memory_dir / "memory.limit_in_bytes", str(self.memory_mb << 20))
            try:  # no swap either (memsw exists only with swap accounting)
                _write(self.memory_dir / "memory.memsw.limit_in_bytes", str(self.memory_mb << 20))
            except OSError:
                pass
            parts.append("memory")
        if v2 is not None:
            d = self._mkdir(_parent(v2, own_v2))
            if (d / "cgroup.kill").exists():
                self.kill_dirs.append(d)
        kill = "v2 kill" if self.kill_dirs else ""
        if not self.kill_dirs and "freezer" in mounts:
            self.kill_dirs.append(self._mkdir(_parent(mounts["freezer"], own.get("freezer", "/"))))
            kill = "v1 freezer kill"
        if not parts and not self.kill_dirs:
            self._rmdirs()
            return "none (no pids, memory, freezer or v2 cgroup mounted)"
        if not parts:
            # Pure v2 where the caller's cgroup holds processes: v2 gives controllers only to the
            # children of a cgroup without processes, so the run gets the kill but not the limits.
            return f"{kill} only (no pids or memory limit: the caller's cgroup offers no controllers)"
        return ", ".join(x for x in (f"v1 {'+'.join(parts)}", kill or "kill by pid list") if x)

    @property
    def active(self) -> bool:
        return bool(self.dirs)

    def add_pid_command(self) -> str:
        """A shell snippet that puts the running shell ($$) in every cgroup; run it first, then exec
        the command, so the run is inside before it can fork. `:` where there are no cgroups."""
        if not self.dirs:
            return ":"
        return " && ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}" for d in self.dirs)

    def pids(self) -> list[int]:
        return procs(self.dirs)

    def oom_killed(self) -> bool:
        """The kernel's OOM killer fired inside the run's memory limit."""
        if self.memory_dir is None:
            return False
        if (self.memory_dir / "memory.events").exists():
            return _counter(self.memory_dir / "memory.events", "oom_kill") > 0
        return _counter(self.memory_dir / "memory.oom_control", "oom_kill") > 0

    def pids_limit_hits(self) -> int:
        """How many forks the process limit refused."""
        if self.pids_dir is None:
            return 0
        return _counter(self.pids_dir / "pids.events", "max")

    def cpu_s(self) -> float | None:
        """CPU seconds its processes have used so far (None without a cgroup that counts them)."""
        return cpu_seconds(self.dirs)

    def peak_mb(self) -> float:
        """The memory cgroup's high-water mark (page cache included), 0 where unknown."""
        if self.memory_dir is None:
            return 0.0
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            text = _read(self.memory_dir / name).strip()
            if text.isdigit():
                return int(text) / 2**20
        return 0.0

    def kill(self) -> None:
        """Everything in the run's cgroups dies; returns once they are empty (or after KILL_WAIT_S)."""
        if self.kill_dirs:
            freeze_kill(self.kill_dirs)
        deadline = time.monotonic() + KILL_WAIT_S
        while self.pids() and time.monotonic() < deadline:  # no kill dir, or a task that slipped in
            _kill_each(self.dirs)
            time.sleep(0.005)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.kill()
        self._rmdirs()

    def _rmdirs(self) -> None:
        for d in reversed(self.dirs):
            for _ in range(50):  # the last task may still be leaving
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        self.dirs = []


def reap_orphans(owner: int | None = None) -> list[Path]:
    """Kill and remove the cgroups of runs whose caller died without closing them (a worker killed
    with -9): those named `speedsearch-<pid>-...` beside the caller's own, whose pid is gone.
    `owner`: only that caller's, dead or dying (env/guardian.py, as soon as it died)."""
    mounts, v2 = _mounts()
    own, own_v2 = _own_paths()
    parents = {_parent(m, own.get(c, "/")) for c, m in mounts.items()}
    if v2 is not None:
        parents.add(_parent(v2, own_v2))
    reaped = []
    for parent in parents:
        try:
            entries = list(parent.glob(PREFIX + "*"))
        except OSError:
            continue
        for d in entries:
            pid = d.name[len(PREFIX):].split("-", 1)[0]
            if not pid.isdigit() or (int(pid) != owner if owner is not None else Path(f"/proc/{pid}").exists()):
                continue
            freeze_kill([d])
            try:
                d.rmdir()
                reaped.append(d)
            except OSError:
                pass
    return reaped


@functools.cache
def cgroup_support() -> str:
    """One line: what this machine offers a run (for the provenance and the launch header)."""
    probe = RunCgroup(f"probe-{os.getpid()}", memory_mb=64, pids_max=8)
    probe.close()
    mounts, v2 = _mounts()
    layout = "v2" if not mounts else ("hybrid v1+v2" if v2 is not None else "v1")
    return f"{probe.kind} ({layout})"
