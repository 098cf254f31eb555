"""A run dies with its worker: a small watcher process per sandboxing process (a Ray worker, the CLI).

Killing a Ray worker with -9 runs none of its cleanup. What it started would live on: a silent
trainer indefinitely, on a GPU node holding the GPU, and its workspace's loop mount with it. Three
things end it instead:
- each run's leader gets a parent-death signal (`setpriv --pdeathsig KILL`, before bwrap or the
  plain shell; bwrap's own --die-with-parent then takes the run's pid namespace down with it);
- the guardian: started once per process, in its own session, reading a pipe only its owner holds
  open. When the owner dies the kernel closes the pipe; the guardian then kills the owner's run
  cgroups (which hold every process a run made, double-forked ones included), the process groups
  and containers it was told about, and, once the owner is gone, unmounts the owner's volumes;
- `reap_orphans` (env/cgroup.py, env/volume.py) in the next sandboxing process, for what is left.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

WAIT_OWNER_S = 30.0  # a dead owner's pid stays until its parent reaps it; its volumes are freed after


def pdeath_argv() -> list[str]:
    """The words that give the next program in an argv a SIGKILL when its parent thread dies."""
    tool = shutil.which("setpriv")
    return [tool, "--pdeathsig", "KILL", "--"] if tool else []


class Guardian:
    def __init__(self) -> None:
        read, self._write = os.pipe()  # both non-inheritable: no run can hold the owner's end open
        self._lock = threading.Lock()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "env.guardian", str(os.getpid())], stdin=read,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            os.close(read)

    def _say(self, line: str) -> None:
        with self._lock:
            try:
                os.write(self._write, (line + "\n").encode())
            except OSError:  # the guardian died: the cgroups' reaper in the next process remains
                pass

    def watch(self, kind: str, ident: str | int) -> None:
        """kind "pg": a run's process group (its leader's pid); "ct": a container's id."""
        self._say(f"+{kind} {ident}")

    def unwatch(self, kind: str, ident: str | int) -> None:
        self._say(f"-{kind} {ident}")


@functools.cache
def guardian() -> Guardian | None:
    try:
        return Guardian()
    except OSError:
        return None


def _end(owner: int, groups: set[int], containers: set[str]) -> None:
    """The owner is dead: end everything its runs left."""
    from env.cgroup import reap_orphans as reap_cgroups
    from env.volume import reap_orphans as reap_volumes

    if os.geteuid() == 0:
        reap_cgroups(owner)
    for pg in groups:
        try:
            os.killpg(pg, signal.SIGKILL)
        except OSError:
            pass
    if containers:
        _remove(containers)
    deadline = time.monotonic() + WAIT_OWNER_S
    while os.path.exists(f"/proc/{owner}") and time.monotonic() < deadline:
        time.sleep(0.2)
    if os.geteuid() == 0:
        reap_volumes()


def _remove(containers: set[str]) -> None:
    """Force-remove the containers (their processes die with them), through the daemon's API."""
    try:
        from env.docker_sandbox import docker_client

        client = docker_client()
    except Exception:
        return
    for ct in containers:
        try:
            client.api.remove_container(ct, force=True)
        except Exception:  # gone already, or the daemon is: the labelled reaper remains
            pass


def main(owner: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the terminal is for the owner
    groups: set[int] = set()
    containers: set[str] = set()
    for raw in sys.stdin.buffer:
        line = raw.decode(errors="replace").strip()
        sign, kind, ident = line[:1], line[1:3], line[4:]
        target = groups if kind == "pg" else containers
        value = int(ident) if kind == "pg" and ident.isdigit() else ident
        if sign == "+":
            target.add(value)  # type: ignore[arg-type]
        elif sign == "-":
            target.discard(value)  # type: ignore[arg-type]
    _end(owner, groups, containers)


if __name__ == "__main__":
    main(int(sys.argv[1]))
