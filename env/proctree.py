"""The run's processes found through /proc: the fallback where the run has no cgroup of its own.

A process tree is weaker than a cgroup (a daemon that double-forked into its own session after its
parent exited is found only if it was ever seen), so it is used only where cgroups are missing.
It also measures private memory per process, which the cgroup does not (its count includes page
cache).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass


@dataclass
class Proc:
    pid: int
    ppid: int
    pgrp: int
    session: int
    start: int  # clock ticks after boot: with the pid, an identity that survives pid reuse
    zombie: bool


def scan_procs() -> dict[int, Proc]:
    """One pass over /proc/*/stat: parents, groups and sessions at once (cheaper than psutil's
    per-process calls, and enough to find group members that were re-parented away from the tree)."""
    procs: dict[int, Proc] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            f = data[data.rindex(b")") + 2:].split()
            procs[int(name)] = Proc(int(name), int(f[1]), int(f[2]), int(f[3]), int(f[19]), f[0] in (b"Z", b"X"))
        except (OSError, ValueError, IndexError):
            continue
    return procs


def private_mb(pid: int) -> float:
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


class ProcessTree:
    """Everything the run started: its session/process group, every descendant, and every process
    ever seen as a member (so a grandchild that called setsid and lost its parent is still killed)."""

    def __init__(self, root: int):
        self.root = root
        self.known: dict[int, int] = {}  # pid -> start time
        self.lock = threading.Lock()

    def members(self) -> list[Proc]:
        procs = scan_procs()
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

    def signal(self, sig: int) -> list[Proc]:
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
