"""Controller overhead and worker utilisation of the search loop, with a trainer that only sleeps.

    python -m bench.loop [--trials 1000] [--workers 64] [--run-s 2]

A local Ray cluster with logical GPUs (one per worker), the toy trainer (tests/toy.py) whose full
runs sleep `run-s` seconds (16 steps; short 8, smoke 2), the default proposers (ideas, knobs),
confirm allowed for the untrusted toy so its paired runs load the pool too. Reports the
controller's time per trial (scheduling on the loop's thread; Optuna, git notes and artifacts on
the recorder's; git commits on the committer's), and how busy the workers were between the
first run's start and the last dispatch, counting only the trainer's own active time (its last
logged train_time), and, as a check that every learner was told, the knobs sampler's trials left
RUNNING (goal 0). `--profile N` adds the loop thread's N costliest functions and its SQL statements
by the agent/ line that asked for them (issue #8: none per trial, only at the start and the stop).
"""

from __future__ import annotations

import argparse
import cProfile
import faulthandler
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import ray
from rich.console import Console
from rich.table import Table
from sqlalchemy import event
from sqlalchemy.engine import Engine

from agent.live import Live
from agent.loop import Search
from agent.runner import build_proposers, open_search
from agent.settings import SearchSettings
from env.pool import Pool
from env.volume import free_under
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


