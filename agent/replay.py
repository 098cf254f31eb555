"""Replay a candidate with fresh seeds, each run beside a base run with the same seed.

The k-th replay of a search draws `fresh_seeds(commit, "replay-k")`: the counter lives in the
study's state and is taken before anything runs, so a second replay (or one after a crash) never
repeats an earlier one's seeds, nor confirm's. Runs are submitted candidate, base, candidate,
base, ... so each pair shares the machine's state of the moment, and a pair counts only when
both finished OK on the same node. What it reports is the one speed-up (`judge.speedup`, the same
words as everywhere else) and, for the record, the speedrun's t-test of mean final loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.names import Rung, Who
from env.evaluate import RunSpec
from env.pool import Pool
from runs_db.db import RunsDB
from runs_db.pairs import Paired, budget_words, pair_up, search_target_loss
from search_space import judge
from search_space.records import RunResult, Status
from search_space.target import Target

REPLAYS_KEY = "replays"  # study state: how many replays this search has started


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

    @property
    def trusted(self) -> bool:
        return self.paired.untrusted == 0

    def lines(self) -> list[str]:
        out = [f"{self.purpose} of {self.commit[:10]}: {self.speedup.text()}"]
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


def next_purpose(db: RunsDB) -> str:
    """Take the next replay number from the study's state."""
    k = int(db.get_state(REPLAYS_KEY, 0) or 0) + 1
    db.set_state(REPLAYS_KEY, k)
    return f"replay-{k}"


def replay(db: RunsDB, target: Target, pool: Pool, commit: str, seeds: int, fidelity: str = "full") -> Replay:
    commit = db.resolve(commit)
    base = db.base_commit
    purpose = next_purpose(db)
    seed_list = judge.fresh_seeds(commit, purpose, 0, seeds)
    refs = []
    for seed in seed_list:
        for who in (commit, base):  # interleaved: the pair shares the machine's state of the moment
            refs.append((who, pool.submit(RunSpec(target, seed=seed, fidelity=fidelity, repo=db.repo_path,
                                                  commit=who, run_id=f"{purpose}-{who[:8]}-s{seed}"))))
    runs: dict[str, list[tuple[RunResult, str]]] = {commit: [], base: []}
    for who, ref in refs:
        finished = pool.get(ref)
        finished.result.provenance.setdefault("worker", finished.worker)
        runs[who].append((finished.result, finished.log_text))
    cand = [r for r, _ in runs[commit]]
    base_runs = [r for r, _ in runs[base]]
    target_loss = search_target_loss(db, target, fidelity)
    if target_loss is None:
        target_loss = judge.choose_target_loss([r.final.val_loss for r in base_runs if r.status == Status.OK])
    paired = pair_up(cand, base_runs)
    obs = paired.obs(target.objective, target_loss)
    sp = judge.speedup(target.objective, target_loss, obs, budget=budget_words(target, fidelity))
    gains, _ = judge.gains(target.objective, obs)
    pvalue = judge.pvalue(gains) if len(gains) >= 2 else None
    loss_p = judge.speedrun_pvalue([r.final.val_loss for r in paired.candidate], target_loss)

    title = db.message(commit).splitlines()[0]
    attrs = {"purpose": purpose, "seeds": seed_list, "speedup": sp.estimate, "speedup_text": sp.text(),
             "speedup_detail": sp.to_dict(), "pvalue": pvalue, "loss_pvalue": loss_p, "target_loss": target_loss,
             "trusted": paired.untrusted == 0}
    number = db.start_trial(commit, None, Who.REPLAY, title, Rung.CONFIRM, attrs)
    base_number = db.start_trial(base, None, Who.BASELINE, f"baseline beside {purpose} (trial {number})",
                                 Rung.CONFIRM, {"pairs_for": number, "purpose": purpose})
    for n, who in ((number, commit), (base_number, base)):
        for result, log in runs[who]:
            db.save_run(n, result, log_text=log)
    # As confirm records them: each side's mean objective over the pairs (the study minimises it).
    value = sum(c.value for c, _ in obs) / len(obs) if obs and len(paired.candidate) == len(cand) else None
    base_value = sum(b.value for _, b in obs) / len(obs) if obs else None
    db.finish_trial(number, value, cand, attrs, "complete" if value is not None else "fail")
    db.finish_trial(base_number, base_value, base_runs, {"pairs_for": number},
                    "complete" if base_value is not None else "fail")
    return Replay(commit, purpose, cand, base_runs, paired, target_loss, sp, pvalue, loss_p, number, base_number)
