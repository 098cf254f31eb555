"""A target's data folder: prepared once per node (by the target's own frozen script), then read-only.

Its path is resolved where it is used, with that node's cache folder (`{cache}` in `data.path`),
and the prepare step runs from the target's shipped base (env/source.py), never from the
controller's target folder: a node of a cluster has neither the controller's cache nor its files.

The data key (`{key}` in `data.path`): a secret the prepare step gets in its environment
(search_space/targets/language.py draws the built-in targets' corpora from it), so no run can rebuild
the data it is measured on. The controller's key (`keys/data.key` in its cache folder, made on first
use, private) travels with each run spec, so every node prepares the same data; `{key}` in the path
is the key's fingerprint, never the key. The key's folder is hidden from every run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from search_space.cache import KEY_ENV, cache_dir, data_key, keys_dir, resolve_data_path
from search_space.target import Target


class DataError(RuntimeError):
    pass


_READY: set[Path] = set()  # folders this process has seen prepared


def uses_key(target: Target) -> bool:
    return "{key}" in (target.data_template or "")


def data_root(target: Target, key: str = "") -> Path | None:
    """The target's data folder on this node: `data.path` with `{cache}` as this node's cache folder
    and `{key}` as the fingerprint of the data key (`key`, else this machine's own)."""
    template = target.data_template
    if template is None or ("{cache}" not in template and "{key}" not in template):
        return target.data_path  # no per-node part: as resolved when the target was loaded
    return (Path(target.root) / resolve_data_path(template, key)).resolve()


# Extracts the target's frozen base into the scratch folder given and returns where `data.prepare`
# runs inside it (env/source.py `prepare_folder`).
Materialise = Callable[[Path], Path]


def ensure_data(target: Target, base: Materialise | None = None, key: str = "") -> Path | None:
    """Run the target's `data.prepare` when its folder is missing (under a lock); returns the folder a
    run sees as `{data}`: `data.mount` inside it where the target sets one (the rest, e.g. a held-out
    split, stays outside the run).

    A prepare step writes its folder whole (into a temporary name, then renamed), so a folder that
    exists is complete and is never prepared again. `base`: where the prepare step's files come
    from (the shipped base); None runs it in the target's folder (a run of this machine's own).
    `key`: the controller's data key (hex); "" is this machine's own.
    """
    path = data_root(target, key)
    if path is None:
        return None
    root = _prepared(target, path, base, (key or data_key()) if uses_key(target) else "")
    if not target.data_mount:
        return root
    if not (root / target.data_mount).is_dir():
        raise DataError(f"data.mount: {root / target.data_mount} is not a folder (an older data version?)")
    return root / target.data_mount


def hidden_paths(target: Target, key: str = "") -> tuple[Path, ...]:
    """What a training run must not see: the data keys, and every entry of the data folder outside its mount."""
    keys = (keys_dir(),) if keys_dir().is_dir() else ()
    path = data_root(target, key)
    if path is None or not target.data_mount or not path.is_dir():
        return keys
    return keys + tuple(sorted(p for p in path.iterdir() if p.name != target.data_mount))


def _prepared(target: Target, path: Path, base: Materialise | None, key: str) -> Path:
    if path in _READY:
        return path
    if target.data_prepare is None:
        if not path.exists():
            raise DataError(f"data.path {path} does not exist and the target has no data.prepare")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_relative_to(cache_dir().resolve()):
        # Private: the sandbox then covers it and binds back only the run's own mount. Searchable, a run
        # read its neighbours where the cache is not under HOME: another key's data, or tinygpt's
        # 24 MiB of the very language that tinylm-bpb budgets at 128 KiB (tests/test_redteam_data.py).
        path.parent.chmod(0o700)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_dir():
            _READY.add(path)
            return path
        command = target.data_prepare.format(data=str(path))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        if key:
            env[KEY_ENV] = key
        scratch = path.parent / f".{path.name}.prepare-{os.getpid()}"
        try:
            if base is not None:
                shutil.rmtree(scratch, ignore_errors=True)
                try:
                    cwd = base(scratch)
                except Exception as e:  # not the candidate's doing: the run fails with the reason
                    raise DataError(f"data.prepare: the target's base could not be extracted on this node: "
                                    f"{type(e).__name__}: {e}") from e
            else:
                cwd = Path(target.root)
            proc = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if proc.returncode != 0:
            raise DataError(f"data.prepare failed ({command}): {(proc.stdout + proc.stderr)[-2000:]}")
        if not path.is_dir():
            raise DataError(f"data.prepare ({command}) succeeded but did not write {path}")
    _READY.add(path)
    return path
