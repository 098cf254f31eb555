"""History: every candidate is a git commit in D/repo, the target's base tree is the root.

Commits are built with plumbing (blobs, a throwaway index, write-tree, commit-tree) so the
working tree of D/repo never moves and a candidate is never half-written. Identical trees are
the same candidate: a change that lands on a tree some candidate already has returns that
candidate's commit instead of a new one.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import git

BASE_BRANCH = "base"
CAND_PREFIX = "cand/"
EXPORT_PREFIX = "export/"
NOTES_REF = "speedsearch"  # refs/notes/speedsearch: `git log --notes=speedsearch`
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
IDENTITY = {
    "GIT_AUTHOR_NAME": "speedsearch",
    "GIT_AUTHOR_EMAIL": "speedsearch@localhost",
    "GIT_COMMITTER_NAME": "speedsearch",
    "GIT_COMMITTER_EMAIL": "speedsearch@localhost",
}
# Caches and VCS folders are not part of a trainer's source.
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints"}
SKIP_SUFFIXES = (".pyc", ".pyo")


class Candidate(NamedTuple):
    """A candidate commit as its git record tells it."""

    commit: str
    parent: str
    title: str
    proposer: str


class HistoryError(ValueError):
    """A commit, path or branch the history cannot use; the message says which."""


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "candidate"


def snapshot(source: Path, ref: str = "HEAD") -> tuple[dict[str, tuple[bytes, bool]], str | None]:
    """The target's trainer files, path -> (bytes, executable), and the source commit if any.

    A git repo gives its tracked files at `ref` (never the dirty working tree); a plain folder
    gives its files, minus caches.
    """
    source = Path(source)
    out: dict[str, tuple[bytes, bool]] = {}
    if (source / ".git").exists():
        with git.Repo(source) as src:
            try:
                commit = src.commit(ref)
            except (git.BadName, ValueError) as e:
                raise HistoryError(f"base_ref {ref!r} is not a commit of {source}: {e}") from None
            for item in commit.tree.traverse():
                if item.type == "blob" and item.mode != 0o120000:  # links are not trainer code
                    out[item.path] = (item.data_stream.read(), bool(item.mode & 0o111))
            return out, commit.hexsha
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(SKIP_SUFFIXES) or path.is_symlink() or not path.is_file():
                continue
            out[path.relative_to(source).as_posix()] = (path.read_bytes(), os.access(path, os.X_OK))
    return out, None


class History:
    """A candidate tree in D/repo. Open it with `History(path)`; `close()` ends git's helpers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.repo = git.Repo(self.path)
        self._trees: dict[str, str] | None = None  # tree -> candidate commit; only this process writes refs
        self._cand_count: int | None = None
        self._base: str | None = None
        self._notes: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._notes_error: str | None = None
        self._notes_thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, files: dict[str, tuple[bytes, bool]], message: str) -> History:
        """A new repo whose root commit on branch `base` holds `files`."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise HistoryError(f"{path}: exists and is not empty")
        git.Repo.init(path, initial_branch=BASE_BRANCH).close()
        hist = cls(path)
        try:
            with hist.repo.config_writer() as cw:
                cw.set_value("user", "name", IDENTITY["GIT_AUTHOR_NAME"])
                cw.set_value("user", "email", IDENTITY["GIT_AUTHOR_EMAIL"])
                cw.set_value("notes", "displayRef", f"refs/notes/{NOTES_REF}")
            blobs = {p: (hist._blob(data), "100755" if ex else "100644") for p, (data, ex) in files.items()}
            tree = hist._write_tree(None, {p: (sha, mode) for p, (sha, mode) in blobs.items()})
            commit = hist._git("commit_tree", "--no-gpg-sign", tree, "-m", message)
            hist._git("update_ref", f"refs/heads/{BASE_BRANCH}", commit)
            hist._git("reset", "--hard", "-q", BASE_BRANCH)  # a browsable checkout of the base
        except BaseException:
            hist.close()
            raise
        return hist

    def close(self) -> None:
        self.flush_notes()
        if self._notes_thread is not None:
            self._notes.put(None)
            self._notes_thread.join(timeout=30)
            self._notes_thread = None
        self.repo.close()  # ends the persistent `git cat-file` helpers GitPython started

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------

    @property
    def base_commit(self) -> str:
        if self._base is None:
            self._base = self.repo.commit(BASE_BRANCH).hexsha
        return self._base

    def resolve(self, rev: str) -> str:
        try:
            return self.repo.commit(rev).hexsha
        except (git.BadName, ValueError) as e:
            raise HistoryError(f"{rev!r} is not a commit of {self.path}: {e}") from None

    def ls(self, commit: str) -> list[str]:
        return sorted(self._entries(commit))

    def files(self, commit: str, paths: list[str] | None = None) -> dict[str, str]:
        """Text of files at `commit`; all (text) files when `paths` is None.

        Binary files are left out of the full listing; asking for one by name, or for a path
        the commit does not have, raises HistoryError.
        """
        tree = self.repo.commit(self.resolve(commit)).tree
        wanted = self.ls(commit) if paths is None else list(paths)
        out = {}
        for p in wanted:
            try:
                obj = tree / p
            except KeyError:
                raise HistoryError(f"{p}: not in commit {commit[:12]}") from None
            if obj.type != "blob":
                raise HistoryError(f"{p}: a folder at {commit[:12]}, not a file")
            data = obj.data_stream.read()
            try:
                out[p] = data.decode("utf-8")
            except UnicodeDecodeError:
                if paths is not None:
                    raise HistoryError(f"{p}: binary file at {commit[:12]}, not text") from None
        return out

    def parent(self, commit: str) -> str | None:
        parents = self.repo.commit(self.resolve(commit)).parents
        return parents[0].hexsha if parents else None

    def lineage(self, commit: str) -> list[str]:
        """`commit` and its ancestors, newest first, down to the base."""
        out, cur = [], self.resolve(commit)
        while cur:
            out.append(cur)
            cur = self.parent(cur)
        return out

    def message(self, commit: str) -> str:
        msg = self.repo.commit(self.resolve(commit)).message
        return msg if isinstance(msg, str) else msg.decode("utf-8", "replace")

    def diff(self, commit: str, against: str | None = None) -> str:
        """Unified diff from `against` (default: the commit's parent; the empty tree for the root)."""
        commit = self.resolve(commit)
        base = self.resolve(against) if against else (self.parent(commit) or EMPTY_TREE)
        out = self._git("diff", "--no-color", "--no-ext-diff", base, commit)
        return out + "\n" if out else ""  # GitPython strips the last newline; a patch needs it

    def candidates(self) -> dict[str, str]:
        """Tree sha -> commit for the base and every candidate branch (read once, then kept up to date)."""
        if self._trees is None:
            self._trees = self._read_candidates()
        return self._trees

    def _read_candidates(self) -> dict[str, str]:
        out: dict[str, str] = {}
        refs = self._git("for_each_ref", "--format=%(objectname) %(tree)", f"refs/heads/{BASE_BRANCH}",
                         f"refs/heads/{CAND_PREFIX}")
        for line in refs.splitlines():
            commit, tree = line.split()
            out.setdefault(tree, commit)
        return out

    def candidate_list(self) -> list[Candidate]:
        """Every candidate branch's commit (not the base), in the order they were made."""
        out = []
        for ref in self.repo.references:
            if not ref.path.startswith(f"refs/heads/{CAND_PREFIX}"):
                continue
            c = ref.commit
            msg = c.message if isinstance(c.message, str) else c.message.decode("utf-8", "replace")
            proposer = re.findall(r"^Proposer: (.+)$", msg, flags=re.M)
            n = re.match(r"(\d+)-", ref.path[len(f"refs/heads/{CAND_PREFIX}"):])
            out.append((int(n.group(1)) if n else 1 << 30, c.committed_date,
                        Candidate(c.hexsha, c.parents[0].hexsha if c.parents else "",
                                  msg.split("\n", 1)[0], proposer[-1].strip() if proposer else "")))
        return [cand for *_, cand in sorted(out, key=lambda x: x[:2])]

    def branches(self, commit: str) -> list[str]:
        commit = self.resolve(commit)
        refs = self._git("for_each_ref", "--format=%(objectname) %(refname:short)", "refs/heads/")
        return [name for sha, name in (ln.split(" ", 1) for ln in refs.splitlines()) if sha == commit]

    # -- writing -----------------------------------------------------------------------------

    def commit(self, parent: str, changes: dict[str, str | None], message: str, title: str) -> tuple[str, bool]:
        """Commit `changes` (path -> new text; None deletes) on top of `parent`.

        Returns (commit, created_new). When the resulting tree is already a candidate (the parent
        itself included), that candidate's commit comes back with created_new False.
        """
        parent = self.resolve(parent)
        entries = self._entries(parent)
        updates: dict[str, tuple[str, str] | None] = {}
        for path, text in changes.items():
            path = self._clean_path(path)
            if text is None:
                if path not in entries:
                    raise HistoryError(f"{path}: cannot delete, not in {parent[:12]}")
                updates[path] = None
            else:
                mode = entries.get(path, ("100644", ""))[0]
                updates[path] = (self._blob(text.encode("utf-8")), mode)
        tree = self._write_tree(parent, updates)
        existing = self.candidates().get(tree)
        if existing:
            return existing, False
        commit = self._git("commit_tree", "--no-gpg-sign", tree, "-p", parent, "-m", message)
        if self._cand_count is None:
            self._cand_count = sum(1 for r in self.repo.references if r.path.startswith(f"refs/heads/{CAND_PREFIX}"))
        self._cand_count += 1
        self._git("update_ref", f"refs/heads/{CAND_PREFIX}{self._cand_count}-{slug(title)}-{commit[:7]}", commit)
        self.candidates()[tree] = commit
        return commit, True

    def set_note(self, commit: str, text: str, wait: bool = True) -> None:
        """Attach `text` as the commit's note; with wait=False a background thread writes it
        (notes are derived from the study, so a note lost in a crash is rewritten on resume)."""
        if wait:
            self._git("notes", f"--ref={NOTES_REF}", "add", "-f", "-m", text, self.resolve(commit))
            return
        if self._notes_thread is None:
            self._notes_thread = threading.Thread(target=self._write_notes, name="git-notes", daemon=True)
            self._notes_thread.start()
        self._notes.put((commit, text))

    def _write_notes(self) -> None:
        # A plain git process per note: GitPython's Repo is not shared across threads.
        while (item := self._notes.get()) is not None:
            commit, text = item
            proc = subprocess.run(["git", "-C", str(self.path), "notes", f"--ref={NOTES_REF}", "add", "-f", "-F", "-",
                                   commit], input=text, text=True, capture_output=True, env={**os.environ, **IDENTITY})
            if proc.returncode != 0:
                self._notes_error = proc.stderr.strip()
            self._notes.task_done()
        self._notes.task_done()

    def flush_notes(self) -> None:
        """Wait until every queued note is written."""
        if self._notes_thread is not None:
            self._notes.join()
        if self._notes_error:
            error, self._notes_error = self._notes_error, None
            raise HistoryError(f"writing a git note failed: {error}")

    def note(self, commit: str) -> str:
        self.flush_notes()
        try:
            return self._git("notes", f"--ref={NOTES_REF}", "show", self.resolve(commit))
        except git.GitCommandError:
            return ""

    def create_branch(self, name: str, commit: str) -> str:
        """Branch `name` at `commit`; fine if it already points there, an error if elsewhere."""
        commit = self.resolve(commit)
        try:
            self._git("check_ref_format", "--branch", name)
        except git.GitCommandError:
            raise HistoryError(f"{name!r} is not a valid branch name") from None
        ref = f"refs/heads/{name}"
        if any(r.path == ref for r in self.repo.references):
            at = self.repo.commit(ref).hexsha
            if at != commit:
                raise HistoryError(f"branch {name} exists at {at[:12]}, not {commit[:12]}")
            return name
        self._git("branch", name, commit)
        return name

    # -- plumbing ----------------------------------------------------------------------------

    def _git(self, cmd: str, *args: str, **kw) -> str:
        env = kw.pop("env", {})
        return getattr(self.repo.git, cmd)(*args, env={**IDENTITY, **env}, **kw)

    def _blob(self, data: bytes) -> str:
        with tempfile.TemporaryFile() as fh:
            fh.write(data)
            fh.seek(0)
            return self._git("hash_object", "-w", "--stdin", istream=fh)

    def _entries(self, commit: str) -> dict[str, tuple[str, str]]:
        """path -> (mode, blob sha) of every file at `commit`."""
        out = {}
        for line in self._git("ls_tree", "-r", "-z", "--full-tree", commit).split("\0"):
            if line:
                meta, path = line.split("\t", 1)
                mode, _, sha = meta.split()
                out[path] = (mode, sha)
        return out

    def _write_tree(self, parent: str | None, updates: dict[str, tuple[str, str] | None]) -> str:
        with self._scratch_index() as env:
            if parent:
                self._git("read_tree", parent, env=env)
            else:
                self._git("read_tree", "--empty", env=env)
            lines = [f"0 {'0' * 40}\t{p}" if u is None else f"{u[1]} {u[0]}\t{p}" for p, u in updates.items()]
            if lines:
                with tempfile.TemporaryFile() as fh:
                    fh.write(("\0".join(lines) + "\0").encode("utf-8"))
                    fh.seek(0)
                    self._git("update_index", "-z", "--index-info", env=env, istream=fh)
            return self._git("write_tree", env=env)

    @contextmanager
    def _scratch_index(self) -> Iterator[dict[str, str]]:
        tmp = Path(tempfile.mkdtemp(prefix="speedsearch-index-"))
        try:
            yield {"GIT_INDEX_FILE": str(tmp / "index")}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _clean_path(path: str) -> str:
        p = Path(path)
        if p.is_absolute() or ".." in p.parts or not p.parts or p.parts[0] == ".git":
            raise HistoryError(f"{path!r}: must be a relative path inside the trainer's tree")
        return p.as_posix()
