"""What the ladder saves: worker-seconds of smoke -> short -> full -> confirm against confirming
every candidate directly at `full`, under the same confirmation rule, and which winners each finds.

A simulation through the loop's own decision code (agent.ladder: after_rung, beats, after_confirm;
search_space.judge: speedup, decide, OnlineFDR). Candidates are drawn with known true speed-ups:
most change little or slow the run, a few are real gains; 10 % crash at their first run. A run's
objective (time to the target loss) gets log-normal noise with the spread of the recorded tinygpt
CPU baseline runs in bench/results/, and costs the worker-seconds of a tinygpt run of that
fidelity (start-up plus its share of the full run's steps, from the same records).

    python -m bench.ladder_cost [--candidates 400] [--searches 5]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent import ladder
from agent.names import LADDER, Rung, Verdict
from search_space import judge
from search_space.judge import Obs
from search_space.records import Point

RESULTS = Path(__file__).parent / "results"
STARTUP_S = 3.0  # python + torch import + data before step 0 (tinygpt on this machine)
STEPS = {Rung.SMOKE: 5, Rung.SHORT: 75, Rung.FULL: 300}  # tinygpt's fidelities


def recorded() -> tuple[float, float]:
    """(sd of log time-to-target over the recorded baseline seeds, a full run's worker-seconds)."""
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("tinygpt_cpu_full_s*.json"))]
    curves = [[Point(int(s), float(v), float(t)) for s, v, t in r["curve"]] for r in runs if r["status"] == "ok"]
    target = judge.choose_target_loss([c[-1].val_loss for c in curves])
    obs = [judge.run_objective("time_to_target", c, target) for c in curves]
    logs = [math.log(o.value) for o in obs if o and not o.censored]
    return statistics.stdev(logs), statistics.median(r["wall_s"] for r in runs)


def cost(rung: str, full_s: float) -> float:
    return STARTUP_S + (full_s - STARTUP_S) * STEPS[Rung.FULL if rung == Rung.CONFIRM else rung] / STEPS[Rung.FULL]


def draw(rng: random.Random, n: int) -> list[tuple[float, bool]]:
    """(true log speed-up, crashes): 70 % slower or no better, 20 % no change, 10 % real gains of 5-30 %."""
    out = []
    for _ in range(n):
        u = rng.random()
        gain = -abs(rng.gauss(0, 0.15)) if u < 0.7 else (0.0 if u < 0.9 else math.log(rng.uniform(1.05, 1.3)))
        out.append((gain, rng.random() < 0.1))
    return out


def confirm(rng: random.Random, gain: float, sd: float, fdr: judge.OnlineFDR, full_s: float) -> tuple[bool, float]:
    """The loop's confirm on one candidate: pairs added until the sequential test answers."""
    alpha, pairs, spent = fdr.next_alpha(), [], 0.0
    batch = 3
    while True:
        for _ in range(batch):
            base = 1000.0 * math.exp(rng.gauss(0, sd))
            pairs.append((Obs(1000.0 * math.exp(-gain + rng.gauss(0, sd))), Obs(base)))
            spent += 2 * cost(Rung.CONFIRM, full_s)
        step = ladder.after_confirm("time_to_target", pairs, alpha)
        if step.rung is None:
            fdr.record(step.verdict == Verdict.PASS)
            return step.verdict == Verdict.PASS, spent
        batch = step.seeds


def single(rng: random.Random, gain: float, sd: float) -> judge.Speedup:
    """A single-seed rung against the baseline's mean (its own noise is averaged away)."""
    return judge.speedup("time_to_target", 2.0, [(Obs(1000.0 * math.exp(-gain + rng.gauss(0, sd))), Obs(1000.0))])


def search(seed: int, n: int, sd: float, full_s: float) -> dict:
    cands = draw(random.Random(seed), n)
    out = {"ladder_s": 0.0, "full_s": 0.0, "ladder_wins": set(), "full_wins": set(),
           "real": {i for i, (g, crash) in enumerate(cands) if g > 0 and not crash}}
    rng_l, rng_f = random.Random(seed + 1), random.Random(seed + 2)
    fdr_l, fdr_f = judge.OnlineFDR(0.05), judge.OnlineFDR(0.05)
    for i, (gain, crash) in enumerate(cands):
        rung = Rung.SMOKE  # the ladder
        while rung != Rung.CONFIRM:
            out["ladder_s"] += cost(rung, full_s) if not crash else STARTUP_S
            won = rung != Rung.SMOKE and ladder.beats(single(rng_l, gain, sd), 1.0)
            step = ladder.after_rung(rung, LADDER, not crash, won)
            if step.rung is None:
                break
            rung = step.rung
        if rung == Rung.CONFIRM:
            passed, spent = confirm(rng_l, gain, sd, fdr_l, full_s)
            out["ladder_s"] += spent
            if passed:
                out["ladder_wins"].add(i)
        if crash:  # every candidate at full: a crash costs its start-up, the rest confirm directly
            out["full_s"] += STARTUP_S
            continue
        passed, spent = confirm(rng_f, gain, sd, fdr_f, full_s)
        out["full_s"] += spent
        if passed:
            out["full_wins"].add(i)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=400)
    ap.add_argument("--searches", type=int, default=5)
    args = ap.parse_args()
    sd_rec, full_s = recorded()
    table = Table(title=f"ladder vs every candidate confirmed at full: {args.searches} searches of {args.candidates} "
                        f"candidates each, tinygpt costs (full run {full_s:.1f} s)")
    for col in ("noise (sd of log time to target)", "figure", "value", "goal"):
        table.add_column(col)
    # the recorded CPU runs (a shared, busy machine), and a quiet machine's spread
    for label, sd in ((f"recorded tinygpt CPU {sd_rec:.3f}", sd_rec), ("quiet machine 0.030", 0.03)):
        runs = [search(s, args.candidates, sd, full_s) for s in range(args.searches)]
        ratio = statistics.median(r["ladder_s"] / r["full_s"] for r in runs)
        lw = sum(len(r["ladder_wins"]) for r in runs)
        fw = sum(len(r["full_wins"]) for r in runs)
        both = sum(len(r["ladder_wins"] & r["full_wins"]) for r in runs)
        false_l = sum(len(r["ladder_wins"] - r["real"]) for r in runs)
        false_f = sum(len(r["full_wins"] - r["real"]) for r in runs)
        table.add_row(label, "worker-seconds, ladder / all at full (median)", f"{100 * ratio:.1f} %",
                      "<= 40 % " + ("PASS" if ratio <= 0.4 else "FAIL"))
        table.add_row("", "worker-hours per search, ladder / all at full",
                      f"{statistics.median(r['ladder_s'] for r in runs) / 3600:.1f} / "
                      f"{statistics.median(r['full_s'] for r in runs) / 3600:.1f}", "")
        table.add_row("", "real gains among the candidates", f"{sum(len(r['real']) for r in runs)}", "")
        table.add_row("", "confirmed: ladder / all at full / both", f"{lw} / {fw} / {both}", "same winners")
        table.add_row("", "false winners: ladder / all at full", f"{false_l} / {false_f}", "")
    Console().print(table)


if __name__ == "__main__":
    main()
