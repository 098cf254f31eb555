"""Replay a candidate with more seeds, interleaved with the base on the same workers.

Each seed runs the candidate and the base side by side, so the timing ratio is paired and
measured on one machine; the final losses give the speedrun's one-sided t-test.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.baseline import build_baseline
from env.evaluate import RunSpec
from env.pool import Pool
from env.stats import Ratio, loss_pvalue, timing_ratio
from runs_db.db import RunsDB
from search_space.records import RunResult, Status
from search_space.target import Target

REPLAY_SEED0 = 2000


@dataclass
class Replay:
    commit: str
    candidate: list[RunResult]
    base: list[RunResult]
    target_loss: float
    pvalue: float
    ratio: Ratio | None
    trial: int
    base_trial: int


def replay(db: RunsDB, target: Target, pool: Pool, commit: str, seeds: int, fidelity: str = "full") -> Replay:
    commit = db.resolve(commit)
    base = db.base_commit
    refs = []
    for i in range(seeds):
        seed = REPLAY_SEED0 + i
        for who in (commit, base):  # interleaved: the pair shares the machine's state of the moment
            refs.append((who, pool.submit(RunSpec(target, seed=seed, fidelity=fidelity, repo=db.repo_path,
                                                  commit=who, run_id=f"replay-{who[:8]}-s{seed}"))))
    runs: dict[str, list[tuple[RunResult, str]]] = {commit: [], base: []}
    for who, ref in refs:
        finished = pool.get(ref)
        runs[who].append((finished.result, finished.log_text))
    title = db.message(commit).splitlines()[0]
    number = db.start_trial(commit, None, "replay", title, "confirm", {"replay_seeds": seeds})
    base_number = db.start_trial(base, None, "replay-baseline", "baseline (replay)", "confirm", {})
    for n, who in ((number, commit), (base_number, base)):
        for result, log in runs[who]:
            db.save_run(n, result, log_text=log)
    cand = [r for r, _ in runs[commit]]
    base_runs = [r for r, _ in runs[base]]
    ok_base = [r for r in base_runs if r.status == Status.OK]
    recorded = db.baseline(fidelity)
    target_loss = build_baseline(target, fidelity, recorded or ok_base).target_loss
    ok = [r for r in cand if r.status == Status.OK]
    pvalue = loss_pvalue([r.final.val_loss for r in ok], target_loss) if len(ok) >= 2 else 1.0
    pairs = [(c, b) for c, b in zip(cand, base_runs, strict=True) if c.status == Status.OK and b.status == Status.OK]
    ratio = timing_ratio([c.final.train_ms for c, _ in pairs], [b.final.train_ms for _, b in pairs]) if pairs else None
    attrs = {"pvalue": pvalue, "target_loss": target_loss,
             "time_ratio": ratio.ratio if ratio else None,
             "time_ratio_ci": [ratio.low, ratio.high] if ratio else None}
    mean_ms = sum(c.final.train_ms for c, _ in pairs) / len(pairs) if pairs else None
    db.finish_trial(number, mean_ms if len(ok) == len(cand) and mean_ms else None, cand, attrs,
                    "complete" if len(ok) == len(cand) and mean_ms else "fail")
    base_ms = [r.final.train_ms for r in ok_base]
    db.finish_trial(base_number, sum(base_ms) / len(base_ms) if base_ms else None, base_runs, {},
                    "complete" if len(ok_base) == len(base_runs) and base_ms else "fail")
    return Replay(commit, cand, base_runs, target_loss, pvalue, ratio, number, base_number)
