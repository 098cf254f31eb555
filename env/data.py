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
    """Run the target's `data.prepare` when its folder is missing (under a lock); returns the folder.

    A prepare step writes its folder whole (into a temporary name, then renamed), so a folder that
    exists is complete and is never prepared again.
    """
    path = target.data_path
    if path is None or path in _READY:
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
