"""Does the search learn? The real learners on a synthetic target with a known landscape.

Knobs: the real KnobsProposer (Optuna TPE, told as the loop tells it: an intermediate value at
short, then COMPLETE with the score at the highest rung) on three knobs whose score is a known bowl
with its optimum 1.0, against the same class with a uniform random sampler. Trials to get within
2 % of the optimum, median over 20 search seeds. Results arrive late, as in the loop: a proposal
is told only after DELAY later proposals were asked.

Bandit: the real Policy over three arms whose candidates win (improve on their parent) 20 %, 10 %
and 5 % of the time, rewards delayed the same way. The share of proposals given to the 20 % arm
in trials 61 to 120, median over 20 search seeds.

    python -m bench.learning [--seeds 20]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from collections import deque

import optuna
from rich.console import Console
from rich.table import Table

from agent.names import Rung
from agent.policy import Policy
from agent.proposal import Outcome, ProposalContext
from agent.proposers.knobs import KnobsProposer
from search_space.knobs import Knob

DELAY = 12  # proposals asked before a result comes back (the loop keeps ~1.5 x workers ahead)
KNOBS = (Knob("lr", "float", 1e-4, 1e-1, log=True), Knob("warmup", "float", 0.0, 0.5),
         Knob("wd", "float", 1e-5, 1e-1, log=True))
RATES = {"llm:strong": 0.20, "ideas": 0.10, "knobs": 0.05}


def landscape(p: dict) -> float:
    """A bowl: 1.0 at lr 3e-3, warmup 0.1, wd 1e-3; 1.6 to 2.5 at the corners of the box: the
    learning rate matters most, weight decay least, as in a real trainer."""
    return (1.0 + 0.25 * (math.log10(p["lr"]) - math.log10(3e-3)) ** 2 + 3.0 * (p["warmup"] - 0.1) ** 2
            + 0.08 * (math.log10(p["wd"]) - math.log10(1e-3)) ** 2)


def knobs_trials(seed: int, sampler: str, cap: int = 1500) -> int:
    """Trials until a told score is within 2 % of the optimum (cap when never)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    kp = KnobsProposer(KNOBS, None, f"bench-{sampler}-{seed}", seed=seed)
    if sampler == "random":
        kp.study.sampler = optuna.samplers.RandomSampler(seed=seed)
    rng = random.Random(seed)
    ctx = ProposalContext(target=None, parent="base", files={})  # type: ignore[arg-type]
    waiting: deque = deque()
    for i in range(1, cap + 1):
        p = kp.propose(ctx)
        score = landscape(p.knobs) * (1 + rng.gauss(0, 0.003))  # a little run-to-run noise
        waiting.append((p, score))
        if score <= 1.02:
            return i
        if len(waiting) > DELAY:
            q, s = waiting.popleft()
            kp.tell(q, Outcome(Rung.SHORT, "ok", s, s))
            kp.tell(q, Outcome(Rung.SHORT, "ok", s, s, final=True, verdict="stopped"))
    return cap


def bandit_share(seed: int, n: int = 60, after: int = 60) -> float:
    policy = Policy(list(RATES), seed=seed)
    rng = random.Random(seed + 1)
    waiting: deque = deque()
    picks = []
    for _ in range(n + after):
        arm = policy.choose_arm()
        picks.append(arm)
        waiting.append((arm, rng.random() < RATES[arm]))
        if len(waiting) > DELAY:
            policy.reward(*waiting.popleft())
    tail = picks[n:]
    return tail.count("llm:strong") / len(tail)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    tpe = [knobs_trials(s, "tpe") for s in range(args.seeds)]
    rnd = [knobs_trials(s, "random") for s in range(args.seeds)]
    share = [bandit_share(s) for s in range(args.seeds)]
    m_tpe, m_rnd, m_share = statistics.median(tpe), statistics.median(rnd), statistics.median(share)
    table = Table(title=f"learning on a synthetic target, median over {args.seeds} search seeds, "
                        f"results {DELAY} proposals late")
    for col in ("figure", "value", "goal"):
        table.add_column(col)
    table.add_row("knobs: TPE trials to within 2 % of the optimum", f"{m_tpe:.0f}", "")
    table.add_row("knobs: uniform random trials to the same", f"{m_rnd:.0f}", "")
    table.add_row("knobs: TPE / random", f"{m_tpe / m_rnd:.2f}",
                  "<= 0.50 " + ("PASS" if m_tpe <= 0.5 * m_rnd else "FAIL"))
    table.add_row("bandit: share of trials 61-120 to the 20 % arm (arms 20/10/5 %)", f"{100 * m_share:.0f} %",
                  ">= 60 % " + ("PASS" if m_share >= 0.6 else "FAIL"))
    table.add_row("bandit: worst seed's share", f"{100 * min(share):.0f} %", "")
    Console().print(table)


if __name__ == "__main__":
    main()
