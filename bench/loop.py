"""Controller overhead and worker utilisation of the search loop, with a trainer that only sleeps.

    python -m bench.loop [--trials 500] [--workers 8] [--sleep 0.05]

A local Ray cluster with logical GPUs (one per worker), the toy trainer (tests/toy.py) whose runs
last `sleep` x steps, the default proposers (ideas, knobs). Reports the controller's time per
trial (commit, Optuna, git notes, artifacts, scheduling: everything the loop does for a trial),
and how busy the workers were between the first run's start and the last dispatch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from rich.console import Console
from rich.table import Table

from agent.live import Live
from agent.loop import Search
from agent.runner import build_proposers, open_search
from agent.settings import SearchSettings
from env.pool import Pool
from tests.toy import make_toy


def busy_fraction(spans: list[tuple[float, float]], workers: int, until: float | None = None) -> float:
    start = min(s for s, *_ in spans)
    end = until or max(e for _, e, *_ in spans)
    busy = sum(max(0.0, min(e, end) - max(s, start)) for s, e, *_ in spans)
    return busy / (workers * (end - start))


def slot_gaps(spans: list[tuple[float, float, str]]) -> list[float]:
    """Per worker slot: the time from one run's end to the next run's start there."""
    by_slot: dict[str, list[tuple[float, float]]] = {}
    for s, e, slot in spans:
        by_slot.setdefault(slot, []).append((s, e))
    out = []
    for runs in by_slot.values():
        runs.sort()
        out += [b[0] - a[1] for a, b in zip(runs, runs[1:], strict=False)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--sleep", type=float, default=0.25, help="seconds per trainer step (runs of 0.5 to 4 s)")
    args = ap.parse_args()
    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    toy = make_toy(tmp / "toy", gpus=1, sleep=args.sleep, full=16, short=8, timeout_s=60)
    ray.init(num_cpus=args.workers, num_gpus=args.workers, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    settings = SearchSettings(target=str(toy.source), proposers=("ideas", "knobs"), workers=args.workers,
                              budget_trials=args.trials, seeds=2, max_seeds=4)
    db, settings = open_search(tmp / "search", settings)
    pool = Pool(run_root=tmp / "runs")
    pool.warm_up(args.workers, cpus=1, gpus=1)  # worker processes start once per cluster, not per search
    with db:
        search = Search(db, toy, settings, pool, build_proposers(settings, toy, db), Live(enabled=False))
        t0 = time.time()
        with console.status(f"{args.trials} trials on {args.workers} logical GPUs"):
            summary = search.run()
        wall = time.time() - t0
    ray.shutdown()
    meter = search.meter
    per_trial = np.array(list(meter.controller_s.values())) * 1000
    run_s = [e - s for s, e, *_ in meter.spans]
    last_start = max(s for s, *_ in meter.spans)
    gaps = np.array(slot_gaps(meter.spans)) * 1000
    busy_steady = busy_fraction(meter.spans, args.workers, last_start)
    table = Table(title=f"search loop, {args.workers} logical GPU workers, sleeping trainer ({args.sleep}s/step)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("goal")
    rows = [
        ("trials (candidate + baseline)", f"{len(per_trial)}", ""),
        ("runs", f"{len(meter.spans)}", ""),
        ("wall time", f"{wall:.1f} s", ""),
        ("median run length", f"{statistics.median(run_s):.3f} s", ""),
        ("controller per trial, median", f"{np.median(per_trial):.1f} ms",
         "< 50 ms " + ("PASS" if np.median(per_trial) < 50 else "FAIL")),
        ("controller per trial, p90", f"{np.percentile(per_trial, 90):.1f} ms", ""),
        ("controller main thread, total / trial", f"{1000 * meter.busy_s / max(1, len(per_trial)):.1f} ms", ""),
        ("recorder thread (database writes) / trial",
         f"{1000 * search.recorder.busy_s / max(1, len(per_trial)):.1f} ms",
         ""),
        ("workers busy, until the last dispatch", f"{100 * busy_steady:.2f} %",
         ">= 98 % " + ("PASS" if busy_steady >= 0.98 else "FAIL")),
        ("workers busy, whole run", f"{100 * busy_fraction(meter.spans, args.workers):.2f} %", ""),
        ("gap between runs on a slot, median / p90", f"{np.median(gaps):.0f} / {np.percentile(gaps, 90):.0f} ms", ""),
        ("free slot-seconds: nothing runnable / runnable waiting",
         f"{meter.idle.get('starved', 0):.1f} / {meter.idle.get('lag', 0):.1f}", ""),
        ("best speed-up found", f"{summary.best_speedup:.2f}x ({summary.best_rung})", ""),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
