"""The run's view of the machine: bubblewrap namespaces and an unprivileged uid.

Inside, the run is uid/gid 65534 (nobody) with no capabilities and no way to gain any
(no_new_privs); it has its own pid namespace (it sees only its own processes, so it can neither
signal its caller nor read /proc/<ancestor>/environ), its own network namespace (a loopback of its
own: the host's localhost services are out of reach), its own IPC and UTS namespaces, and its own
mount namespace where:
- / is read-only, /proc is fresh, /dev is minimal (plus the NVIDIA device nodes when the run is
  given GPUs), /tmp and /dev/shm are private tmpfs;
- the workspace is the only writable place (new files only: what it was given stays read-only), with
  the compile-cache folder;
- the data folder is bound read-only; `hide` paths are covered by an empty tmpfs;
- the caller's HOME is covered by an empty tmpfs (its caches and credentials), and so is every
  folder the caller keeps to itself (not searchable by others) on the way to a bound path; only the
  Python installation and the bound paths are put back.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUN_UID = RUN_GID = 65534
CACHE_LAYERS = "cache-layers"  # a run's overlay upper and work folders, in its scratch


def _tool(name: str) -> str:
    """An absolute path: the run's own PATH (an allow-list) need not hold the caller's tools."""
    return shutil.which(name) or name


def _setpriv() -> list[str]:
    return [_tool("setpriv"), f"--reuid={RUN_UID}", f"--regid={RUN_GID}", "--clear-groups", "--no-new-privs",
            "--bounding-set=-all", "--inh-caps=-all", "--"]


def _base_argv(gpus: bool = False) -> list[str]:
    argv = [_tool("bwrap"), "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    # A run given GPUs gets the driver's nodes (nvidia0.., nvidiactl, nvidia-uvm, nvidia-caps/);
    # CUDA_VISIBLE_DEVICES picks its GPUs among them. A run given none sees no GPU at all.
    for node in sorted(glob.glob("/dev/nvidia*")) if gpus else ():
        argv += ["--dev-bind", node, node]
    argv += ["--perms", "1777", "--tmpfs", "/dev/shm", "--perms", "1777", "--tmpfs", "/tmp",
             "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session"]
    return argv


def namespace_support() -> str:
    """One line for the provenance: what the run gets, or "none (why)" where bwrap cannot run.
    Only an answer that holds for good is kept (bwrap works, or cannot work here); a failed probe
    is tried again at the next run, so a passing fault never leaves a process running uncontained."""
    global _SUPPORT
    if _SUPPORT is None:
        answer, final = _probe()
        if not final:
            return answer
        _SUPPORT = answer
    return _SUPPORT


_SUPPORT: str | None = None


def _probe() -> tuple[str, bool]:
    if os.geteuid() != 0:
        return "none (not root: cannot switch to an unprivileged uid)", True
    missing = [tool for tool in ("bwrap", "setpriv") if shutil.which(tool) is None]
    if missing:
        return f"none ({' and '.join(missing)} missing: apt packages bubblewrap, util-linux)", True
    works = f"bwrap: uid {RUN_UID}, own pid/net/ipc/uts/mount namespaces, read-only root"
    for attempt in range(3):
        try:
            proc = subprocess.run([*_base_argv(), "--", *_setpriv(), "/bin/sh", "-c", "id -u"],
                                  capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"none (bwrap failed: {e})", True
        if proc.returncode == 0 and proc.stdout.strip() == str(RUN_UID):
            return works, True
        problem = (proc.stderr or proc.stdout).strip()[-200:]
        if not _passing(problem):
            return f"none (bwrap failed: {problem})", True
        time.sleep(0.05 * (attempt + 1))
    # Only passing faults: bwrap works here. Not kept, and the run itself retries (then fails
    # closed, with bwrap's error in its log, rather than run uncontained).
    return works, False


def _passing(problem: str) -> bool:
    """bwrap's failure when a mount point vanished while it copied the mount table (another run's
    workspace being removed): it passes."""
    return "Unable to apply mount flags" in problem or "Can't bind mount /oldroot/" in problem


def _searchable_by_others(path: Path) -> bool:
    try:
        return bool(os.stat(path).st_mode & 0o001)
    except OSError:
        return True  # missing: nothing to hide there


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _python_paths() -> list[Path]:
    """The interpreter's installation and import path: the run's `python` must keep working when
    it lives in a covered folder (pyenv under /root, a virtualenv in HOME)."""
    paths = {Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths |= {Path(p) for p in sys.path if p and os.path.isdir(p)}
    return sorted(paths)


def _masks(binds: list[Path]) -> list[Path]:
    """Folders to cover with an empty tmpfs: the caller's HOME, /tmp, and the first folder on the way
    to each bound path that others may not search (the run, as nobody, could not reach the bound
    path through it; covered, the path is rebuilt in the tmpfs with only what is bound)."""
    masks = [Path("/tmp")]
    home = Path(os.path.expanduser("~")).resolve()
    if home != Path("/") and home.is_dir():
        masks.append(home)
    for path in binds:
        for ancestor in reversed(path.parents):
            if _under(ancestor, masks):
                break
            if ancestor != Path("/") and not _searchable_by_others(ancestor):
                masks.append(ancestor)
                break
    return masks


def bwrap_argv(workdir: Path, data: Path | None, cache_dir: Path | None, hide: tuple[Path, ...],
               command: list[str], gpus: bool = False) -> list[str]:
    """The argv that runs `command` (as nobody) in the namespaces above, in `workdir`."""
    workdir = workdir.resolve()
    writable = [workdir] + ([cache_dir.resolve()] if cache_dir is not None else [])
    readonly = [data.resolve()] if data is not None else []
    masks = _masks(writable + readonly)
    # The Python installation goes back where it was covered (only there: elsewhere / shows it).
    private = [m for m in masks if m != Path("/tmp")]
    readonly += [p for p in _python_paths() if _under(p, private)]
    argv = _base_argv(gpus)
    for mask in sorted(p for p in masks if p != Path("/tmp")):
        argv += ["--tmpfs", str(mask)]
    # The folders on the way to a bound path inside a covering tmpfs: searchable by the run (bwrap
    # would make them 0700, and nobody could not reach the bound path).
    between = {a for p in readonly + writable for a in p.parents if _under(a, masks) and a not in masks}
    for folder in sorted(between, key=lambda a: len(a.parts)):
        argv += ["--perms", "0755", "--dir", str(folder)]
    # Shallow before deep, so a bind inside another bound folder lands on top of it.
    binds = [("--ro-bind", p) for p in readonly] + [("--bind", p) for p in writable]
    for flag, path in sorted(binds, key=lambda b: len(b[1].parts)):
        argv += [flag, str(path), str(path)]
    for path in hide:
        path = Path(path).resolve()
        if not path.exists():
            continue  # nothing to hide (and no mount point to cover on a read-only root)
        if path.is_file():
            argv += ["--ro-bind", "/dev/null", str(path)]
        else:
            argv += ["--tmpfs", str(path)]
    argv += ["--chdir", str(workdir), "--", *_setpriv(), *command]
    return argv


def open_for_run(workdir: Path) -> None:
    """Let the run add files anywhere in its workspace, but not change, replace or delete the files
    it was given (the frozen code among them: frozen paths are enforced at run time, not only checked
    as text before it): every folder becomes world-writable and sticky, like /tmp, and the given
    files stay the caller's, read-only to the run."""
    for root, dirs, _ in os.walk(workdir):
        os.chmod(root, 0o1777)
        # not into a compile-cache overlay (env/cache_layer.py): the shared layer below stays as it is
        dirs[:] = [d for d in dirs if d != CACHE_LAYERS and not os.path.ismount(os.path.join(root, d))]


def chown_for_run(path: Path) -> None:
    """Hand a folder (and what it holds) to the run's uid, so the run can write there."""
    os.chown(path, RUN_UID, RUN_GID)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                os.chown(os.path.join(root, name), RUN_UID, RUN_GID, follow_symlinks=False)
            except OSError:
                pass
