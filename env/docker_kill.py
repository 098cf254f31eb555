"""Stopping a container for sure: `docker kill`, then, when that fails or the container does not
stop, the same freeze-and-kill through the container's own cgroups that the process sandbox uses.

Why: `docker kill` goes daemon -> containerd -> shim -> runc; any of them can be wedged or slow
(a fork bomb under Docker once ran 342 s against a 60 s limit because a failed kill was swallowed).
The kernel's cgroups are the one place that sees every process of the container, whatever the
daemon believes. The container is found from its init's host pid (State.Pid): /proc/<pid>/cgroup
names its v1 freezer dir and its v2 dir; a dir is used only when it is the container's own (it
carries the container id), never a parent that other processes share.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path

from env.cgroup import freeze_kill, procs

KILL_CALL_S = 5.0  # `docker kill` answers in ~50 ms; past this it is wedged
EXIT_WAIT_S = 5.0  # after a kill that answered, the container must be gone within this
REMOVE_CALL_S = 10.0
# Worst case from the timeout to the caller's return: kill call 5 + exit wait 5 + freeze_kill 10 +
# 2 + removal 3 (after an escalation) = 25 s, inside the promised timeout + 30 s.


def call_with_deadline(fn: Callable[[], object], deadline_s: float) -> tuple[object, str | None]:
    """(result, None), or (None, what went wrong): an exception, or no answer within `deadline_s`
    (the call is left to finish on a daemon thread; a Docker client call ends at its own timeout)."""
    box: dict[str, object] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except Exception as e:  # reported to the caller, never swallowed
            box["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=call, name="docker-call", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        return None, f"no answer within {deadline_s:g} s"
    if "error" in box:
        return None, str(box["error"])
    return box.get("value"), None


def _mounts() -> dict[str, Path]:
    """cgroup hierarchy key ("freezer", "memory", "pids", "" for v2) -> its mount point."""
    found: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "cgroup2":
            found.setdefault("", Path(parts[1]))
        elif len(parts) >= 4 and parts[2] == "cgroup":
            for opt in parts[3].split(","):
                found.setdefault(opt, Path(parts[1]))
    return found


class ContainerCgroups:
    """The host-side cgroup dirs of one running container (empty where not found: a remote daemon,
    a container that already exited)."""

    def __init__(self, pid: int, container_id: str):
        self.dirs: dict[str, Path] = {}
        if pid <= 0:
            return
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return
        mounts = _mounts()
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if container_id not in path:
                continue  # only the container's own cgroup, never a shared parent (or the root)
            for key in controllers.split(",") if controllers else [""]:
                if key in mounts and (mounts[key] / path.lstrip("/")).is_dir():
                    self.dirs[key] = mounts[key] / path.lstrip("/")

    @property
    def kill_dirs(self) -> list[Path]:
        """Where freeze_kill acts: the v2 dir (cgroup.kill) and the v1 freezer dir."""
        return [d for key, d in self.dirs.items() if key in ("", "freezer")]

    def file(self, controller: str, name: str) -> Path | None:
        d = self.dirs.get(controller) or self.dirs.get("")  # pure v2: every controller in one dir
        return d / name if d is not None else None

    def describe(self) -> str:
        """e.g. "v1 freezer + v2 cgroup.kill of docker/0123abcd4567" (which escalation is possible)."""
        kinds = [("v2 cgroup.kill" if (d / "cgroup.kill").exists() else "v2 freeze") if key == "" else f"v1 {key}"
                 for key, d in self.dirs.items() if key in ("", "freezer")]
        if not kinds:
            return "none found"
        return f"{' + '.join(sorted(kinds))} of {self.kill_dirs[0].parent.name}/{self.kill_dirs[0].name[:12]}"


class Leader:
    """The container's init, watched from the host through a pidfd (no pid-reuse race, and poll()
    wakes on its exit); where pidfds or the pid are unavailable, nothing is known (never 'gone')."""

    def __init__(self, pid: int):
        self.fd: int | None = None
        if pid > 0:
            try:
                self.fd = os.pidfd_open(pid)
            except (OSError, AttributeError):
                self.fd = None

    def gone(self, timeout_s: float = 0.0) -> bool:
        if self.fd is None:
            return False
        return bool(select.select([self.fd], [], [], timeout_s)[0])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _wait_empty(container, cgroups: ContainerCgroups, leader: Leader, timeout_s: float) -> bool:
    """True once every process of the container is gone: by its cgroups, else by its init, else (a
    daemon on another host) by the daemon's word."""
    deadline = time.monotonic() + timeout_s
    dirs = list(cgroups.dirs.values())
    if not dirs and leader.fd is None:
        return call_with_deadline(lambda: container.wait(timeout=timeout_s), timeout_s + 1)[1] is None
    while True:
        if (not procs(dirs)) if dirs else leader.gone():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def stop_container(container, cgroups: ContainerCgroups, leader: Leader) -> str:
    """Kill the container and make sure it is dead. Returns "" when `docker kill` did it, else what
    failed and what was done about it (for the outcome's detail and provenance)."""
    _, error = call_with_deadline(container.kill, KILL_CALL_S)
    if error is not None and ("is not running" in error or "No such container" in error):
        return ""  # it stopped by itself meanwhile (or never started)
    if error is None:
        if _wait_empty(container, cgroups, leader, EXIT_WAIT_S):
            return ""
        failure = f"the container still ran {EXIT_WAIT_S:g} s after docker kill"
    else:
        failure = f"docker kill failed ({error})"
    if not cgroups.kill_dirs:
        return f"{failure}; no cgroup of the container found to escalate to"
    freeze_kill(cgroups.kill_dirs)  # waits until they are empty (or cgroup.KILL_WAIT_S)
    dead = _wait_empty(container, cgroups, leader, 2.0)
    return (f"{failure}; escalated: killed through its cgroup ({cgroups.describe()})"
            + ("" if dead else "; some processes still remain"))
