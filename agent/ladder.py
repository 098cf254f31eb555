"""The fidelity ladder: which rung a candidate climbs to next, given what it just did.

smoke (does it run) -> short (one seed, part of the steps) -> full (one seed) -> confirm (seeds added
sequentially until the speedrun's t-test answers). A candidate climbs only while it beats the
baseline at the rung it just ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from env.stats import decide
from search_space.records import RunResult, Status

CONFIRM_SEED0 = 1000  # confirm seeds are never the seeds of the single-seed rungs or of the baseline
ADD_SEEDS = 2


@dataclass(frozen=True)
class Next:
    rung: str | None  # None: the candidate stops here
    seeds: tuple[int, ...] = ()
    extend: bool = False  # True: add `seeds` to the same confirm trial
    verdict: str = ""  # for confirm: pass | fail | more


def next_rung(rung: str, ladder: tuple[str, ...], results: list[RunResult], speedup: float, min_speedup: float,
              target_loss: float, seeds: int, max_seeds: int) -> Next:
    if not results or any(r.status != Status.OK for r in results):
        return Next(None)
    following = ladder[ladder.index(rung) + 1] if ladder.index(rung) + 1 < len(ladder) else None
    if rung == "smoke":
        return Next(following, (0,))
    if rung in ("short", "full"):
        if speedup <= min_speedup or following is None:
            return Next(None)
        if following == "confirm":
            return Next("confirm", tuple(range(CONFIRM_SEED0, CONFIRM_SEED0 + seeds)))
        return Next(following, (0,))
    losses = [r.final.val_loss for r in results]
    verdict = decide(losses, target_loss, max_seeds=max_seeds)
    if verdict == "more":
        start = CONFIRM_SEED0 + len(results)
        return Next("confirm", tuple(range(start, start + min(ADD_SEEDS, max_seeds - len(results)))), True, "more")
    return Next(None, verdict=verdict)
