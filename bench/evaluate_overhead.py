"""The overhead of `evaluate()` beyond the trainer's own time, per run, for each sandbox.

The trainer's own time is the wall time of the exact command `evaluate` renders, run directly
(`subprocess.run(command, shell=True)`) in a freshly materialised copy of the workdir, with the
environment the process sandbox builds (OMP_NUM_THREADS, PYTHONUNBUFFERED, ...). Direct runs and
`evaluate` runs alternate (ABBA: the order flips every round, so a slow drift of the machine
cancels), and the overhead is the median of the paired differences `evaluate - direct`.

    python -m bench.evaluate_overhead                      # toy trainer (2 steps, no sleep), 10 pairs
    python -m bench.evaluate_overhead --runs 20 --sandboxes process
    python -m bench.evaluate_overhead --target tinygpt     # the real target at the smoke fidelity

Goals: process overhead < 0.3 s, Docker overhead < 1.5 s (medians).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import median, ms, percentile, print_table, verdict
from env.data import ensure_data
from env.evaluate import RunSpec, evaluate, make_sandbox
from env.process_sandbox import SCRATCH_DIRNAME, sandbox_env
from env.provenance import provenance
from env.sandbox import Limits, Sandbox, SandboxOutcome, SandboxRequest
from env.workspace import materialise_base
from search_space.knobs import routed_values
from search_space.records import Status
from search_space.target import Target, load_target

GOALS = {"process": 0.3, "docker": 1.5}
# A name in --sandboxes: the sandbox kind, and whether a new sandbox object is made for every run.
VARIANTS = {"process": ("process", False), "docker": ("docker", False), "docker-fresh": ("docker", True)}


class TimedSandbox:
    """Wraps a sandbox to record how long its `run` took, so evaluate's own work can be told apart.

    `fresh`: a new sandbox object for every run, as `Pool._run` does (`make_sandbox` per task), so
    per-object setup (the Docker client, the image check) is paid each time; the time to build it
    counts in sandbox.run."""

    def __init__(self, kind: str, target: Target, fresh: bool = False):
        self.kind, self.target, self.fresh = kind, target, fresh
        self.inner: Sandbox = make_sandbox(kind, target)
        self.name = self.inner.name
        self.last_s = 0.0
        self.flagged: list[str] = []  # reasons of complete runs that evaluate marked invalid

    def run(self, request: SandboxRequest, on_line=None, cancel: threading.Event | None = None) -> SandboxOutcome:
        t0 = time.perf_counter()
        try:
            if self.fresh:
                self.inner = make_sandbox(self.kind, self.target)
            return self.inner.run(request, on_line=on_line, cancel=cancel)
        finally:
            self.last_s = time.perf_counter() - t0

    def release(self, workdir: Path, keep: bool = False) -> None:
        self.inner.release(workdir, keep)  # (counted in evaluate's time, not in sandbox.run's)


@dataclass
class Series:
    direct: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)  # RunResult.wall_s
    call: list[float] = field(default_factory=list)  # perf_counter around evaluate()
    sandbox: list[float] = field(default_factory=list)  # perf_counter around sandbox.run
    cold: float = float("nan")  # the first evaluate of the process (image check, caches), not counted

    def overhead(self) -> list[float]:
        return [c - d for c, d in zip(self.call, self.direct, strict=True)]

    def inside(self) -> list[float]:
        return [s - d for s, d in zip(self.sandbox, self.direct, strict=True)]

    def outside(self) -> list[float]:
        return [c - s for c, s in zip(self.call, self.sandbox, strict=True)]


def toy_target(root: Path) -> Target:
    from tests.toy import make_toy

    return make_toy(root / "toy", sleep=0.0, full=2, short=2)


def direct_run(target: Target, fidelity: str, seed: int, scratch: Path) -> float:
    """The trainer alone: the command evaluate would run, in a materialised workdir, timed around
    subprocess.run only (materialising and cleaning up are not the trainer's time)."""
    workdir = scratch / "work"
    shutil.rmtree(scratch, ignore_errors=True)
    materialise_base(target, workdir)
    data = ensure_data(target)
    steps = target.steps(fidelity)
    knob_env, flags = routed_values(workdir, target.knobs)
    command = target.render_command(seed=seed, steps=steps, data=data or "")
    if flags:
        command += " " + " ".join(shlex.quote(f) for f in flags)
    home, tmp = workdir / SCRATCH_DIRNAME / "home", workdir / SCRATCH_DIRNAME / "tmp"
    home.mkdir(parents=True)
    tmp.mkdir(parents=True)
    request = SandboxRequest(
        command=command, workdir=workdir, log_path=scratch / "run.log",
        env={**{k: os.environ[k] for k in target.passthrough_env if k in os.environ}, **target.env, **knob_env},
        limits=Limits(cpus=target.resources.cpus), data=data)
    env = sandbox_env(request, str(home), str(tmp))
    t0 = time.perf_counter()
    proc = subprocess.run(command, shell=True, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or f"step:{steps}/{steps}" not in proc.stdout.decode(errors="replace"):
        raise SystemExit(f"the direct run failed (exit {proc.returncode}):\n{proc.stdout.decode()[-2000:]}")
    shutil.rmtree(scratch, ignore_errors=True)
    return elapsed


def evaluate_run(target: Target, fidelity: str, seed: int, sandbox: TimedSandbox, run_root: Path,
                 run_id: str) -> tuple[float, float, float]:
    """(RunResult.wall_s, perf_counter around evaluate, perf_counter around sandbox.run)."""
    t0 = time.perf_counter()
    result = evaluate(RunSpec(target, seed=seed, fidelity=fidelity, run_id=run_id), sandbox, run_root)
    call = time.perf_counter() - t0
    complete = result.final is not None and result.final.step == result.total_steps
    if result.status != Status.OK:
        # A run that went to its last step but whose log was judged untrustworthy (readout's clock
        # check, which short runs under load can trip) still timed the whole evaluate: keep it, count it.
        if not (complete and result.status == Status.INVALID and "not to be trusted" in result.reason):
            raise SystemExit(f"evaluate ({sandbox.name}) returned {result.status}: {result.reason[-2000:]}")
        sandbox.flagged.append(result.reason)
    shutil.rmtree(run_root / run_id, ignore_errors=True)
    return result.wall_s, call, sandbox.last_s


def phases(target: Target, scratch: Path, n: int = 5) -> dict[str, float]:
    """Medians of evaluate's steps before the sandbox starts, each timed on its own."""
    times: dict[str, list[float]] = {"materialise_base": [], "ensure_data": [], "provenance": []}
    for i in range(n):
        work = scratch / f"phase-{i}"
        t0 = time.perf_counter()
        materialise_base(target, work)
        t1 = time.perf_counter()
        ensure_data(target)
        t2 = time.perf_counter()
        provenance(())
        t3 = time.perf_counter()
        shutil.rmtree(work, ignore_errors=True)
        times["materialise_base"].append(t1 - t0)
        times["ensure_data"].append(t2 - t1)
        times["provenance"].append(t3 - t2)
    return {k: median(v) for k, v in times.items()}


def docker_phases(scratch: Path, n: int = 5) -> dict[str, float]:
    """Medians of the daemon's steps for one container of the sandbox's own configuration running
    `true`: where Docker's overhead goes, with no trainer and no log streaming."""
    from env.docker_sandbox import DockerSandbox

    sandbox = DockerSandbox()
    work = scratch / "docker-phases"
    work.mkdir(parents=True, exist_ok=True)
    request = SandboxRequest(command="true", workdir=work, log_path=work / "log", limits=Limits(memory_mb=512))
    times: dict[str, list[float]] = {"create": [], "start": [], "wait": [], "remove": []}
    for i in range(n):
        config = sandbox._config(request, f"bench-{os.getpid()}-{i}")
        t0 = time.perf_counter()
        container = sandbox.client.containers.create(**config)
        t1 = time.perf_counter()
        try:
            container.start()
            t2 = time.perf_counter()
            container.wait(timeout=60)
            t3 = time.perf_counter()
        finally:
            container.remove(force=True)
        t4 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[k].append(v)
    return {k: median(v) for k, v in times.items()}


def docker_available() -> str:
    """'' when a daemon answers, else why not."""
    try:
        from env.docker_sandbox import docker_client

        docker_client(timeout=10).ping()
        return ""
    except Exception as e:  # no SDK, no socket, daemon down
        return f"{type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.evaluate_overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="measured pairs per sandbox (default 10)")
    ap.add_argument("--target", default="toy", help="toy (default), tinygpt, or a target.toml")
    ap.add_argument("--fidelity", default=None, help="default: full for toy (2 steps), smoke otherwise")
    ap.add_argument("--sandboxes", default="process,docker,docker-fresh",
                    help="comma-separated from process, docker, docker-fresh (a new DockerSandbox per run, "
                         "as Pool._run makes one per task); default all three")
    args = ap.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    try:
        return _bench(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _bench(args, scratch: Path) -> int:
    if args.target == "toy":
        target, fidelity = toy_target(scratch), args.fidelity or "full"
    else:
        try:
            target = load_target(args.target)
        except Exception as e:
            print(f"target {args.target!r} cannot be loaded: {e}", file=sys.stderr)
            return 2
        fidelity = args.fidelity or "smoke"
    names = [s.strip() for s in args.sandboxes.split(",") if s.strip()]
    if unknown := [n for n in names if n not in VARIANTS]:
        print(f"unknown sandbox {unknown}: use {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    notes = []
    if any(VARIANTS[n][0] == "docker" for n in names) and (why := docker_available()):
        names = [n for n in names if VARIANTS[n][0] != "docker"]
        notes.append(f"docker skipped: no daemon ({why[:120]})")
    print(f"target {target.name} at {fidelity} ({target.steps(fidelity)} steps), {args.runs} pairs per sandbox: "
          f"{', '.join(names)}", flush=True)
    ensure_data(target)  # a first preparation is not overhead; every later call still is
    run_root = scratch / "runs"
    sandboxes = {n: TimedSandbox(VARIANTS[n][0], target, fresh=VARIANTS[n][1]) for n in names}
    series = {n: Series() for n in names}

    direct_run(target, fidelity, 0, scratch / "direct")  # warm-up: page cache, .pyc files
    for n in names:
        series[n].cold = evaluate_run(target, fidelity, 0, sandboxes[n], run_root, f"cold-{n}")[1]
    for i in range(args.runs):
        for n in names:
            s = series[n]
            # ABBA: the direct run first on even rounds, the evaluate first on odd ones.
            order = ("direct", "evaluate") if i % 2 == 0 else ("evaluate", "direct")
            for what in order:
                if what == "direct":
                    s.direct.append(direct_run(target, fidelity, i, scratch / "direct"))
                else:
                    wall, call, sb = evaluate_run(target, fidelity, i, sandboxes[n], run_root, f"{n}-{i}")
                    s.wall.append(wall)
                    s.call.append(call)
                    s.sandbox.append(sb)
        print(f"  round {i + 1}/{args.runs}: " + ", ".join(
            f"{n} {ms(series[n].call[-1] - series[n].direct[-1])} ms over" for n in names), flush=True)

    pre = phases(target, scratch / "phases")
    rows: list = []
    status = 0
    for n in names:
        s = series[n]
        over = s.overhead()
        goal = GOALS[VARIANTS[n][0]]
        ok = median(over) < goal
        status |= 0 if ok else 1
        rows += [
            [f"{n}: direct run (trainer's own time)", ms(median(s.direct)), ms(percentile(s.direct, 90)), "", ""],
            [f"{n}: evaluate, RunResult.wall_s", ms(median(s.wall)), ms(percentile(s.wall, 90)), "", ""],
            [f"{n}: evaluate, perf_counter around call", ms(median(s.call)), ms(percentile(s.call, 90)), "", ""],
            [f"{n}:   of which sandbox.run", ms(median(s.sandbox)), ms(percentile(s.sandbox, 90)), "", ""],
            [f"{n}: [bold]overhead = evaluate - direct[/] (paired)", ms(median(over)), ms(percentile(over, 90)),
             f"< {goal * 1000:.0f}", verdict(median(over), goal)],
            [f"{n}:   inside the sandbox (sandbox.run - direct)", ms(median(s.inside())),
             ms(percentile(s.inside(), 90)), "", ""],
            [f"{n}:   in evaluate around it (evaluate - sandbox.run)", ms(median(s.outside())),
             ms(percentile(s.outside(), 90)), "", ""],
            [f"{n}: first evaluate of the process (not counted)", ms(s.cold), "", "", ""],
            None,
        ]
    rows += [[f"evaluate step alone: {k}", ms(v), "", "", ""] for k, v in pre.items()]
    if any(VARIANTS[n][0] == "docker" for n in names):
        rows += [[f"docker daemon alone (`true`): {k}", ms(v), "", "", ""]
                 for k, v in docker_phases(scratch).items()]
    for n, sb in sandboxes.items():
        if sb.flagged:
            notes.append(f"{n}: {len(sb.flagged)} complete run(s) marked invalid by evaluate, timings kept "
                         f"(first: {sb.flagged[0][:160]}).")
    caption = (f"{target.name} at {fidelity}, {args.runs} pairs per sandbox, ABBA order; times in ms; "
               f"p90 by linear interpolation. {os.cpu_count()} CPUs. " + " ".join(notes))
    print_table("evaluate() overhead beyond the trainer's own time", ["measure", "median", "p90", "goal", ""],
                rows, caption=caption)
    return status


if __name__ == "__main__":
    sys.exit(main())
