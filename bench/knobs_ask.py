"""The knobs sampler's ask as the search's running trials pile up (issue #8).

A knob trial stays RUNNING until its candidate leaves the ladder, so a 64-worker search holds
hundreds at once. Optuna's ask on a study in the search's storage (SQLite here) reads every RUNNING
trial at each draw; `KnobsProposer` draws from a copy of the study in memory and writes each trial
to the record once (agent/proposers/knobs.py). Both are driven alike, side by side: `--asks` asks,
one in three told COMPLETE at once, the rest left running, with the median ask time of the last
50 at each hundred.

    python -m bench.knobs_ask [--asks 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from rich.console import Console
from rich.table import Table

from agent.proposal import Outcome, ProposalContext
from agent.proposers.knobs import STARTUP, KnobsProposer
from tests.toy import make_toy


def _median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs[-50:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--asks", type=int, default=300)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-knobs-"))
    toy = make_toy(tmp / "toy", gpus=1)
    dists = {k.name: k.distribution() for k in toy.knobs}
    record = optuna.create_study(storage=f"sqlite:///{tmp / 'record.db'}", study_name="record",
                                 sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=STARTUP))
    proposer = KnobsProposer(toy.knobs, f"sqlite:///{tmp / 'copy.db'}", "copy", seed=0)
    ctx = ProposalContext(target=toy, parent="p", files={})
    on_record, via_copy, rows = [], [], []
    for i in range(args.asks):
        t = time.perf_counter()
        trial = record.ask(dists)
        on_record.append(time.perf_counter() - t)
        t = time.perf_counter()
        proposal = proposer.propose(ctx)
        via_copy.append(time.perf_counter() - t)
        if i % 3 == 0:
            score = 0.5 + (i % 7) / 10
            record.tell(trial, score)
            proposer.tell(proposal, Outcome("full", "ok", score, score, final=True))
        if (i + 1) % 100 == 0:
            rows.append((i + 1, proposer.running(), _median_ms(on_record), _median_ms(via_copy)))
    first, last = rows[0], rows[-1]
    flat = last[3] <= 2 * first[3]
    table = Table(title="the knobs sampler's ask, by trials still running (median of the last 50 asks)")
    for col in ("asks", "running", "ask on the record (ms)", "KnobsProposer.propose (ms)", "goal"):
        table.add_column(col, justify="right")
    for n, running, rec, copy in rows:
        goal = ""
        if (n, running) == last[:2]:
            goal = f"propose flat (<= 2x its first figure) {'PASS' if flat else 'FAIL'}"
        table.add_row(str(n), str(running), f"{rec:.1f}", f"{copy:.1f}", goal)
    Console().print(table)
    raise SystemExit(0 if flat else 1)


if __name__ == "__main__":
    main()
