"""The candidate travels with its task: no node opens the controller's files.

On the controller, `ship(spec)` packs the source a run needs (a commit's tree, or the target's
base: its repo at base_ref, or a snapshot of its folder) as tar bytes and puts them in Ray's
object store once per tree id; the spec then carries `(tree id, object ref)` instead of a path.
A target with a `data.prepare` step also gets its frozen base shipped, for the node to prepare
its own data from. The values of `run.passthrough_env` are read here too, on the controller.

On a worker, `unship` extracts the source into the run's workdir from a per-node cache,
`cache_dir()/sources/<tree id>.tar` (written once, atomically; a tree id names its content, so
a cached archive is never stale), fetching the bytes from the object store only on a miss.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import threading
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import git

from env.data import data_key, uses_key
from env.provenance import code_version, ray_node
from env.workspace import SKIP, is_git
from search_space.target import Target, cache_dir

if TYPE_CHECKING:
    from env.evaluate import RunSpec

Source = tuple[str, Any]  # (tree id, ObjectRef of the tar bytes)
DataSource = tuple[str, Any, str]  # the same, plus the target folder's place inside it ("" for its top)
_SAFE_ID = re.compile(r"^[A-Za-z0-9-]{8,80}$")

# Controller side: (Ray job, tree id) -> ObjectRef. Keeping the ref keeps the object alive for the
# job; the job is in the key because a ref does not outlive the ray.init that made it.
# At most KEEP refs are held: an older one is dropped (a task still waiting holds its own reference,
# Ray counts it), and shipped again should it be asked for.
KEEP = 512
_shipped: dict[tuple[str, str], Any] = {}
_folders: dict[tuple[str, tuple], tuple[str, bytes]] = {}  # folder snapshots by their files' stat
_lock = threading.Lock()
_trees: dict[tuple[str, str], str] = {}  # (repo, commit) -> tree id: a commit never changes


def _tree_id(repo_path: Path, commit: str) -> str:
    key = (str(repo_path), commit)
    if key in _trees:  # opening a repo starts git processes: ~10 ms a submit otherwise
        return _trees[key]
    with git.Repo(repo_path) as repo:
        tree = repo.commit(commit).tree.hexsha
    if re.fullmatch(r"[0-9a-f]{40}", commit):  # a name (HEAD, a branch) may move: looked up each time
        _trees[key] = tree
    return tree


def _tar_commit(repo_path: Path, commit: str) -> bytes:
    buf = io.BytesIO()
    with git.Repo(repo_path) as repo:
        repo.archive(buf, commit, format="tar")
    return buf.getvalue()


def _walk(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP)
        here = Path(dirpath)
        out += [here / d for d in dirnames if (here / d).is_symlink()]  # links to folders: kept as links
        out += [here / f for f in sorted(filenames) if f not in SKIP]
    return sorted(out)


def _tar_folder(folder: Path, files: list[Path]) -> bytes:
    """A tar of the files, the same bytes for the same content (no times, owners)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(folder)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def pack_folder(folder: Path) -> tuple[str, bytes]:
    """A snapshot of a plain folder: its id is the hash of its content."""
    folder = Path(folder).resolve()
    files = _walk(folder)
    stat = tuple((str(p), p.lstat().st_size, p.lstat().st_mtime_ns) for p in files)
    key = (str(folder), stat)
    if key not in _folders:
        data = _tar_folder(folder, files)
        _folders.clear()  # only the latest snapshot of each folder matters; keep memory flat
        _folders[key] = ("dir-" + hashlib.sha256(data).hexdigest()[:40], data)
    return _folders[key]


def _put(tree_id: str, data: Any) -> Source:
    """Put the bytes once per tree id and Ray job; `data` is the bytes or a callable making them
    (called only when this tree was not shipped yet)."""
    import ray

    key = (ray.get_runtime_context().get_job_id(), tree_id)
    with _lock:
        ref = _shipped.get(key)
        if ref is None:
            ref = _shipped[key] = ray.put(data() if callable(data) else data)
            while len(_shipped) > KEEP:
                _shipped.pop(next(iter(_shipped)))
    return tree_id, ref


