"""Resume: rebuild every candidate's Trial from the runs database and return what the loop needs.

A new search finds the database empty and gets an empty `Restored`. Trials a dead controller left
running are marked failed ("interrupted") and their rung runs again, reusing the runs that had
finished inside it (`Trial.carried`); interrupted trials do not count against `budget_trials`.
A run cut off inside such a rung runs again with the same seed and fidelity, so a target with
`[checkpoint]` continues it from the state kept in the search folder (env/run_state.py). A
candidate whose last rung ended carries on to the rung recorded with it (`next`), or stays ended
with its verdict and reward; a commit that never started a trial starts at the ladder's first
rung. Every git note is written again from the study: notes are derived data, and a crash may
have lost the last ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.candidates import Record
from agent.names import SEARCH_PROPOSERS, Rung, Verdict, Who
from agent.proposal import Proposal
from agent.trial import BASE, CANDIDATE, Trial, whole_pairs
from runs_db.db import RunsDB
from search_space.judge import fresh_seeds
from search_space.records import RunResult, Status

INTERRUPTED = "interrupted"  # the reason on trials cut short: a resumed search runs them again
FDR_KEY = "fdr"


@dataclass
class Restored:
    next_number: int = 0  # the study numbers trials 0, 1, 2, ...
    base_runs: dict[str, list[RunResult]] = field(default_factory=dict)  # fidelity -> the base's OK runs, oldest first
    target_loss: dict[str, float] = field(default_factory=dict)  # fidelity -> the target loss fixed at its first build
    base_seed: dict[str, int] = field(default_factory=dict)  # fidelity -> the next unused baseline seed
    continuing: list[Trial] = field(default_factory=list)  # candidates to queue at their next rung
    ended: list[Trial] = field(default_factory=list)  # candidates that left the ladder (verdict, reward)
    records: list[Record] = field(default_factory=list)  # every candidate evaluation, for proposers' contexts
    candidates: int = 0  # study trials of the search's candidates (what budget_trials counts)
    fdr: dict[str, Any] | None = None  # the online FDR rule's state
    interrupted: int = 0


def proposal_of(t) -> Proposal | None:
    """The proposal as the learners need it again, from its first trial's attrs (smoke, or short
    where the ladder skips smoke)."""
    a = t.attrs
    if t.proposer not in SEARCH_PROPOSERS:
        return None
    meta = {"knob_trial": a["knob_trial"]} if a.get("knob_trial") is not None else {}
    return Proposal(title=t.title, rationale="", proposer=t.proposer, parent=t.parent or "",
                    knobs=dict(a.get("knobs") or {}), model=t.model, ideas=tuple(a.get("ideas") or ()), meta=meta)


def restore(db: RunsDB, fidelities: list[str], first_batch: int) -> Restored:
    out = Restored()
    for t in db.stale_running():
        db.mark_failed(t.number, INTERRUPTED)
        out.interrupted += 1
    db.refresh_notes()
    trials = db.trials()
    out.next_number = max((t.number for t in trials), default=-1) + 1
    out.fdr = db.get_state(FDR_KEY, None)
    base = db.base_commit
    for t in trials:  # the base's runs: its own trials per fidelity, and confirm's paired runs (at full)
        if t.proposer != Who.BASELINE or t.state != "complete":
            continue
        fid = "full" if t.fidelity == Rung.CONFIRM else t.fidelity
        if fid not in fidelities:
            continue
        runs = [r for r in db.runs(t.number) if r.status == Status.OK]
        out.base_runs.setdefault(fid, []).extend(runs)
        if t.fidelity != Rung.CONFIRM and "target_loss" in t.attrs and fid not in out.target_loss:
            out.target_loss[fid] = float(t.attrs["target_loss"])
        if t.fidelity != Rung.CONFIRM:
            out.base_seed[fid] = max([out.base_seed.get(fid, 0)] + [r.seed + 1 for r in runs])
    by_commit: dict[str, list] = {}
    for t in trials:
        if t.proposer in SEARCH_PROPOSERS and t.commit != base:
            by_commit.setdefault(t.commit, []).append(t)
    for commit, ts in by_commit.items():
        ts.sort(key=lambda t: t.number)
        first, last = ts[0], ts[-1]
        trial = Trial(commit, first.parent or "", first.title, first.proposer, first.model,
                      arm=first.attrs.get("arm"), proposal=proposal_of(first))
        for t in ts:
            trial.numbers[t.fidelity] = t.number
            if t.state == "complete" and t.attrs.get("score") is not None and t.fidelity != Rung.CONFIRM:
                trial.scores[t.fidelity] = float(t.attrs["score"])
                trial.values[t.fidelity] = float(t.value) if t.value is not None else float("nan")
            out.records.append(Record(commit, t.parent or "", t.title, t.proposer, t.fidelity,
                                      t.attrs.get("status", t.state), t.value, _num(t.attrs.get("speedup")),
                                      t.attrs.get("reason", "")))
        trial.rung = last.fidelity
        trial.status, trial.reason = last.attrs.get("status", "ok"), str(last.attrs.get("reason") or "")
        trial.speedup_text = str(last.attrs.get("speedup_text") or "")
        nxt = last.attrs.get("next")
        if last.state == "fail" and last.attrs.get("reason") == INTERRUPTED:
            trial.alpha = last.attrs.get("alpha")  # confirm keeps the level it was given; it starts over
            _queue_at(trial, last.fidelity, first_batch, tuple(last.attrs.get("seeds") or (0,)))
            _carry(db, trial, last, trials, first_batch)
            out.continuing.append(trial)
        elif nxt:
            _queue_at(trial, nxt, first_batch, (0,))
            out.continuing.append(trial)
        else:  # ended: its verdict and reward were stored with its last rung
            trial.end(last.attrs.get("verdict") or Verdict.STOPPED, bool(last.attrs.get("won", False)))
            out.ended.append(trial)
    for commit, parent, title, proposer in db.candidates():
        if commit not in by_commit and proposer in SEARCH_PROPOSERS:  # committed, then the controller died
            model = _trailer(db.message(commit), "Model") if proposer == Who.LLM else None
            # its arm, as the loop names them: the bandit is rewarded when it ends (counts = candidates ended)
            arm = (f"llm:{model}" if model else None) if proposer == Who.LLM else proposer
            out.continuing.append(Trial(commit, parent, title, proposer, model, arm=arm))
    out.candidates = sum(1 for ts in by_commit.values() for t in ts if counted(t))
    return out


def counted(t) -> bool:
    """Whether a candidate's study trial counts against `budget_trials`: not one cut off by a stop
    or a crash (its rung runs again, and that trial counts)."""
    return t.state != "running" and not (t.state == "fail" and t.attrs.get("reason") == INTERRUPTED)


def counted_trials(db: RunsDB) -> int:
    """The candidate study trials a search has spent of its `budget_trials`."""
    return sum(1 for t in db.trials() if t.proposer in SEARCH_PROPOSERS and t.commit != db.base_commit
               and counted(t))


def _carry(db: RunsDB, trial: Trial, last, trials: list, first_batch: int) -> None:
    """The runs that had finished inside the interrupted rung `last`, for the rung run again: the
    candidate's; where the rung ran in pairs (confirm, paired screening), only the pairs that had
    both runs, for a pair's two runs are compared because they ran side by side: a lone run is run
    again with a new partner. At confirm the batch grows to cover every finished run, in the order
    the seeds are drawn."""
    kept = {(CANDIDATE, r.seed): r for r in db.runs(last.number)}
    base = next((t for t in trials if t.attrs.get("pairs_for") == last.number), None)
    if base is not None:
        kept.update({(BASE, r.seed): r for r in db.runs(base.number)})
    if last.fidelity == Rung.CONFIRM:  # the look it was at (its size), even if a pair of it is run again
        order = fresh_seeds(trial.commit, "confirm", 0, first_batch + 256)  # past the first batch: later looks
        n = max([len(trial.batch)] + [order.index(s) + 1 for _, s in kept if s in order])
        trial.batch = tuple(order[:n])
    if base is not None:
        kept = whole_pairs(kept)
    trial.carried = {k: r for k, r in kept.items() if k[1] in trial.batch}


def _queue_at(trial: Trial, rung: str, first_batch: int, seeds: tuple[int, ...]) -> None:
    trial.rung, trial.number = rung, None
    trial.numbers.pop(rung, None)
    trial.batch = tuple(fresh_seeds(trial.commit, "confirm", 0, first_batch)) if rung == Rung.CONFIRM else seeds


def _trailer(message: str, key: str) -> str | None:
    """A `Key: value` trailer of a candidate's commit message (RunsDB.commit_candidate writes them)."""
    for line in reversed(message.strip().splitlines()):
        if line.startswith(f"{key}: "):
            return line[len(key) + 2:].strip() or None
    return None


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else 0.0


def rewards(ended: list[Trial]) -> list[tuple[str, bool]]:
    """The bandit's rewards, one per ended candidate that an arm proposed."""
    return [(t.arm, t.won) for t in ended if t.arm]
