"""Git plumbing for replays, ablations and exports, with a scratch index so no checkout ever moves.

Two repositories are written here:
- the search's own history (D/repo): ablation variants, each the base plus a subset of a
  candidate's changes, kept under refs/speedsearch/ablate/ so they are never taken for candidates
  (History lists only refs/heads/base and refs/heads/cand/);
- the target's own repository: the export branch, holding the change and the record folder.
Objects are written first and a ref last, so a failure leaves nothing a person would see.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runs_db.history import IDENTITY, SKIP_DIRS, SKIP_SUFFIXES
from search_space.errors import UserError

ABLATE_REFS = "refs/speedsearch/ablate/"


class GitError(UserError):
    """A git step a record needs failed; the message names it."""


def git(repo: Path, *args: str, input: str | bytes | None = None, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run git in `repo` with the speedsearch identity; text in and out unless `input` is bytes."""
    text = not isinstance(input, bytes)
    proc = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True, text=text,
                          env={**os.environ, **IDENTITY, **(env or {})})
    if check and proc.returncode != 0:
        err = proc.stderr if text else proc.stderr.decode("utf-8", "replace")
        raise GitError(f"git {args[0]} in {repo.name}: {' '.join(str(err).split())[:300]}")
    return proc


def out(repo: Path, *args: str, **kw) -> str:
    got = git(repo, *args, **kw).stdout
    return (got.decode("utf-8", "replace") if isinstance(got, bytes) else got).strip()


@contextmanager
def scratch_index(repo: Path, tree: str | None) -> Iterator[dict[str, str]]:
    """An index of its own holding `tree` (empty when None), in a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="speedsearch-index-"))
    env = {"GIT_INDEX_FILE": str(tmp / "index")}
    try:
        git(repo, "read-tree", *([tree] if tree else ["--empty"]), env=env)
        yield env
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tree_of(repo: Path, commit: str) -> str:
    return out(repo, "rev-parse", f"{commit}^{{tree}}")


def add_files(repo: Path, env: dict[str, str], files: dict[str, bytes | str]) -> None:
    """Write `files` (path -> content) as blobs into the scratch index `env`."""
    for path, data in files.items():
        blob = out(repo, "hash-object", "-w", "--stdin", input=data if isinstance(data, bytes) else data.encode())
        git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)


def commit_tree(repo: Path, tree: str, parent: str | None, message: str) -> str:
    return out(repo, "commit-tree", "--no-gpg-sign", tree, *(["-p", parent] if parent else []), "-m", message)


def commit_files(repo: Path, parent: str, files: dict[str, str], message: str) -> str:
    """A commit on `parent` whose tree is parent's with `files` (path -> text) replaced."""
    with scratch_index(repo, parent) as env:
        add_files(repo, env, files)
        tree = out(repo, "write-tree", env=env)
    return commit_tree(repo, tree, parent, message)


def apply_diff(repo: Path, env: dict[str, str], patch: str) -> bool:
    """Apply a unified diff to the scratch index with a three-way merge; False when it does not apply."""
    if not patch.strip():
        return True
    proc = git(repo, "apply", "--cached", "--3way", "--whitespace=nowarn", "-", input=patch, env=env, check=False)
    if proc.returncode != 0:
        return False
    return git(repo, "write-tree", env=env, check=False).returncode == 0  # unmerged entries fail here


def pick(repo: Path, onto: str, steps: list[tuple[str, str]], message: str) -> str | None:
    """`onto` plus the change from each (from, to) commit pair, in order: a new commit, or None when
    one of the changes does not apply without the others.

    A change first goes through a three-way merge; git calls edits to adjacent lines a conflict,
    which two knob-like one-line changes often are, so a change that fails there is tried once more
    without context lines: the lines it removes must still be there, word for word."""
    with scratch_index(repo, onto) as env:
        for frm, to in steps:
            before = out(repo, "write-tree", env=env)
            if apply_diff(repo, env, out_raw(repo, "diff", "--no-color", "--no-ext-diff", "--binary", frm, to)):
                continue
            git(repo, "read-tree", before, env=env)
            bare = out_raw(repo, "diff", "--no-color", "--no-ext-diff", "-U0", frm, to)
            if not bare.strip() or "\n@@ " not in "\n" + bare or _pure_insertion(bare):
                return None
            proc = git(repo, "apply", "--cached", "--unidiff-zero", "--whitespace=nowarn", "-", input=bare, env=env,
                       check=False)
            if proc.returncode != 0:
                return None
        tree = out(repo, "write-tree", env=env)
    return commit_tree(repo, tree, onto, message)


