"""Reviews: a person's approve / reject / note on a candidate, kept in the runs database.

Where a review lives: the study's user attrs (`review:<commit>`, plain JSON) and a git note on the
candidate's commit under `refs/notes/review` (so `git log --notes=review` shows it). The search's own
notes live under `refs/notes/speedsearch` and are rewritten from its trials, so reviews get a ref
of their own: neither can overwrite the other.

One writer. A search folder has one writer at a time, the process holding `D/writer.lock`: the
running search (for its whole run), otherwise whichever command takes the lock (the review page,
`replay --approved`). Anyone may *ask* for a review with `request()`, which appends one line to
`D/reviews.queue.jsonl` under its own lock; only the writer applies the queue (`apply_queued`) to
the study and the git notes. So the review page never writes the study while a search runs: the
search applies what the page asked for within a second.

What the search does with reviews: a rejected candidate is never a parent, notes reach the next
LLM prompt (`prompt_notes`), approved candidates are replayed (`approved_pending`).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runs_db.db import RunsDB
from runs_db.history import IDENTITY
from search_space.errors import UserError

APPROVE, REJECT = "approve", "reject"
DECISIONS = (APPROVE, REJECT)
ATTR_PREFIX = "review:"  # study user attr per reviewed commit
NOTES_REF = "review"  # refs/notes/review
QUEUE_FILE, QUEUE_LOCK, WRITER_LOCK = "reviews.queue.jsonl", "reviews.queue.lock", "writer.lock"
MAX_NOTE = 4000  # characters; the prompt shows at most 1500 of each note anyway
REPLAY = "replay"  # the proposer name of replay trials (agent.names.Who.REPLAY; runs_db cannot import agent)
KEEP: Any = object()  # set_review's "leave this field as it is"


@dataclass(frozen=True)
class Review:
    """The current review of one candidate."""

    commit: str
    decision: str | None  # "approve" | "reject" | None
    note: str | None
    at: float  # when it was recorded (epoch seconds)
    since: int  # study trials when it was recorded: a replay numbered at or above it answers this approval

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- reading (anyone) -------------------------------------------------------------------------


def reviews(db: RunsDB) -> dict[str, Review]:
    """Every candidate's current review, by full commit; candidates never reviewed are absent."""
    out = {}
    for key, value in db.study.user_attrs.items():
        if key.startswith(ATTR_PREFIX) and isinstance(value, dict) and (value.get("decision") or value.get("note")):
            commit = key[len(ATTR_PREFIX):]
            out[commit] = Review(commit, value.get("decision"), value.get("note"), float(value.get("at", 0.0)),
                                 int(value.get("since", 0)))
    return out


def rejected(db: RunsDB) -> set[str]:
    return {c for c, r in reviews(db).items() if r.decision == REJECT}


def approved_pending(db: RunsDB) -> list[str]:
    """Approved candidates not yet replayed since their approval, oldest approval first.

    A replay answers an approval when its trial (proposer "replay", same commit) was numbered after
    the approval and ended (complete, or failed for a reason other than an interruption)."""
    approved = [r for r in reviews(db).values() if r.decision == APPROVE]
    if not approved:
        return []
    done: dict[str, int] = {}
    for t in db.trials():
        if t.proposer == REPLAY and (t.state == "complete" or (t.state == "fail" and "interrupt" not in t.reason)):
            done[t.commit] = max(done.get(t.commit, -1), t.number)
    return [r.commit for r in sorted(approved, key=lambda r: r.at) if done.get(r.commit, -1) < r.since]


def prompt_notes(db: RunsDB) -> list[str]:
    """The reviews as lines for a proposer's context (oldest first), each naming its candidate."""
    out = []
    for r in sorted(reviews(db).values(), key=lambda r: r.at):
        try:
            title = db.message(r.commit).split("\n", 1)[0]
        except Exception:  # a commit the history lost: still show the note
            title = "?"
        verdict = {REJECT: " the reviewer rejected it (never build on it).", APPROVE: " the reviewer approved it."}
        head = f'On candidate "{title}" ({r.commit[:8]}):' + verdict.get(r.decision or "", "")
        out.append(head + (f" Note: {r.note}" if r.note else ""))
    return out


# -- asking (anyone) --------------------------------------------------------------------------


