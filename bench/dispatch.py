"""Ray dispatch latency of a queued run once the workers are warm.

A local Ray cluster (as `Pool` starts it: `--cpus` CPUs, 4 logical GPUs), more runs queued than
there are slots, and for every queued run the gap from the moment a slot frees (the previous
task's last instruction) to the moment the queued task's first instruction runs in a worker.

Three paths, measured in alternating rounds after a warm-up:

- `ray remote`: a tiny remote function with Pool's options (num_cpus, num_gpus from the target,
  max_retries=3, retry_exceptions=False) that records its start and end, then sleeps;
- `Pool.submit`: the real submit path and the real `env.pool._run` (evaluate, process sandbox, the
  toy trainer), timed by `_run`'s own `Finished.started/ended` where env/pool.py records them, else
  by a shim around `_run` (same options, same arguments);
- trainer to trainer: through the same Pool runs, the toy trainer prints a timestamp as its first
  and its last action, so the slot's idle time between two trainers (evaluate's tail and head, the
  dispatch, Python start-up) is seen end to end.

Matching ends to starts: with C slots and a non-empty queue, the k-th slot to free is taken by the
(C+k)-th task to start, so the gap is `start[C+k] - end[k]` over the sorted times (never negative,
whatever worker takes which task). All times are time.time(), one clock for every process here.

    python -m bench.dispatch                 # 50 measured gaps per path, 2 CPUs
    python -m bench.dispatch --runs 100 --cpus 4

Goal: median dispatch gap < 50 ms once warm (ray remote and Pool.submit).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray

from bench.common import median, ms, percentile, print_table, verdict
from env.evaluate import RunSpec
from search_space.records import Status
from search_space.target import Target, load_target

GOAL_S = 0.05
TASK_SLEEP_S = 0.05  # the bare task's "work"; long enough that the queue never runs dry


def bare_task(sleep_s: float) -> tuple[int, float, float]:
    t0 = time.time()
    time.sleep(sleep_s)
    return os.getpid(), t0, time.time()


def timed_run(spec: RunSpec, sandbox_name: str, run_root: str):
    """env.pool._run, unchanged, between two timestamps (for an env/pool.py that does not record them)."""
    from env.pool import _run

    t0 = time.time()
    finished = _run(spec, sandbox_name, run_root)
    return finished, os.getpid(), t0, time.time()


STAMP_HEAD = ("import time as _bench_time\n"
              "print(f'bench_start {_bench_time.time():.6f}', flush=True)\n")
STAMP_TAIL = "\nprint(f'bench_end {_bench_time.time():.6f}', flush=True)\n"


def stamped_toy(root: Path) -> Target:
    """The toy trainer (1 GPU, 5 steps of 10 ms), printing a timestamp first and last."""
    from tests.toy import make_toy

    make_toy(root, sleep=0.01, gpus=1, full=5, short=5)
    train = root / "train.py"
    text = train.read_text()
    head, sep, rest = text.partition("import argparse")  # the first stamp goes before the imports
    train.write_text(head + STAMP_HEAD + sep + rest + STAMP_TAIL)
    return load_target(root)


def stamps(log_text: str) -> tuple[float, float]:
    found = {}
    for line in log_text.splitlines():
        key, _, value = line.partition(" ")
        if key in ("bench_start", "bench_end"):
            found[key] = float(value)
    return found["bench_start"], found["bench_end"]


def fifo_gaps(starts: list[float], ends: list[float], slots: int) -> list[float]:
    """start[C+k] - end[k] over sorted times: the wait of each queued task after a slot freed."""
    s, e = sorted(starts), sorted(ends)
    return [s[slots + k] - e[k] for k in range(len(s) - slots)]


class Paths:
    """The three measured paths over one cluster; each `round_*` queues `n + slots` tasks at once."""

    def __init__(self, pool, target: Target, slots: int):
        res = target.resources
        self.pool, self.target, self.slots = pool, target, slots
        self.bare = ray.remote(max_retries=3, retry_exceptions=False)(bare_task).options(
            num_cpus=res.cpus, num_gpus=res.gpus)
        from env.pool import Finished

        # Pool.submit as it is; _run's own timestamps when it has them, else a shim around _run.
        self.own_stamps = "started" in {f.name for f in dataclasses.fields(Finished)}
        if not self.own_stamps:
            pool._remote = ray.remote(max_retries=3, retry_exceptions=False)(timed_run)
        self.gaps: dict[str, list[float]] = {"ray": [], "pool": [], "trainer": []}
        self.head: list[float] = []  # _run start -> trainer's first line, per task
        self.tail: list[float] = []  # trainer's last line -> _run returns, per task
        self.workers: dict[str, set] = {"ray": set(), "pool": set()}

    def round_ray(self, n: int, record: bool = True) -> None:
        out = ray.get([self.bare.remote(TASK_SLEEP_S) for _ in range(n + self.slots)])
        if record:
            self.gaps["ray"] += fifo_gaps([o[1] for o in out], [o[2] for o in out], self.slots)
            self.workers["ray"] |= {o[0] for o in out}

    def round_pool(self, n: int, seed0: int, record: bool = True) -> None:
        refs = [self.pool.submit(RunSpec(self.target, seed=seed0 + i, fidelity="full", run_id=f"d{seed0 + i}"))
                for i in range(n + self.slots)]
        out = [self.pool.get(r) for r in refs]
        if self.own_stamps:
            out = [(f, f.worker, f.started, f.ended) for f in out]
        for finished, *_ in out:
            if finished.result.status != Status.OK:
                raise SystemExit(f"a Pool run failed: {finished.result.status}: {finished.result.reason[-1500:]}")
        if not record:
            return
        trainer = [stamps(f.log_text) for f, *_ in out]
        self.gaps["pool"] += fifo_gaps([o[2] for o in out], [o[3] for o in out], self.slots)
        self.gaps["trainer"] += fifo_gaps([t[0] for t in trainer], [t[1] for t in trainer], self.slots)
        self.head += [t[0] - o[2] for t, o in zip(trainer, out, strict=True)]
        self.tail += [o[3] - t[1] for t, o in zip(trainer, out, strict=True)]
        self.workers["pool"] |= {o[1] for o in out}


def row(name: str, xs: list[float], goal: float | None) -> list[str]:
    return [name, str(len(xs)), ms(median(xs)), ms(percentile(xs, 90)), ms(max(xs) if xs else float("nan")),
            f"< {goal * 1000:.0f}" if goal else "", verdict(median(xs), goal) if goal else ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dispatch", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50, help="measured gaps per path (default 50)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds the runs are split into")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    ap.add_argument("--gpus", type=int, default=4, help="logical GPUs of the local Ray cluster (default 4)")
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench-dispatch-"))
    try:
        return _bench(args, scratch)
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)


def _timed(what: str, fn: Callable[[], None]) -> None:
    t0 = time.time()
    fn()
    print(f"  {what}: {time.time() - t0:.1f} s", flush=True)


def _bench(args, scratch: Path) -> int:
    from env.pool import Pool, wait_for_workers

    target = stamped_toy(scratch / "toy")
    pool = Pool(num_cpus=args.cpus, num_gpus=args.gpus, run_root=scratch / "runs")
    wait_for_workers(pool)
    slots = pool.capacity(target.resources.cpus, target.resources.gpus)
    paths = Paths(pool, target, slots)
    print(f"local Ray {ray.__version__}: {args.cpus} CPUs, {args.gpus} logical GPUs; {slots} slots of "
          f"{target.resources.cpus} CPU + {target.resources.gpus} GPU; {args.runs} gaps per path", flush=True)
    _timed("warm-up, ray remote", lambda: paths.round_ray(2 * slots, record=False))
    _timed("warm-up, Pool.submit", lambda: paths.round_pool(2 * slots, 10_000, record=False))
    per_round = [args.runs // args.rounds + (i < args.runs % args.rounds) for i in range(args.rounds)]
    seed = 0
    for i, n in enumerate(per_round):
        _timed(f"round {i + 1}/{args.rounds}, ray remote ({n} gaps)", lambda n=n: paths.round_ray(n))
        _timed(f"round {i + 1}/{args.rounds}, Pool.submit ({n} gaps)", lambda n=n, s=seed: paths.round_pool(n, s))
        seed += n + slots

    g = paths.gaps
    ok = median(g["ray"]) < GOAL_S and median(g["pool"]) < GOAL_S
    rows = [
        row("ray remote: slot frees -> queued task starts", g["ray"], GOAL_S),
        row("Pool.submit: _run returns -> next _run starts", g["pool"], GOAL_S),
        None,
        row("trainer to trainer: last line -> next first line", g["trainer"], None),
        row("  _run starts -> trainer's first line (per run)", paths.head, None),
        row("  trainer's last line -> _run returns (per run)", paths.tail, None),
    ]
    caption = (f"Local Ray {ray.__version__}, {args.cpus} CPUs + {args.gpus} logical GPUs, {slots} slots, "
               f"{args.rounds} alternating rounds after a warm-up of {2 * slots} runs per path; times in ms. "
               f"Workers seen: ray remote {len(paths.workers['ray'])}, Pool {len(paths.workers['pool'])}. "
               f"Bare task sleeps {TASK_SLEEP_S * 1000:.0f} ms; Pool runs the toy trainer (5 steps x 10 ms) "
               f"in the process sandbox, timed by "
               f"{'Finished.started/ended' if paths.own_stamps else 'a shim around _run'}. "
               f"{os.cpu_count()} CPUs on the machine.")
    print_table("Ray dispatch latency of a queued run, warm workers",
                ["gap", "n", "median", "p90", "max", "goal", ""], rows, caption=caption)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
