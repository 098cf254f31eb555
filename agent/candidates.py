"""From a proposal to a candidate commit, and from the history to a proposer's context.

A proposal is applied to its parent's files in memory, checked against the target's rules, and
rejected before any GPU time is spent when its normalised content was already tried. The commit
itself is written on the committer's thread (agent/committer.py); `committed` takes it back here,
on the loop's thread, which alone reads and writes this object.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.proposal import Attempt, Proposal, ProposalContext
from runs_db.db import RunsDB
from runs_db.reviews import prompt_notes
from search_space.edits import Edit, EditError, apply_edits
from search_space.knobs import KNOBS_FILE, knob_changes
from search_space.rules import RuleViolation, check_change, matches
from search_space.target import Target

if TYPE_CHECKING:
    from agent.committer import Written

MAX_BEST, MAX_FAILURES = 5, 6
DIFF_CACHE = 1024  # the committer hands every new commit's diff over; the ones shown stay (LRU)


def normalised_key(files: dict[str, str]) -> str:
    """Equal for changes that differ only in trailing whitespace or blank lines."""
    h = hashlib.sha256()
    for path in sorted(files):
        lines = [line.rstrip() for line in files[path].splitlines() if line.strip()]
        h.update(path.encode() + b"\0" + "\n".join(lines).encode() + b"\0")
    return h.hexdigest()


def read_notes(db: RunsDB) -> list[str]:
    """The notes a proposal's prompt carries: the search's own ("notes" state), then the review page's."""
    return list(db.get_state("notes", [])) + prompt_notes(db)


@dataclass
class Record:
    commit: str
    parent: str
    title: str
    proposer: str
    rung: str
    status: str
    value: float | None
    speedup: float
    reason: str


class Candidates:
    def __init__(self, db: RunsDB, target: Target, cache_size: int = 256):
        self.db, self.target = db, target
        self._files: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._diffs: OrderedDict[str, str] = OrderedDict()
        self.cache_size = cache_size
        self.records: list[Record] = []
        self.seen: dict[str, str] = {}  # normalised key -> commit
        self.rejected: set[str] = set()  # commits a reviewer rejected: never a parent (agent/review/desk.py)
        # the prompt's notes, kept by the desk as reviews change (None: read from the study per context)
        self.notes: list[str] | None = None
        # candidate commits no study trial names yet: made ahead by the committer, or left by a crash
        # (a resume runs those at smoke); the loop removes one when it starts its first trial, and a
        # clean stop deletes the branches of those left (Committer.discard)
        self.unrecorded: set[str] = set()
        cands = db.candidates()
        for commit, *_ in [(db.base_commit,), *cands]:
            self.seen.setdefault(normalised_key(self.files(commit)), commit)
        if cands:
            recorded = {t.commit for t in db.trials()}
            self.unrecorded = {c for c, *_ in cands if c not in recorded}

    def files(self, commit: str) -> dict[str, str]:
        """The editable files (and the knob file) of a commit; commits never change, so this caches."""
        if commit not in self._files:
            self._keep_files(commit, self.db.files(commit))
        self._files.move_to_end(commit)
        return self._files[commit]

    def _keep_files(self, commit: str, files: dict[str, str]) -> None:
        self._files[commit] = {p: t for p, t in files.items() if p == KNOBS_FILE or matches(p, self.target.editable)}
        if len(self._files) > self.cache_size:
            self._files.popitem(last=False)

    def diff(self, commit: str) -> str:
        if commit not in self._diffs:
            self._keep_diff(commit, self.db.diff(commit))
        self._diffs.move_to_end(commit)
        return self._diffs[commit]

    def _keep_diff(self, commit: str, diff: str) -> None:
        self._diffs[commit] = diff
        if len(self._diffs) > DIFF_CACHE:
            self._diffs.popitem(last=False)

    def changes(self, parent: str, edits: list[Edit], knobs: dict | None = None) -> dict[str, str]:
        """Apply edits and knob values to the parent's files; raises EditError / RuleViolation."""
        return self._apply(self.files(parent), edits, knobs)

    def _apply(self, files: dict[str, str], edits: list[Edit], knobs: dict | None = None) -> dict[str, str]:
        new = apply_edits(files, list(edits)) if edits else {}
        if knobs:
            try:
                new.update(knob_changes({**files, **new}, self.target.knobs, knobs))
            except KeyError as e:
                raise EditError(str(e)) from None
        new = {p: t for p, t in new.items() if t != files.get(p)}
        check_change(self.target, {p: (files.get(p), t) for p, t in new.items()})
        return new

    def accept(self, proposal: Proposal) -> tuple[dict[str, str] | None, str]:
        """(changes, "") for a proposal worth running, or (None, why it was rejected).

        Its normalised content is reserved, so a twin proposed before it runs is rejected too.
        """
        if proposal.parent in self.rejected:  # asked for before the reviewer's reject arrived
            return None, f"its parent {proposal.parent[:8]} was rejected by a reviewer"
        try:
            changes = self.changes(proposal.parent, list(proposal.edits), proposal.knobs)
        except (EditError, RuleViolation) as e:
            return None, str(e)
        key = normalised_key({**self.files(proposal.parent), **changes})
        if key in self.seen:
            if self.seen[key]:  # the loop may hand it to a twin nobody proposed in this search (a resume's)
                proposal.meta["twin"] = self.seen[key]
            return None, f"already tried as {self.seen[key][:8] or 'a queued proposal'} (same normalised change)"
        self.seen[key] = ""  # reserved until the committer's commit comes back (`committed`)
        proposal.meta["key"] = key
        return changes, ""

    def committed(self, proposal: Proposal, changes: dict[str, str], written: Written) -> tuple[str | None, str]:
        """The committer's commit of an accepted proposal's `changes`: (commit, "") or (None, why not)."""
        self.seen[proposal.meta["key"]] = written.commit
        if not written.created:
            return None, f"same tree as {written.commit[:8]}"
        self.unrecorded.add(written.commit)
        self._keep_diff(written.commit, written.diff)
        if proposal.parent in self._files:  # its files are known without git, should it become a parent
            self._keep_files(written.commit, {**self._files[proposal.parent], **changes})
        return written.commit, ""

    def record(self, r: Record) -> None:
        self.records.append(r)

    def context(self, parent: str, baseline_line: str) -> ProposalContext:
        files = self.files(parent)
        done = [r for r in self.records if r.rung != "smoke" and r.value is not None and r.speedup > 0]
        best: dict[str, Record] = {}
        for r in sorted(done, key=lambda r: -r.speedup):
            best.setdefault(r.commit, r)
        failures = [r for r in self.records if r.status not in ("ok",)][-MAX_FAILURES:]

        def attempt(r: Record) -> Attempt:
            return Attempt(r.title, r.proposer, self.diff(r.commit), r.status, r.value, r.speedup, r.reason)

        return ProposalContext(
            target=self.target, parent=parent, files=files,
            best=[attempt(r) for r in list(best.values())[:MAX_BEST]],
            failures=[attempt(r) for r in failures],
            tried=list(dict.fromkeys(r.title for r in self.records)),
            notes=list(self.notes if self.notes is not None else read_notes(self.db)),
            baseline=baseline_line,
            check=lambda edits: self._apply(files, edits),  # proposer threads: no cache access
        )