def check(db: RunsDB, commit: str, decision: Any = KEEP, note: Any = KEEP) -> tuple[str, Any, Any]:
    """The request made valid: (full commit, decision, note); UserError (one line) otherwise."""
    full = _resolve(db, commit)
    if full is None:
        raise UserError(f"commit {commit!r}: not a candidate of this search")
    if full == db.base_commit:
        raise UserError(f"commit {commit[:12]}: the base cannot be reviewed, only candidates")
    if decision is not KEEP and decision not in (None, *DECISIONS):
        raise UserError(f"decision {decision!r}: use approve, reject or none")
    if note is not KEEP and note is not None:
        if not isinstance(note, str):
            raise UserError("note: must be text")
        note = note.strip() or None
        if note and len(note) > MAX_NOTE:
            raise UserError(f"note: {len(note)} characters, at most {MAX_NOTE}")
    return full, decision, note


def request(dir: Path, commit: str, decision: Any = KEEP, note: Any = KEEP) -> None:
    """Queue a review for the writer (see the module's docstring); `commit` must be checked already."""
    item: dict[str, Any] = {"commit": commit, "asked": time.time()}
    if decision is not KEEP:
        item["decision"] = decision
    if note is not KEEP:
        item["note"] = note
    with _locked(Path(dir) / QUEUE_LOCK):
        with open(Path(dir) / QUEUE_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(item) + "\n")


def queued(dir: Path) -> list[dict[str, Any]]:
    """The requests not applied yet (the page shows them as pending)."""
    path = Path(dir) / QUEUE_FILE
    if not path.is_file() or path.stat().st_size == 0:
        return []
    with _locked(Path(dir) / QUEUE_LOCK):
        return _read(path)


# -- writing (the writer only) ----------------------------------------------------------------


@contextmanager
def writer(dir: Path) -> Iterator[bool]:
    """Try to become the search folder's writer: yields True while this process holds
    `D/writer.lock`, False when another holder (a running search) has it. Never waits."""
    fd = os.open(Path(dir) / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class WriterLock:
    """The writer lock held for a long time (a search's whole run): `held` says whether it was had."""

    def __init__(self, dir: Path):
        self._cm = writer(dir)
        self.held = self._cm.__enter__()

    def release(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm, self.held = None, False


def apply_queued(db: RunsDB) -> list[Review]:
    """Apply and remove every queued request, in order. Call only while holding the writer lock."""
    path = db.dir / QUEUE_FILE
    if not path.is_file() or path.stat().st_size == 0:
        return []
    with _locked(db.dir / QUEUE_LOCK):
        items = _read(path)
        done = []
        for item in items:
            try:
                commit, decision, note = check(db, item["commit"], item.get("decision", KEEP), item.get("note", KEEP))
            except (UserError, KeyError):
                continue  # checked when asked; a request that no longer makes sense is dropped
            done.append(set_review(db, commit, decision, note))
        path.write_text("")
    return done


def set_review(db: RunsDB, commit: str, decision: Any = KEEP, note: Any = KEEP) -> Review:
    """Record a review now (study attr, then git note). KEEP leaves a field as it is; None clears it.
    Only the writer calls this (see the module's docstring); others `request()`."""
    commit, decision, note = check(db, commit, decision, note)
    old = reviews(db).get(commit)
    decision = (old.decision if old else None) if decision is KEEP else decision
    note = (old.note if old else None) if note is KEEP else note
    since = max((t.number for t in db.study.trials()), default=-1) + 1
    review = Review(commit, decision, note, time.time(), since)
    db.study.set_user_attr(ATTR_PREFIX + commit, review.to_dict() if (decision or note) else None)
    _write_note(db, review)
    return review


def _write_note(db: RunsDB, r: Review) -> None:
    # A plain git process: the search's GitPython repo belongs to its loop thread.
    git = ["git", "-C", str(db.repo_path), "notes", f"--ref={NOTES_REF}"]
    env = {**os.environ, **IDENTITY}
    if not (r.decision or r.note):
        subprocess.run([*git, "remove", "--ignore-missing", r.commit], check=True, capture_output=True, env=env)
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(r.at))
    text = f"review: {r.decision or 'none'} ({stamp})\n" + (f"\n{r.note}\n" if r.note else "")
    subprocess.run([*git, "add", "-f", "-F", "-", r.commit], input=text, text=True, check=True,
                   capture_output=True, env=env)


def note_text(db: RunsDB, commit: str) -> str:
    """The review's git note on `commit` ("" when none)."""
    proc = subprocess.run(["git", "-C", str(db.repo_path), "notes", f"--ref={NOTES_REF}", "show", commit],
                          capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


def _resolve(db: RunsDB, rev: str) -> str | None:
    """The full sha of commit `rev`, or None. A git process of its own, not GitPython: the writer
    applies reviews on the search's recorder thread, and GitPython's repo belongs to the loop's."""
    if not isinstance(rev, str) or not rev or rev.startswith("-"):
        return None
    proc = subprocess.run(["git", "-C", str(db.repo_path), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash mid-write
    return out
