"""A target's data folder: prepared once (by the target's own frozen script), then read-only."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from search_space.target import Target


class DataError(RuntimeError):
    pass


_READY: set[Path] = set()  # folders this process has seen prepared


def ensure_data(target: Target) -> Path | None:
    """Run the target's `data.prepare` when its folder is missing (under a lock); returns the folder a
    run sees as `{data}`: `data.mount` inside it where the target sets one (the rest, e.g. a held-out
    split, stays outside the run).

    A prepare step writes its folder whole (into a temporary name, then renamed), so a folder that
    exists is complete and is never prepared again.
    """
    path = target.data_path
    if path is None:
        return None
    root = _prepared(target, path)
    if not target.data_mount:
        return root
    if not (root / target.data_mount).is_dir():
        raise DataError(f"data.mount: {root / target.data_mount} is not a folder (an older data version?)")
    return root / target.data_mount


def hidden_paths(target: Target) -> tuple[Path, ...]:
    """What a training run must not see: every entry of the data folder outside its mount."""
    if target.data_path is None or not target.data_mount or not target.data_path.is_dir():
        return ()
    return tuple(sorted(p for p in target.data_path.iterdir() if p.name != target.data_mount))


def _prepared(target: Target, path: Path) -> Path:
    if path in _READY:
        return path
    if target.data_prepare is None:
        if not path.exists():
            raise DataError(f"data.path {path} does not exist and the target has no data.prepare")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_dir():
            _READY.add(path)
            return path
        command = target.data_prepare.format(data=str(path))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.run(command, shell=True, cwd=target.root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DataError(f"data.prepare failed ({command}): {(proc.stdout + proc.stderr)[-2000:]}")
        if not path.is_dir():
            raise DataError(f"data.prepare ({command}) succeeded but did not write {path}")
    _READY.add(path)
    return path
