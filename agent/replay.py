"""Replay a candidate with fresh seeds, each run beside a base run with the same seed.

The k-th replay of a search draws `fresh_seeds(commit, "replay-k")`: the counter lives in the
study's state and is taken before anything runs, so a second replay (or one after a crash) never
repeats an earlier one's seeds, nor confirm's. Runs are submitted candidate, base, candidate,
base, ... so each pair shares the machine's state of the moment, and a pair counts only when
both finished OK on the same node. What it reports is the one speed-up (`judge.speedup`, the same
words as everywhere else) and, for the record, the speedrun's t-test of mean final loss.

`run_arms` is the batch runner replay, ablations and record mode share: several commits (arms),
the same seeds, interleaved seed by seed, with a progress callback for the live bar.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from agent.names import Rung, Who
from env.evaluate import RunSpec
from env.pool import Pool
from runs_db.db import RunsDB
from runs_db.export import RECORD_STATE
from runs_db.pairs import Paired, budget_words, pair_up, search_target_loss
from search_space import judge
from search_space.errors import UserError
from search_space.records import RunResult, Status
from search_space.target import Fidelity, Target

REPLAYS_KEY = "replays"  # study state: how many replays this search has started
Progress = Callable[[int, int, str], None]  # (runs done, runs in all, what just finished)


@dataclass(frozen=True)
class Arm:
    """One commit run on every seed of a batch; `steps` overrides the fidelity's step count."""

    label: str
    commit: str
    steps: int | None = None


@dataclass
class Replay:
    commit: str
    purpose: str  # "replay-<k>": where its seeds come from
    candidate: list[RunResult]
    base: list[RunResult]
    paired: Paired
    target_loss: float
    speedup: judge.Speedup
    pvalue: float | None  # the paired test of the gains (one-sided), for information
    loss_pvalue: float | None  # the speedrun's one-sided t-test of mean final loss < target
    trial: int
    base_trial: int
    steps: int = 0  # the candidate's step count (record mode runs fewer than the base)

    @property
    def trusted(self) -> bool:
        return self.paired.untrusted == 0

    def lines(self) -> list[str]:
        out = [f"{self.purpose} of {self.commit[:10]} (fresh seeds, beside the base): {self.speedup.text()}"]
        if self.pvalue is not None:
            out.append(f"paired one-sided t-test of the gain: p = {self.pvalue:.3g} (no multiplicity correction: "
                       "the search's confirmation is the verdict)")
        if self.loss_pvalue is not None:
            out.append(f"speedrun rule, mean final loss < {self.target_loss:.4f}: p = {self.loss_pvalue:.3g} "
                       f"({'meets' if self.loss_pvalue < 0.01 else 'does not meet'} p < 0.01)")
        if self.paired.lost:
            out.append(f"{self.paired.lost} seed(s) without a usable pair (failed, or the two runs on different nodes)")
        if not self.trusted:
            out.append(f"{self.paired.untrusted} run(s) untrusted (claimed losses): shown, never a confirmation")
        return out

    def to_dict(self) -> dict:
        return {"commit": self.commit, "purpose": self.purpose, "trial": self.trial, "base_trial": self.base_trial,
                "steps": self.steps, "speedup_text": self.speedup.text(), "speedup": self.speedup.to_dict(),
                "pvalue": self.pvalue, "loss_pvalue": self.loss_pvalue, "target_loss": self.target_loss,
                "lost_pairs": self.paired.lost, "untrusted_runs": self.paired.untrusted,
                "runs": [{"seed": c.seed, "candidate": _final(c), "base": _final(b)}
                         for c, b in zip(self.candidate, self.base, strict=True)]}


def _final(r: RunResult) -> dict:
    f = r.final
    return {"status": r.status.value, "val_loss": f.val_loss if f else None, "train_ms": f.train_ms if f else None,
            "steps": f.step if f else None}


def next_purpose(db: RunsDB, key: str = REPLAYS_KEY, prefix: str = "replay") -> str:
    """Take the next number of `key` from the study's state: "<prefix>-<k>"."""
    k = int(db.get_state(key, 0) or 0) + 1
    db.set_state(key, k)
    return f"{prefix}-{k}"


def at_steps(target: Target, fidelity: str, steps: int | None) -> Target:
    """The target with `fidelity` set to `steps` (None: as it is)."""
    if steps is None:
        return target
    return dataclasses.replace(target, fidelities={**target.fidelities, fidelity: Fidelity(fidelity, steps)})


def check_seeds(seeds: int) -> None:
    if seeds < 2:
        raise UserError(f"--seeds {seeds}: need at least 2 (an interval needs two pairs)")