def _pure_insertion(patch: str) -> bool:
    """A hunk that only adds lines has nothing to anchor it without context: not applied blind."""
    hunks = patch.split("\n@@ ")[1:]
    return any(not any(ln.startswith("-") for ln in h.splitlines()[1:]) for h in hunks)


def out_raw(repo: Path, *args: str) -> str:
    """stdout as is (a patch needs its last newline)."""
    return git(repo, *args).stdout


def keep(repo: Path, ref: str, commit: str) -> None:
    """Keep `commit` reachable (and out of the candidate list) under `ref`."""
    git(repo, "update-ref", ref, commit)


# -- the target's repository -------------------------------------------------------------------


def is_repo(path: Path) -> bool:
    return (Path(path) / ".git").exists()


def has_ref(repo: Path, ref: str) -> bool:
    return git(repo, "rev-parse", "--verify", "--quiet", ref, check=False).returncode == 0


def path_in_tree(repo: Path, commit: str, path: str) -> bool:
    return bool(out(repo, "ls-tree", "--name-only", commit, "--", path))


def init_repo(path: Path, files: dict[str, bytes] | None = None, message: str = "Base") -> str:
    """A new repository at `path` (made if missing) whose first commit on `main` holds `files`, or,
    when None, the folder's own files as they are. Returns the commit."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "--initial-branch=main")
    if files is None:  # the folder's files, minus what a snapshot of it leaves out (caches)
        exclude = path / ".git" / "info" / "exclude"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text("".join(f"{d}/\n" for d in sorted(SKIP_DIRS - {".git"}))
                           + "".join(f"*{x}\n" for x in SKIP_SUFFIXES))
        git(path, "add", "-A")
        tree = out(path, "write-tree")
    else:
        with scratch_index(path, None) as env:
            add_files(path, env, files)
            tree = out(path, "write-tree", env=env)
    commit = commit_tree(path, tree, None, message)
    git(path, "update-ref", "refs/heads/main", commit)
    if files is not None:  # a fresh folder: show the files too
        git(path, "reset", "-q", "--hard", "main")
    return commit


def remote_reachable(repo: Path | None, remote: str) -> str | None:
    """None when `remote` (a remote's name, or a URL or path) answers, else the reason in one line."""
    where = repo if repo is not None and is_repo(repo) else Path(tempfile.gettempdir())
    proc = git(where, "ls-remote", "--heads", remote, check=False)
    return None if proc.returncode == 0 else " ".join(proc.stderr.split())[:200] or "no answer"


def remote_has(repo: Path | None, remote: str, branch: str) -> bool:
    where = repo if repo is not None and is_repo(repo) else Path(tempfile.gettempdir())
    return bool(out(where, "ls-remote", "--heads", remote, f"refs/heads/{branch}"))


def branch_with(repo: Path, base: str, patch: str, files: dict[str, bytes | str], message: str, branch: str) -> str:
    """Branch `branch` at a new commit on `base`: the change `patch` plus `files`. The ref is written last."""
    with scratch_index(repo, base) as env:
        if not apply_diff(repo, env, patch):
            raise GitError(f"the change does not apply to {repo.name} at {base[:12]}")
        add_files(repo, env, files)
        tree = out(repo, "write-tree", env=env)
    commit = commit_tree(repo, tree, base, message)
    git(repo, "update-ref", f"refs/heads/{branch}", commit, "0" * 40)  # refuses if it appeared meanwhile
    return commit


def push(repo: Path, remote: str, branch: str) -> None:
    git(repo, "push", "-q", remote, f"refs/heads/{branch}:refs/heads/{branch}")