def commit_source(repo_path: Path, commit: str) -> Source:
    return _put(_tree_id(repo_path, commit), lambda: _tar_commit(repo_path, commit))


def base_source(target: Target) -> Source:
    """The target's base: its repo at base_ref, or a snapshot of its folder when it is no git repo."""
    if is_git(target.repo):
        return commit_source(target.repo, target.base_ref)
    return _put(*pack_folder(target.repo))


_roots: dict[str, str] = {}  # a search repo's base commit (its history's one root), by repo path


def _root_commit(repo_path: Path, commit: str) -> str:
    key = str(repo_path)
    if key not in _roots:
        with git.Repo(repo_path) as repo:
            _roots[key] = repo.git.rev_list("--max-parents=0", commit).split()[0]
    return _roots[key]


def data_source(target: Target, repo: Path | None = None, commit: str | None = None) -> DataSource | None:
    """What a node needs to run `data.prepare`: the target's folder (where the command runs) as the
    base has it. Inside the repo, the base itself (for a candidate of a search, its history's root:
    the base as the search snapshotted it); a target folder outside its repo is snapshotted."""
    if target.data_prepare is None:
        return None
    root, target_repo = Path(target.root).resolve(), Path(target.repo).resolve()
    if root.is_relative_to(target_repo):
        tree_id, ref = commit_source(repo, _root_commit(repo, commit)) if repo and commit else base_source(target)
        return tree_id, ref, str(root.relative_to(target_repo))
    tree_id, ref = _put(*pack_folder(root))
    return tree_id, ref, ""


def passthrough_values(target: Target) -> tuple[tuple[str, str], ...]:
    """`run.passthrough_env`, read here (the controller): a worker's own environment is not the user's."""
    return tuple((k, os.environ[k]) for k in target.passthrough_env if k in os.environ)


def ship(spec: RunSpec) -> RunSpec:
    """The spec a Ray task gets: its source by value (in the object store), no controller path to
    open, the passthrough environment and the code version as the controller has them."""
    if spec.source is not None:
        return spec
    target = spec.target
    source = commit_source(spec.repo or target.repo, spec.commit) if spec.commit else base_source(target)
    history = (spec.repo, spec.commit) if spec.repo and spec.commit else (None, None)  # a search's candidate
    given = dict(spec.env)
    env = spec.env + tuple((k, v) for k, v in passthrough_values(target) if k not in given)
    # The worker's copy of the target names no passthrough variable: their values travel in `env`,
    # so evaluate() never reads them from the worker's environment.
    return replace(spec, target=replace(target, passthrough_env=()), repo=None, source=source,
                   data_source=data_source(target, *history), env=env,
                   data_key=spec.data_key or (data_key() if uses_key(target) else ""),
                   code_version=spec.code_version or code_version(), origin_node=ray_node())


def run_root_here(spec: RunSpec, run_root: str) -> str:
    """Where this node keeps the run's folder: the pool's (the controller's path) on the controller's
    node, this node's cache elsewhere (the controller's folder may not exist here, or not be writable)."""
    if not spec.origin_node or spec.origin_node == ray_node():
        return run_root
    return str(cache_dir() / "runs")


def _cached(tree_id: str, ref: Any) -> Path:
    """This node's copy of the archive, fetched from the object store the first time."""
    if not _SAFE_ID.match(tree_id):
        raise ValueError(f"source id {tree_id!r}: not a tree id")
    folder = cache_dir() / "sources"
    path = folder / f"{tree_id}.tar"
    if path.is_file():
        return path
    import ray

    data = ray.get(ref)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{tree_id}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see the whole archive or none
    finally:
        tmp.unlink(missing_ok=True)
    return path


def unship(source: Source, dest: Path) -> None:
    """Extract a shipped source into the folder `dest` (made if missing)."""
    path = _cached(*source)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path) as tar:
        tar.extractall(dest, filter="data")


def prepare_folder(source: DataSource):
    """For env/data.py: a function that extracts the shipped base into a scratch folder and returns
    the folder `data.prepare` runs in."""
    tree_id, ref, sub = source

    def materialise(scratch: Path) -> Path:
        unship((tree_id, ref), scratch)
        return scratch / sub if sub else scratch

    return materialise