def run_arms(db: RunsDB, target: Target, pool: Pool, arms: list[Arm], seeds: list[int], purpose: str,
             fidelity: str = "full", progress: Progress | None = None) -> dict[str, list[tuple[RunResult, str]]]:
    """Every arm on every seed, submitted seed by seed (arm 1, arm 2, ... then the next seed) so the
    runs of one seed share the machine's state of the moment. Returns label -> [(result, log)] in
    seed order; each result's provenance names the worker it ran on."""
    refs = []
    for seed in seeds:
        for arm in arms:
            spec = RunSpec(at_steps(target, fidelity, arm.steps), seed=seed, fidelity=fidelity, repo=db.repo_path,
                           commit=arm.commit, run_id=f"{purpose}-{arm.label}-s{seed}")
            refs.append((arm.label, seed, pool.submit(spec)))
    done: dict[tuple[str, int], tuple[RunResult, str]] = {}
    pending = {ref: (label, seed) for label, seed, ref in refs}
    if progress:
        progress(0, len(refs), "")
    while pending:
        for ref in pool.wait(list(pending)):
            label, seed = pending.pop(ref)
            finished = pool.get(ref)
            finished.result.provenance.setdefault("worker", finished.worker)
            done[(label, seed)] = (finished.result, finished.log_text)
            if progress:
                progress(len(refs) - len(pending), len(refs), f"{label} seed {seed}")
    return {arm.label: [done[(arm.label, s)] for s in seeds] for arm in arms}


def replay(db: RunsDB, target: Target, pool: Pool, commit: str, seeds: int, fidelity: str = "full",
           progress: Progress | None = None, steps: int | None = None, purpose: str | None = None,
           target_loss: float | None = None) -> Replay:
    """Run `commit` on `seeds` fresh seeds, each beside the base; record both as trials.

    `steps` runs the candidate at another step count than the base's own (record mode); the speed-up
    is then the record time's: each run's final time, the candidate's against the base's."""
    check_seeds(seeds)
    commit = db.resolve(commit)
    base = db.base_commit
    if commit == base:
        raise UserError(f"--commit {commit[:12]}: that is the base; replay a candidate")
    purpose = purpose or next_purpose(db)
    seed_list = judge.fresh_seeds(commit, purpose, 0, seeds)
    out = run_arms(db, target, pool, [Arm("cand", commit, steps), Arm("base", base)], seed_list, purpose, fidelity,
                   progress)
    cand = [r for r, _ in out["cand"]]
    base_runs = [r for r, _ in out["base"]]
    target_loss = target_loss if target_loss is not None else search_target_loss(db, target, fidelity)
    if target_loss is None:
        finals = [r.final.val_loss for r in base_runs if r.status == Status.OK and r.final]
        if not finals:
            raise UserError(f"{purpose}: no base run finished OK, so there is no target loss to judge by")
        target_loss = judge.choose_target_loss(finals)
    paired = pair_up(cand, base_runs)
    if steps is None:
        obs = paired.obs(target.objective, target_loss)
        sp = judge.speedup(target.objective, target_loss, obs, budget=budget_words(target, fidelity))
        gains, _ = judge.gains(target.objective, obs)
    else:  # record mode: the time each side took to its own last step
        obs = [(judge.Obs(c.final.train_ms), judge.Obs(b.final.train_ms))
               for c, b in zip(paired.candidate, paired.base, strict=True)]
        sp = judge.speedup("time_to_target", target_loss, obs)
        gains, _ = judge.gains("time_to_target", obs)
    pvalue = judge.pvalue(gains) if len(gains) >= 2 else None
    loss_p = judge.speedrun_pvalue([r.final.val_loss for r in paired.candidate], target_loss)
    n_steps = steps or target.steps(fidelity)

    title = db.message(commit).splitlines()[0]
    attrs = {"purpose": purpose, "seeds": seed_list, "speedup": sp.estimate, "speedup_text": sp.text(),
             "speedup_detail": sp.to_dict(), "pvalue": pvalue, "loss_pvalue": loss_p, "target_loss": target_loss,
             "trusted": paired.untrusted == 0, "steps": n_steps, "base_steps": target.steps(fidelity)}
    number = db.start_trial(commit, None, Who.REPLAY, title, Rung.CONFIRM, attrs)
    base_number = db.start_trial(base, None, Who.BASELINE, f"baseline beside {purpose} (trial {number})",
                                 Rung.CONFIRM, {"pairs_for": number, "purpose": purpose})
    for n, label in ((number, "cand"), (base_number, "base")):
        for result, log in out[label]:
            db.save_run(n, result, log_text=log)
    # As confirm records them: each side's mean objective over the pairs (the study minimises it).
    value = sum(c.value for c, _ in obs) / len(obs) if obs and len(paired.candidate) == len(cand) else None
    base_value = sum(b.value for _, b in obs) / len(obs) if obs else None
    db.finish_trial(number, value, cand, attrs, "complete" if value is not None else "fail")
    db.finish_trial(base_number, base_value, base_runs, {"pairs_for": number},
                    "complete" if base_value is not None else "fail")
    return Replay(commit, purpose, cand, base_runs, paired, target_loss, sp, pvalue, loss_p, number, base_number,
                  n_steps)


