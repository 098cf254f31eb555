"""The fidelity ladder: where a candidate goes after a rung, given what it just did. Pure.

smoke (does it run) -> short (one seed, part of the steps) -> full (one seed) -> confirm (fresh
seeds, each run beside a baseline run with the same seed, until the sequential paired test of
`search_space.judge` answers). A candidate climbs only while it beats the baseline at the rung it
just ran; an untrusted measurement never enters confirm unless the settings allow it. A target
with a long declared start-up skips smoke (SearchSettings.smoke): short pays that start-up again
and answers "does it run" too.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.names import LADDER, Rung, Verdict
from search_space import judge
from search_space.judge import Obs
from search_space.records import RunResult, Status


@dataclass(frozen=True)
class Step:
    rung: str | None  # the rung to run next; None: the candidate leaves the ladder with `verdict`
    seeds: int = 0  # how many seeds (confirm: pairs) the next batch runs
    verdict: str = ""


def following(rung: str, ladder: tuple[str, ...]) -> str | None:
    """The rung after `rung` in `ladder` (`rung` itself may be one the ladder skips: smoke)."""
    later = [r for r in ladder if LADDER.index(r) > LADDER.index(rung)]
    return later[0] if later else None


def beats(speedup: judge.Speedup | None, min_speedup: float) -> bool:
    """Did a single-seed rung clear the screening bar? A ratio must reach `min_speedup` (a bar below
    1 lets a candidate that measured a little slower climb: screening is noisy); a loss difference
    (loss_at_budget) must be better, i.e. lower."""
    if speedup is None:
        return False
    if speedup.kind == "loss_at_budget":
        return speedup.better
    return speedup.estimate >= min_speedup


# Screening on a busy machine. One run's log time to the target varies by ~0.5 (sd) on this shared
# 2-core machine when other work comes and goes, two runs side by side by ~0.05-0.08 in their ratio:
# load is a common factor. When the base's own runs spread more than PAIR_SPREAD, each screening
# run (short, full) runs beside a base run and is judged by that pair's ratio, which costs a base
# run per screening run; below it (a quiet machine, sd ~0.03) the base's mean is the better yardstick.
# bench/ladder_cost.py measures both (recall and worker-seconds against confirming everything at full).
PAIR_SPREAD = 0.10
# A single pair's ratio still has a spread of several per cent: a true 5 % gain clears a bar of 1.0
# at both short and full only about half the time. At full, the last screen, a paired candidate
# within this factor of the bar still goes on to confirm, where the sequential test decides.
PAIRED_FULL_SLACK = 0.97


def screen_paired(spread: float, workers: int, packed: bool = False) -> bool:
    """Should screening rungs run beside a base partner? `spread`: sd of the base's log objective
    over its recent runs (Baselines.spread); a pair needs two workers at once. Runs packed on one
    GPU (`[resources] pack`) always pair: a run's speed there depends on what shares the GPU with it,
    and the base's first runs, all started together, share it only with each other, so their small
    spread says nothing of the mixes later runs meet (issue #11: a candidate and the base runs it is
    compared with share the same packing)."""
    return workers >= 2 and (packed or spread > PAIR_SPREAD)


def screen_bar(rung: str, min_speedup: float, paired: bool) -> float:
    """The ratio a screening rung must reach (`beats`)."""
    return min_speedup * PAIRED_FULL_SLACK if paired and rung == Rung.FULL else min_speedup


def after_rung(rung: str, ladder: tuple[str, ...], ok: bool, won_rung: bool, *, trusted: bool = True,
               allow_untrusted: bool = False, first_batch: int = 3) -> Step:
    """After smoke, short or full: `ok` every run finished; `won_rung` it beat the baseline there."""
    if not ok:
        return Step(None, verdict=Verdict.STOPPED)
    nxt = following(rung, ladder)
    if rung != Rung.SMOKE and not won_rung:
        return Step(None, verdict=Verdict.STOPPED)
    if nxt is None:
        return Step(None, verdict=Verdict.UNCONFIRMED)
    if nxt == Rung.CONFIRM:
        if not trusted and not allow_untrusted:
            return Step(None, verdict=Verdict.UNTRUSTED)
        return Step(Rung.CONFIRM, first_batch)
    return Step(nxt, 1)


def after_confirm(kind: str, pairs: list[tuple[Obs, Obs]], alpha: float, max_pairs: int = judge.MAX_PAIRS,
                  add: int = 2, min_pairs: int = judge.MIN_PAIRS) -> Step:
    """After a confirm batch: the sequential test's answer, or how many more pairs to run.

    `pairs` in the order their seeds were drawn. The test is asked once per pair count, on each
    prefix in turn (what a one-pair-at-a-time search would have asked), so a batch of several
    pairs skips no look and wastes none of its alpha; an earlier prefix can only have said "more".
    """
    answer = "more"
    for n in range(1, len(pairs) + 1):
        answer = judge.decide(kind, pairs[:n], alpha, max_pairs, min_pairs=min_pairs)
        if answer != "more":
            break
    if answer == "more" and len(pairs) < max_pairs:
        return Step(Rung.CONFIRM, max(1, min(add, max_pairs - len(pairs), max(add, min_pairs - len(pairs)))),
                    Verdict.MORE)
    return Step(None, verdict=Verdict.PASS if answer == "pass" else Verdict.FAIL)


def confirm_pairs(runs: list[RunResult], paired: dict[int, RunResult], kind: str, target_loss: float,
                  order: list[int]) -> tuple[list[tuple[Obs, Obs]], int]:
    """(candidate, baseline) objectives per seed in the order the seeds were drawn, formed only
    where both ran OK on one node; and how many seeds could not be paired. Across nodes raw times
    are never compared."""
    pairs, lost = [], 0
    by_seed = {r.seed: r for r in runs}
    for c in (by_seed[s] for s in order if s in by_seed):
        b = paired.get(c.seed)
        node = str(c.provenance.get("worker", "")).split("/")[0]
        if b is None or b.status != Status.OK or node != str(b.provenance.get("worker", "")).split("/")[0]:
            lost += 1
            continue
        co, bo = judge.run_objective(kind, c.curve, target_loss), judge.run_objective(kind, b.curve, target_loss)
        if co is None or bo is None:
            lost += 1
            continue
        pairs.append((co, bo))
    return pairs, lost
