"""Candidate commits off the loop's thread: an accepted proposal becomes a git commit on the
`commit` thread, and the loop picks the commits up as they come back, as it does proposals
(agent/ahead.py).

Why: a commit is about seven `git` processes (blobs, a scratch index, write-tree, commit-tree, a
ref), its diff one more, and shipping its tree to Ray's object store (env/source.py) three more; on
the loop's thread they held finished runs and free workers waiting (bench/loop.py --profile).
Commits are made ahead of need, in the order asked (one thread), and shipped once made, so a freed
worker's next candidate is committed and its source in the object store when the loop sends it.

The thread writes through its own History of the search's repo: GitPython's Repo keeps `git
cat-file` helpers that must not be shared across threads, and the loop's thread reads through the
database's. A candidate branch still means "a study trial names this commit": at a clean stop the
branches of commits no trial recorded are deleted again (`discard`); a crash may leave a few, and a
resume runs them at smoke (agent/resume.py).
"""

from __future__ import annotations

import logging
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import ray

from agent.trial import Trial
from env.source import commit_source
from runs_db.db import RunsDB
from runs_db.history import CAND_PREFIX, History

log = logging.getLogger(__name__)
THREAD = "commit"  # the committer thread's name prefix (tests assert commits are made there)


@dataclass(frozen=True)
class Written:
    commit: str
    created: bool  # False: the same tree as an existing candidate, which `commit` names
    diff: str  # against its parent, for proposers' contexts ("" when not created)


class Committer:
    def __init__(self, db: RunsDB):
        self.db = db
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD)
        self.futures: dict[Future, Trial] = {}  # in the order asked, which is the order they are made
        self._history: History | None = None  # opened and used on the commit thread only
        self.busy_s = 0.0  # time spent committing and shipping (benchmarks)

    @property
    def pending(self) -> int:
        """Commits asked for and not yet collected."""
        return len(self.futures)

    def submit(self, t: Trial) -> None:
        """Commit an accepted proposal's changes (`t.proposal`, `t.changes`) on its parent."""
        self.futures[self.pool.submit(self._write, t)] = t

    def collect(self, wait: bool = False) -> list[tuple[Trial, Written | None]]:
        """The commits made so far, in the order asked; a failed write raises here (on the loop's
        thread, as it did when the loop committed itself). wait=True, at a stop: every one asked
        for, a failed write logged and given as None."""
        out: list[tuple[Trial, Written | None]] = []
        for fut in list(self.futures):
            if not (wait or fut.done()):
                break  # one thread: later ones are not done either
            t = self.futures.pop(fut)
            if not wait:
                out.append((t, fut.result()))
                continue
            try:
                out.append((t, fut.result()))
            except Exception as e:
                log.warning("committing %r failed at the stop: %s: %s", t.title, type(e).__name__, e)
                out.append((t, None))
        return out

    def discard(self, commits: set[str]) -> int:
        """Delete the candidate branches of `commits` (made, never started); returns how many.
        The commits stay as unreachable objects, which git's own gc prunes."""
        if not commits:
            return 0
        return self.pool.submit(self._discard, set(commits)).result()

    def close(self, discard: set[str] | frozenset[str] = frozenset()) -> None:
        """Discard the branches of `discard` (see `discard`), then end the thread. Called from the
        loop's stop, so a failure is logged, never raised: a branch left behind is run by a resume."""
        try:
            self.discard(set(discard))
        except Exception as e:
            log.warning("deleting %d unstarted candidate branches failed: %s: %s", len(discard), type(e).__name__, e)
        try:
            self.pool.submit(self._close).result()
        finally:
            self.pool.shutdown(wait=True)

    # --- on the commit thread
    def _repo(self) -> History:
        if self._history is None:
            self._history = History(self.db.repo_path)
        return self._history

    def _write(self, t: Trial) -> Written:
        t0 = time.perf_counter()
        p, history = t.proposal, self._repo()
        assert p is not None and t.changes is not None, "only accepted proposals are committed"
        commit, created = self.db.commit_candidate(p.parent, t.changes, p.title, p.rationale, p.proposer,
                                                   model=p.model, history=history)
        written = Written(commit, created, history.diff(commit) if created else "")
        if created and ray.is_initialized():  # the pool ships it at its first run: then a cache hit
            try:
                commit_source(self.db.repo_path, commit)
            except Exception as e:  # the pool ships it itself, and reports what fails then
                log.debug("shipping %s ahead failed: %s: %s", commit[:12], type(e).__name__, e)
        self.busy_s += time.perf_counter() - t0
        return written

    def _discard(self, commits: set[str]) -> int:
        git = self._repo().repo.git
        refs = git.for_each_ref("--format=%(objectname) %(refname)", f"refs/heads/{CAND_PREFIX}")
        doomed = [(ref, sha) for sha, ref in (line.split(" ", 1) for line in refs.splitlines()) if sha in commits]
        if doomed:  # one process for all: `delete <ref> <old value>` refuses a ref that moved meanwhile
            with tempfile.TemporaryFile() as fh:
                fh.write("".join(f"delete {ref} {sha}\n" for ref, sha in doomed).encode())
                fh.seek(0)
                git.update_ref("--stdin", istream=fh)
        return len(doomed)

    def _close(self) -> None:
        if self._history is not None:
            self._history.close()
            self._history = None