def _handoff(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    return f"{1000 * np.median(xs):.0f} / {1000 * np.percentile(xs, 90):.0f} ms / {sum(xs):.1f} s"


class LoopQueries:
    """SQL statements run on the loop's (main) thread, by the innermost agent/ line that asked for
    them (and the runs_db/ line under it): where the database still costs the loop time (--profile)."""

    def __init__(self) -> None:
        self.sites: Counter[str] = Counter()
        self.at_stop = 0  # of them, run by Search._stop (the last words to the proposers, after the runs)
        self.main = threading.main_thread()
        event.listen(Engine, "before_cursor_execute", self._seen)

    def _seen(self, *_args) -> None:
        if threading.current_thread() is not self.main:
            return
        try:  # never raise into the statement: a caller may take the error for the database's own
            self.at_stop += any(f.f_code.co_name == "_stop" and f.f_code.co_filename.endswith("agent/loop.py")
                                for f in _frames(sys._getframe(1)))
            inner, frame = "", sys._getframe(1)
            while frame is not None:  # a walk of frames, not traceback's: no source lines read per query
                name = frame.f_code.co_filename
                if "/runs_db/" in name and not inner:
                    inner = self._short(frame)
                if "/agent/" in name:
                    self.sites[self._short(frame) + (f" <- {inner}" if inner else "")] += 1
                    return
                frame = frame.f_back
            self.sites[inner or "elsewhere"] += 1
        except Exception as e:
            self.sites[f"(not attributed: {type(e).__name__})"] += 1

    @staticmethod
    def _short(frame) -> str:
        """agent/loop.py:583 run: the file's folder and name, the line, the function."""
        folder, name = os.path.split(frame.f_code.co_filename)
        return f"{os.path.basename(folder)}/{name}:{frame.f_lineno} {frame.f_code.co_name}"

    def close(self) -> None:
        event.remove(Engine, "before_cursor_execute", self._seen)

    def print(self, trials: int) -> None:
        total = sum(self.sites.values())
        print(f"SQL statements on the loop's thread: {total} ({total / max(1, trials):.1f} per trial); "
              f"{self.at_stop} of them at the stop (Search._stop), {total - self.at_stop} before it "
              f"({(total - self.at_stop) / max(1, trials):.1f} per trial)")
        for site, n in self.sites.most_common(15):
            print(f"  {n:6d}  {n / max(1, trials):6.2f}/trial  {site}")


def _frames(frame):
    while frame is not None:
        yield frame
        frame = frame.f_back


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--run-s", type=float, default=2.0, help="seconds a full run sleeps (16 steps)")
    ap.add_argument("--cold", action="store_true", help="no warm slots: every run starts from nothing")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile the loop's main thread; print its N most costly functions (own time)")
    ap.add_argument("--dump-after", type=float, default=0, metavar="S",
                    help="print every thread's stack after S seconds (a run that hangs says where)")
    args = ap.parse_args()
    if args.dump_after:
        faulthandler.dump_traceback_later(args.dump_after, repeat=False, file=sys.stderr)
    args.sleep = args.run_s / 16
    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    toy = make_toy(tmp / "toy", gpus=1, sleep=args.sleep, full=16, short=8, timeout_s=120)
    ray.init(num_cpus=args.workers, num_gpus=args.workers, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    settings = SearchSettings(target=str(toy.source), proposers=("ideas", "knobs"), workers=args.workers,
                              budget_trials=args.trials, seeds=3, allow_untrusted=True)
    db, settings = open_search(tmp / "search", settings)
    pool = Pool(run_root=tmp / "runs", warm=not args.cold)
    pool.warm_up(args.workers, cpus=1, gpus=1)  # worker processes start once per cluster, not per search
    with db:
        search = Search(db, toy, settings, pool, build_proposers(settings, toy, db), Live(enabled=False))
        t0 = time.time()
        profiler = cProfile.Profile() if args.profile else None
        queries = LoopQueries() if args.profile else None
        with console.status(f"{args.trials} trials on {args.workers} logical GPUs"):
            if profiler:
                profiler.enable()
            summary = search.run()
            if profiler:
                profiler.disable()
                queries.close()
        wall = time.time() - t0
        knob_study = optuna.load_study(study_name=f"{db.study_name}-knobs", storage=db.storage_url)
        knob_states = [t.state for t in knob_study.get_trials(deepcopy=False)]
        rewarded = sum(sum(c) for c in db.get_state("policy")["counts"].values())
        ended = sum(1 for t in db.trials() if t.proposer != "baseline" and t.attrs.get("verdict"))
    ray.shutdown()
    free_under(tmp)  # the workers' warm slots (env/warm.py) leave their volumes to the next owner
    meter = search.meter
    per_trial = np.array(list(meter.controller_s.values())) * 1000
    run_s = [e - s for s, e, *_ in meter.spans]
    last_start = max(s for s, *_ in meter.spans)
    gaps = np.array(slot_gaps(meter.spans)) * 1000
    busy_steady = busy_fraction(meter.spans, args.workers, last_start)
    first = min(s for s, *_ in meter.spans)
    active = sum(a for end, a in meter.active if end <= last_start) / (args.workers * (last_start - first))
    # the steady state: until the trials budget was reached (after it only confirmations under way run on)
    until = meter.budget_at or last_start
    steady = sum(a for end, a in meter.active if end <= until) / (args.workers * (until - first))
    start = "cold starts" if args.cold else "warm slots"
    table = Table(title=f"search loop, {args.workers} logical GPU workers, sleeping trainer ({args.run_s} s full "
                        f"runs), {start}, {os.cpu_count()} cores")
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
        ("committer thread (git commits, shipping them) / trial",
         f"{1000 * search.committer.busy_s / max(1, len(per_trial)):.1f} ms", ""),
        ("workers busy with the trainer's own active time, until the last dispatch", f"{100 * active:.2f} %",
         ">= 97 % " + ("PASS" if active >= 0.97 else "FAIL")),
        ("workers busy with the trainer's own active time, until the trials budget was reached",
         f"{100 * steady:.2f} %", f"(the tail after it: {max(0.0, last_start - until):.1f} s)"),
        ("workers busy (Ray task spans), until the last dispatch", f"{100 * busy_steady:.2f} %", ""),
        ("workers busy, whole run", f"{100 * busy_fraction(meter.spans, args.workers):.2f} %", ""),
        ("gap between runs on a slot, median / p90", f"{np.median(gaps):.0f} / {np.percentile(gaps, 90):.0f} ms", ""),
        ("free slot-seconds, by what the loop waited on (Search._why_free)",
         ", ".join(f"{k} {v:.1f}" for k, v in sorted(meter.idle.items(), key=lambda kv: -kv[1])) or "none", ""),
        ("a run sent, until Ray starts it: median / p90 / slot-seconds in all",
         _handoff(meter.to_start), "(the loop holds the slot, nothing runs)"),
        ("a run ended, until the loop picks it up: median / p90 / slot-seconds in all",
         _handoff(meter.to_collect), "(likewise)"),
        ("knobs sampler's trials: RUNNING / all", f"{knob_states.count(optuna.trial.TrialState.RUNNING)} / "
         f"{len(knob_states)}", "0 " + ("PASS" if optuna.trial.TrialState.RUNNING not in knob_states else "FAIL")),
        ("bandit rewards given / candidates that left the ladder", f"{rewarded:.0f} / {ended}",
         "equal " + ("PASS" if rewarded == ended else "FAIL")),
        ("verdict", summary.verdict_line()[:70], ""),
    ]
    for arm in sorted({a for a, _ in search.ahead.counts} | set(search.ahead.seconds)):
        took = search.ahead.seconds.get(arm, [])
        what = ", ".join(f"{k} {n}" for (a, k), n in sorted(search.ahead.counts.items(), key=lambda kv: -kv[1])
                         if a == arm)
        rows.append((f"proposals of {arm}: what came of them; ask to answer, median / p90",
                     f"{what}; {1000 * np.median(took) if took else 0:.0f} / "
                     f"{1000 * np.percentile(took, 90) if took else 0:.0f} ms", ""))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if profiler:
        queries.print(len(per_trial))
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
