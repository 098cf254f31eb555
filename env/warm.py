"""Warm slots: the next run's sandbox and interpreter start while the current run trains.

A run's start-up (workspace volume, cgroups, namespaces, the interpreter and its site imports,
optionally heavy imports such as torch) takes ~0.1 s to seconds, and without this a worker's slot
pays it between runs. A warm slot is that start-up done ahead for a run not yet known: a fresh
sandbox around `python -c STUB`, where STUB prints a token and waits for one line on stdin. The
line says which script to run, with which argv, environment and working directory; STUB then
runs it as `python script args` would.

Trust: the slot has never run candidate code when its run starts (STUB imports only the standard
library and the target's `warm_imports`, and initialises no GPU); each slot serves exactly one run
and dies with it. Slots are separate sandboxes, so a run cannot reach the slot waiting next to it.

Only commands of the form `python[3] script.py args` (no shell syntax) are eligible; anything else
starts cold. The slot's workspace is a volume mounted at a folder of its own; at start it is also
bind-mounted at the run's workdir, so the host reads the run's files where it always did, while
the run sees its working directory at the slot's folder.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from env.sandbox import SandboxRequest
from env.volume import bind_mount, unmount

STUB = """
import json, os, sys
for _name in {imports!r}:
    __import__(_name)
sys.stdout.write({token!r} + "\\n"); sys.stdout.flush()
_line = sys.stdin.readline()
if not _line:
    sys.exit(0)  # never used: the caller went away
_go = json.loads(_line)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
os.environ.clear()
os.environ.update(_go["env"])
os.chdir(_go["cwd"])
sys.argv = _go["argv"]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
import runpy
runpy.run_path(_go["argv"][0], run_name="__main__")
"""
SHELL_SYNTAX = re.compile(r"[$`;&|<>(){}*?\[\]~!#\\\n]")
PYTHON = re.compile(r"(.*/)?python3?(\.\d+)?")


def python_script(command: str) -> tuple[str, list[str]] | None:
    """(interpreter, [script, *args]) when `command` is a plain `python script args`, else None."""
    if SHELL_SYNTAX.search(command):
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if len(words) < 2 or not PYTHON.fullmatch(words[0]) or words[1].startswith("-"):
        return None
    return words[0], words[1:]


def slot_key(request: SandboxRequest, interpreter: str, isolated: bool) -> tuple:
    """What must be equal between the request a slot was started for and the one it serves: all
    that is fixed once the sandbox exists (binds, limits, cgroups, the interpreter)."""
    # Which GPUs is not fixed: CUDA_VISIBLE_DEVICES is set at the go, before anything initialises CUDA.
    limits = replace(request.limits, gpu_ids=())
    gpus = bool(request.limits.gpu_ids) or bool(request.env.get("CUDA_VISIBLE_DEVICES"))
    # Whether the run writes the shared compile cache is fixed too: a base run's slot has the shared
    # folder bound writable and no overlay, a candidate's the overlay only. Without it in the key a
    # candidate took a base's slot and compiled cold into an empty folder (issue #11: the first
    # candidate after the base's runs), and could have written the shared cache.
    return (interpreter, request.data, request.cache_dir, bool(request.cache_write), tuple(request.hide), limits,
            gpus, tuple(request.warm_imports), isolated)


@dataclass
class Slot:
    """A started sandbox waiting for its run; `proc` holds its stdin (the go line) and stdout."""

    key: tuple
    proc: subprocess.Popen
    cgroup: object  # env.cgroup.RunCgroup
    volume: object  # env.volume.Volume, mounted at `folder`
    folder: Path
    token: bytes
    ready: threading.Event
    failed: str = ""
    relaunch: Callable[[], subprocess.Popen] | None = None  # starts `proc` again in the same folder and cgroups
    discarded: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def launch_again(self) -> bool:
        """Replace a process that died in its set-up with a new one; False once discarded."""
        with self.lock:
            if self.discarded or self.relaunch is None:
                return False
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
            self.proc = self.relaunch()
            return True

    def wait_ready(self, timeout_s: float) -> bool:
        return self.ready.wait(timeout_s) and not self.failed

    def go(self, argv: list[str], env: dict[str, str]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "cwd": str(self.folder)}).encode() + b"\n")
        self.proc.stdin.close()

    def discard(self) -> None:
        """Kill the unused slot and free its cgroups and volume."""
        with self.lock:
            self.discarded = True
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        self.cgroup.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.cgroup.close()
        self.volume.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class BoundVolume:
    """The slot's volume, also bind-mounted at the run's workdir: what `Workspaces` keeps for that
    workdir. Closing it unmounts both and deletes the image."""

    def __init__(self, path: Path, inner, folder: Path):
        self.path, self.inner, self.folder = Path(path), inner, folder
        self.size_mb, self.kind = inner.size_mb, inner.kind
        bind_mount(folder, self.path)
        self.mounted = True

    @property
    def capped(self) -> bool:
        return self.mounted

    def full(self) -> bool:
        return self.inner.full()

    def close(self) -> None:
        if self.mounted:
            unmount(self.path)
            self.mounted = False
        self.inner.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def new_folder(root: Path) -> Path:
    folder = Path(root) / ".warm" / f"w-{uuid.uuid4().hex[:10]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.parent.chmod(0o700)  # private: the sandbox hides the other slots (other runs' workspaces) from each run
    return folder


def stub_source(imports: tuple[str, ...], token: str) -> str:
    return STUB.format(imports=tuple(imports), token=token)