# -- record mode: the fewest steps that still reach the record target ------------------------


@dataclass
class RecordSearch:
    """Replays at decreasing step counts: the smallest that keeps the candidate's mean final loss at
    or below `target_loss` with p < 0.01, and the record time there against the base's at its own."""

    target_loss: float
    base_steps: int
    levels: list[Replay]
    steps: int | None  # the smallest passing count; None when even the full count fails

    @property
    def record(self) -> Replay | None:
        return next((r for r in self.levels if r.steps == self.steps), None)

    def lines(self) -> list[str]:
        out = [f"record target: mean final loss <= {self.target_loss:.4f} with p < 0.01 (the speedrun's rule)"]
        for r in self.levels:
            p = "n/a" if r.loss_pvalue is None else f"{r.loss_pvalue:.3g}"
            ok = "passes" if r.loss_pvalue is not None and r.loss_pvalue < 0.01 else "fails"
            out.append(f"  {r.steps} steps ({r.purpose}): p = {p}, {ok}")
        rec = self.record
        if rec is None:
            out.append(f"no record: the candidate misses the target at its full {self.base_steps} steps")
        else:
            out.append(f"record: {rec.steps} steps against the base's {self.base_steps}, same machine; record time: "
                       f"{rec.speedup.text()}")
            if self.levels[-1] is rec and rec.steps > 1:
                out.append("(every count tried passed: the level limit stopped the search, fewer steps may pass too)")
        return out

    def to_dict(self) -> dict:
        rec = self.record
        return {"target_loss": self.target_loss, "base_steps": self.base_steps, "steps": self.steps,
                "levels": [r.to_dict() for r in self.levels], "record": rec.to_dict() if rec else None}


def record_target(db: RunsDB, target: Target, fidelity: str = "full") -> float:
    """The target's own number, else the base's mean final loss (the speedrun's rule for a trainer
    without a published target, as 3.28 was llm.c's mean)."""
    if isinstance(target.target_loss, int | float):
        return float(target.target_loss)
    finals = [r.final.val_loss for r in db.baseline(fidelity) if r.final]
    if not finals:
        raise UserError(f"--record: no base run at {fidelity} to take the record target from; replay first")
    return sum(finals) / len(finals)


def record_search(db: RunsDB, target: Target, pool: Pool, commit: str, seeds: int, fidelity: str = "full",
                  shrink: float = 0.25, max_levels: int = 6, progress: Progress | None = None) -> RecordSearch:
    """Replay `commit` at the full count, then at counts `shrink` smaller each time, until one fails
    (or `max_levels` ran); the smallest passing count is the record's."""
    if not 0 < shrink < 1:
        raise UserError(f"--record-shrink {shrink}: give a fraction between 0 and 1")
    full = target.steps(fidelity)
    try:
        goal: float | None = record_target(db, target, fidelity)
    except UserError:
        goal = None  # no base run yet: the first level's (at the full count) give the mean
    levels: list[Replay] = []
    best, steps = None, full
    while len(levels) < max_levels and steps >= 1:
        # judged against the record target, not the search's screening one
        r = replay(db, target, pool, commit, seeds, fidelity, progress, steps=steps,
                   purpose=next_purpose(db, prefix="record"), target_loss=goal)
        if goal is None:
            goal = record_target(db, target, fidelity)
            r.target_loss = goal
            r.loss_pvalue = judge.speedrun_pvalue([x.final.val_loss for x in r.paired.candidate], goal)
        levels.append(r)
        if r.loss_pvalue is None or r.loss_pvalue >= 0.01:
            break
        best = steps
        nxt = int(steps * (1 - shrink))
        steps = nxt if nxt < steps else steps - 1
    found = RecordSearch(float(goal or math.nan), full, levels, best)
    db.set_state(RECORD_STATE + db.resolve(commit), found.to_dict())
    return found
