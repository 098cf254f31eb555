"""Materialise a candidate into a clean run directory; never the user's checkout.

A candidate is a commit of a git repository (the search's own history, or the target's repo), or
the target's base plus a patch file (SEARCH/REPLACE blocks or a unified diff).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import git

from search_space.edits import EditError, apply_edits, looks_like_edits, parse_edits
from search_space.rules import RuleViolation, check_change, check_path
from search_space.target import Target

SKIP = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}


def is_git(path: Path) -> bool:
    return (path / ".git").exists()


def materialise_commit(repo_path: Path, commit: str, dest: Path) -> None:
    """Extract the tree of `commit` into the empty folder `dest` (git archive: no .git inside)."""
    dest.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with git.Repo(repo_path) as repo:
        repo.archive(buf, commit, format="tar")
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        tar.extractall(dest, filter="data")


def materialise_base(target: Target, dest: Path) -> None:
    """The target's base: its repo at base_ref, or a copy of its folder when it is no git repo."""
    if is_git(target.repo):
        materialise_commit(target.repo, target.base_ref, dest)
        return
    shutil.copytree(target.repo, dest, dirs_exist_ok=True, symlinks=True,
                    ignore=lambda _dir, names: [n for n in names if n in SKIP])


_DIFF_PATH = re.compile(r"^(?:\+\+\+|---) (?:[ab]/)?(\S+)", re.M)
_GIT_HEADER = re.compile(r"^diff --git a/(\S+) b/(\S+)", re.M)


def _diff_paths(patch: str) -> set[str]:
    paths = {p for p in _DIFF_PATH.findall(patch) if p != "/dev/null"}
    for a, b in _GIT_HEADER.findall(patch):
        paths |= {a, b}
    return paths


def _read(root: Path, path: str) -> str | None:
    p = root / path
    return p.read_text() if p.is_file() else None


def apply_patch(target: Target, workdir: Path, patch: str) -> list[str]:
    """Apply a patch file's text inside `workdir` after checking it against the target's rules.

    Raises EditError (does not apply) or RuleViolation (forbidden); `workdir` is left untouched then.
    """
    if looks_like_edits(patch):
        edits = parse_edits(patch)
        for e in edits:
            check_path(e.path)
        files = {e.path: t for e in edits if (t := _read(workdir, e.path)) is not None}
        new = apply_edits(files, edits)
        check_change(target, {p: (files[p], t) for p, t in new.items() if t != files[p]})
        for path, text in new.items():
            (workdir / path).write_text(text)
        return sorted(new)
    paths = _diff_paths(patch)
    if not paths:
        raise EditError("the patch is neither SEARCH/REPLACE blocks nor a unified diff")
    for path in paths:
        check_path(path)
    if re.search(r"^(new|old) mode 120000|^new file mode 120000", patch, re.M):
        raise RuleViolation(f"{', '.join(sorted(paths))}: symbolic links may not be added or changed")
    before = {p: _read(workdir, p) for p in paths}
    # A scratch copy takes the patch first, so a failed or forbidden patch leaves workdir as it was.
    scratch = workdir.parent / (workdir.name + ".patch-check")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        for p, text in before.items():
            if text is not None:
                (scratch / p).parent.mkdir(parents=True, exist_ok=True)
                (scratch / p).write_text(text)
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(scratch.parent)}
        proc = subprocess.run(["git", "apply", "--whitespace=nowarn", "-"], cwd=scratch, input=patch,
                              text=True, capture_output=True, env=env)
        if proc.returncode != 0:
            raise EditError(f"the diff does not apply: {proc.stderr.strip()[-800:]}")
        symlinks = tuple(p for p in paths if (scratch / p).is_symlink())
        after = {p: _read(scratch, p) for p in paths}
        check_change(target, {p: (before[p], after[p]) for p in paths if before[p] != after[p]}, symlinks)
        for p, text in after.items():
            if text is None:
                (workdir / p).unlink(missing_ok=True)
            else:
                (workdir / p).parent.mkdir(parents=True, exist_ok=True)
                (workdir / p).write_text(text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return sorted(p for p in paths if before[p] != after[p])
