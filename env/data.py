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


def ensure_data(target: Target) -> Path | None:
    """Run the target's `data.prepare` once (under a lock); returns the data folder or None."""
    path = target.data_path
    if path is None:
        return None
    if target.data_prepare is None:
        if not path.exists():
            raise DataError(f"data.path {path} does not exist and the target has no data.prepare")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        command = target.data_prepare.format(data=str(path))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.run(command, shell=True, cwd=target.root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DataError(f"data.prepare failed ({command}): {(proc.stdout + proc.stderr)[-2000:]}")
    return path
