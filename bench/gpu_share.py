"""Where a search's held GPU time goes (issue #11): training steps against start-up, compile, validation,
the trusted evaluation and idle time, read from what the search itself recorded.

    python -m bench.gpu_share                                   # tinygpt-gpu, 6 minutes, ideas,knobs
    python -m bench.gpu_share --target tinygpt --budget-minutes 3 --workers 1   # the CPU version
    python -m bench.gpu_share --analyze DIR                     # a search folder this bench launched
    python -m bench.gpu_share --pack 4 --cpus 4 --alone-rate 2247.1   # 4 runs at once on the GPU

--pack K runs the target from a copy of its folder whose [resources] say `pack = K` (and --cpus,
--memory-mb when given: a 16-core host fits 4 runs of 4 cores, not of the target's 8). Packed, the base's
own step times are slowed by their neighbours, so the training share's steady rate must come from a run
alone on the GPU: --alone-rate (k tokens/s), measured by bench/packed_noise.py's solo run.

It launches `speedsearch launch` (a subprocess; `python -m agent launch --json`) with `nvidia-smi` sampled
every 0.5 s by a thread beside it, then reads the folder (RunsDB: trials, each run's RunResult and log).
"Held" time is the launch command's whole wall time times the GPUs (CPU target: the worker slots), data
prepare, Ray's start and the closing summary included: that is what a search costs a GPU.

What each run's record gives, and so the split (wall_s = evaluate's time, from the worker's view):
- start-up: provenance.trust.startup_s (sandbox start to the step-0 `val_start` line) less compile;
- compile: the log's `compile_and_warmup_s` (the trainer's own clock; none on the CPU preset);
- training: the claimed train_ms at the last validation (checked against the host's clock within 10 %);
- validation: the observed span from step 0's validation line to the last one, less the training in it;
- trusted evaluation: provenance.trust.seconds (after the run; its imports overlap the run);
- other: wall_s less all the above: before the sandbox (materialise, data prepare), the step-0 validation,
  the process's exit, the sandbox's teardown. The records do not tell these apart.
Runs that never reached the trusted measurement (failed, pruned, invalid) have no start-up figure: their
start-up stays in "other" (their count is printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console

from bench.common import print_table as _print_table

LINE_COMPILE = re.compile(r"compile_and_warmup_s:([\d.]+)")
PARTS = ("startup", "compile", "training", "validation", "trusted", "other")
PART_NAMES = {"startup": "start-up", "compile": "compile", "training": "training", "validation": "validation",
              "trusted": "trusted eval", "other": "other*"}
ISSUE_PER_HOUR = 11 / 0.1  # the issue's starting point: 11 candidates in 6 minutes on one H100
VERDICTS = ("pass", "fail", "stopped")  # reached a verdict: confirmed, or rejected at some rung


def print_table(title, columns, rows, caption=""):
    _print_table(title, columns, rows, caption, console=Console(width=176))  # the file keeps every column whole


class Sampler(threading.Thread):
    """`nvidia-smi` every 0.5 s (one long-lived process, `-lms 500`), and when the target's data folder
    starts being prepared (its lock file appears) and appears; both stamped with time.time() as read."""

    def __init__(self, data_path: Path | None, interval_s: float = 0.5):
        super().__init__(name="gpu-share-sampler", daemon=True)
        self.samples: list[tuple[float, int, float, float]] = []  # time, GPU index, util %, memory MiB
        self.data_path, self.interval_s = data_path, interval_s
        self.prepare: dict[str, float] = {}  # "started", "ready" (first seen), "existed"
        self.stop_event = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.smi = shutil.which("nvidia-smi") is not None
        if data_path is not None and data_path.is_dir():
            self.prepare["existed"] = time.time()

    QUERY = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]

    def run(self) -> None:
        if self.smi:
            self.proc = subprocess.Popen([*self.QUERY, "-lms", str(int(self.interval_s * 1000))],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        while not self.stop_event.wait(self.interval_s):
            self._watch_data()
            if self.smi and self.proc.poll() is not None:  # no loop mode here: one query a tick instead
                out = subprocess.run(self.QUERY, capture_output=True, text=True).stdout
                self._read(out.splitlines())

    def _read(self, lines) -> None:
        for line in lines:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((time.time(), int(parts[0]), float(parts[1]), float(parts[2])))
            except (ValueError, IndexError):
                continue  # "[N/A]" or a header

    def _watch_data(self) -> None:
        p = self.data_path
        if p is None or "ready" in self.prepare or "existed" in self.prepare:
            return
        if "started" not in self.prepare and (p.parent / f".{p.name}.lock").exists():
            self.prepare["started"] = time.time()  # the prepare step's lock: taken when it starts
        if p.is_dir():
            self.prepare["ready"] = time.time()

    def stop(self) -> None:
        self.stop_event.set()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.join(timeout=5)


def launch(args: argparse.Namespace, folder: Path) -> dict:
    """Run the search, timed, with the sampler beside it; the meta (times, samples) is saved beside the folder."""
    import env.data
    from search_space.target import load_target

    if args.pack > 1 or args.cpus or args.memory_mb:
        args.target = str(packed_target(args.target, folder.parent / "target", args.pack, args.cpus, args.memory_mb))
    target = load_target(args.target)
    root = getattr(env.data, "data_root", None)  # newer trees resolve `{cache}` per node
    sampler = Sampler(root(target) if root else target.data_path)
    command = [sys.executable, "-m", "agent", "launch", "--dir", str(folder), "--target", args.target,
               "--proposers", args.proposers, "--budget-minutes", str(args.budget_minutes),
               "--workers", str(args.workers), "--drain-minutes", str(args.drain_minutes), "--json"]
    if args.smoke:
        command += ["--smoke", args.smoke]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))}
    out, err = folder.parent / f"{folder.name}.launch.out", folder.parent / f"{folder.name}.launch.err"
    sampler.start()
    t0 = time.time()
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(command, stdout=fo, stderr=fe, env=env)
        try:
            rc = proc.wait(timeout=args.stop_after or None)
        except subprocess.TimeoutExpired:  # Ctrl-C: the search stops, records and prints its summary
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    t1 = time.time()
    sampler.stop()
    meta = {"command": " ".join(command[1:]), "rc": rc, "start": t0, "end": t1, "smi": sampler.smi,
            "samples": sampler.samples, "prepare": sampler.prepare, "stdout": str(out), "stderr": str(err),
            "target": args.target, "workers": args.workers, "slots": slots(args, target),
            "pack": target.resources.pack, "cpus": target.resources.cpus}
    meta_path(folder).write_text(json.dumps(meta))
    return meta


def packed_target(spec: str, dest: Path, pack: int, cpus: int, memory_mb: int) -> Path:
    """A copy of the target's folder whose target.toml's [resources] say `pack` (and cpus, memory_mb
    when given); the same name, trainer, data and ideas. Returns the copy's target.toml."""
    from search_space.targets import builtin_path

    path = builtin_path(spec) or Path(spec)
    path = path / "target.toml" if path.is_dir() else path
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(path.parent, dest, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    text = (dest / path.name).read_text()
    head, sep, rest = text.partition("[resources]\n")
    if not sep:
        raise SystemExit(f"{path}: no [resources] table to pack")
    body, nxt, tail = rest.partition("\n[")
    lines = [ln for ln in body.splitlines() if not re.match(r"\s*(pack|cpus|memory_mb)\s*=", ln)
             or (ln.strip().startswith("cpus") and not cpus) or (ln.strip().startswith("memory_mb") and not memory_mb)]
    lines += [f"pack = {pack}"] + ([f"cpus = {cpus}"] if cpus else [])
    lines += [f"memory_mb = {memory_mb}"] if memory_mb else []
    (dest / path.name).write_text(head + sep + "\n".join(lines) + "\n" + nxt + tail)
    return dest / path.name


def slots(args: argparse.Namespace, target) -> int:
    """Runs the local pool can hold at once: its GPUs, or on a CPU target its CPUs (agent/runner.py
    `make_pool`: max(cpu_count, workers x cpus)) over the target's cpus."""
    from env.gpus import visible_gpus

    if target.resources.gpus:
        return max(1, len(visible_gpus()) // target.resources.gpus)
    cpus = max(os.cpu_count() or 1, args.workers * target.resources.cpus)
    return max(1, cpus // max(1, target.resources.cpus))


def meta_path(folder: Path) -> Path:
    """Beside the search folder (a launch refused early leaves no folder)."""
    return folder.parent / f"{folder.name}.gpu_share.json"


def tokens_per_step(db, commit: str, preset: str, cache: dict) -> int:
    """batch_size x seq_len of the preset in the run's own train.py (a candidate may change them)."""
    key = (commit, preset)
    if key not in cache:
        try:
            text = db.files(commit, ["train.py"]).get("train.py", "")
        except Exception:  # a commit git cannot show: counted with the base's batch below
            text = ""
        m = re.search(rf'"{preset}"\s*:\s*dict\(([^)]*)\)', text)
        vals = dict(re.findall(r"(\w+)\s*=\s*(\d+)", m.group(1))) if m else {}
        cache[key] = int(vals["batch_size"]) * int(vals["seq_len"]) if {"batch_size", "seq_len"} <= vals.keys() else 0
    return cache[key]


def split(run) -> dict:
    """One run's wall time in the parts the record can tell apart (seconds)."""
    log = Path(run.log).read_text(errors="replace") if run.log and Path(run.log).is_file() else ""
    m = LINE_COMPILE.search(log)
    compile_s = float(m.group(1)) if m else 0.0
    trust = run.provenance.get("trust") or {}
    claimed = run.claimed[-1].train_ms / 1000 if run.claimed else 0.0
    observed = run.curve[-1].train_ms / 1000 if run.curve else 0.0
    parts = {"compile": compile_s, "training": claimed, "validation": max(0.0, observed - claimed),
             "trusted": float(trust.get("seconds", 0.0))}
    # no arrival figure for the step-0 marker (no trusted measurement): start-up stays in "other"
    parts["startup"] = max(0.0, trust["startup_s"] - compile_s) if "startup_s" in trust else 0.0
    parts["other"] = max(0.0, run.wall_s - sum(parts.values()))
    parts["wall"] = run.wall_s
    parts["no_startup"] = "startup_s" not in trust
    parts["steps"] = run.claimed[-1].step if run.claimed else 0
    return parts


def steady_rate(runs: list[dict]) -> tuple[float, str]:
    """Tokens a second of the base trainer alone on its GPU: the median over the base's `full` runs of
    the claimed step time between the first validation after step 0 and the last (the first interval,
    with the first steps' allocations, left out); `short` runs if no full one finished."""
    for fid in ("full", "short"):
        rates = []
        for r in runs:
            run = r["run"]
            if r["role"] != "baseline" or run.fidelity != fid or run.status.value != "ok" or len(run.claimed) < 3:
                continue
            a, b = run.claimed[1], run.claimed[-1]
            if b.train_ms > a.train_ms:
                rates.append(r["tokens_step"] * (b.step - a.step) / ((b.train_ms - a.train_ms) / 1000))
        if rates:
            rates.sort()
            return rates[len(rates) // 2], f"median of the base's {len(rates)} ok {fid} runs' own step times"
    return math.nan, "no ok baseline run to take a steady rate from"


def collect(folder: Path) -> tuple[list[dict], dict]:
    """Every saved run of the search with its trial's rung and role; the candidates' verdicts."""
    from runs_db.db import BASELINE, RunsDB

    db = RunsDB.open(folder)
    try:
        frozen = {t.number: t for t in db.study.trials()}
        runs, cache, verdicts = [], {}, {}
        base = db.base_commit
        for t in db.trials():
            role = "baseline" if t.proposer == BASELINE else "candidate"
            rung = str(t.attrs.get("rung") or t.fidelity)
            if role == "candidate" and t.attrs.get("verdict"):
                verdicts[t.commit] = t.attrs["verdict"]
            elif role == "candidate":
                verdicts.setdefault(t.commit, "")
            for run in db.runs(t.number):
                preset = (re.search(r"--preset (\w+)", run.provenance.get("command", "")) or [None, "cpu"])[1]
                tps = tokens_per_step(db, run.commit or base, preset, cache) or tokens_per_step(db, base, preset, cache)
                runs.append({"trial": t.number, "rung": rung, "role": role, "run": run, "tokens_step": tps,
                             "gpu": ",".join(run.provenance.get("gpu_ids") or []) or "cpu", **split(run)})
        f = frozen.values()
        starts = [x.datetime_start.timestamp() for x in f if x.datetime_start]
        ends = [x.datetime_complete.timestamp() for x in f if x.datetime_complete]
        span = {"first_start": min(starts) if starts else math.nan, "last_end": max(ends) if ends else math.nan}
        saved = {r["trial"] for r in runs}
        # A trial with no saved run that ended as a failure: its run was cut off (the budget's stop).
        span["cut_off"] = sum(x.datetime_complete.timestamp() - x.datetime_start.timestamp() for x in f
                              if x.number not in saved and x.datetime_start and x.datetime_complete
                              and x.state.name == "FAIL")
    finally:
        db.close()
    return runs, {"verdicts": verdicts, **span}


def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f} %"


def verdict_line(folder: Path, meta: dict) -> str:
    """The search's own verdict line, rebuilt from its --json summary by the loop's Summary."""
    from agent.meter import Summary

    try:  # beside the folder (it may have moved since: --analyze of a copy)
        text = (folder.parent / f"{folder.name}.launch.out").read_text()
        data, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
        s = data["summary"]
        return Summary(**{k: v for k, v in s.items() if k in Summary.__dataclass_fields__}).verdict_line() + \
            f"  (stopped: {s.get('stopped_by')})"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no summary from the launch ({type(e).__name__}: {e}); see {meta.get('stderr')}"


def print_held(runs: list[dict], info: dict, meta: dict, held_all: float, units: int, unit: str) -> None:
    """Every held second, once: around the trials, in the runs' parts, and between runs."""
    compiles = sorted(r["compile"] for r in runs if r["compile"] > 0)
    cold_bar = 2 * compiles[len(compiles) // 2] if compiles else math.inf
    cold = [r["compile"] for r in runs if r["compile"] > cold_bar]
    before = (info["first_start"] - meta["start"]) * units
    after = (meta["end"] - info["last_end"]) * units
    cut = info["cut_off"]
    parts = [("before the first trial (launch, Ray's start, the pool)", before)]
    for p in PARTS:
        if p == "compile" and not compiles:
            parts.append(("compile (none logged)", 0.0))
        elif p == "compile":
            parts.append((f"compile, cold (over {fmt(cold_bar)} s: {len(cold)} runs)", sum(cold)))
            parts.append(("compile, warm (the others)", sum(compiles) - sum(cold)))
        else:
            parts.append((PART_NAMES[p], sum(r[p] for r in runs)))
    parts.append(("runs cut off by the stop (their trials' time; no record)", cut))
    between = held_all - sum(v for _, v in parts) - after
    parts.append(("between runs, and idle slots (the rest)", between))
    parts.append(("after the last trial (summary, shutdown)", after))
    rows = [[name, f"{v:.1f}", pct(v / held_all)] for name, v in parts]
    rows.append(None)
    rows.append([f"held {unit}-s", f"{held_all:.1f}", "100.0 %"])
    print_table(f"Where the held {unit} time went", ["part", f"{unit}-s", "share"], rows,
                caption="Training here is the steps' own time (train_ms); the training share above counts tokens "
                        "at the steady rate instead. On a CPU target with runs overlapping (more at once than slots) "
                        "the rest can go negative.")


def print_runs(runs: list[dict]) -> None:
    rows = [[f"{r['trial']}", r["rung"], r["role"], str(r["run"].seed), r["run"].status.value, f"{r['wall']:.1f}",
             *("-" if r["no_startup"] and p == "startup" else f"{r[p]:.1f}" for p in PARTS),
             str(r["steps"])] for r in sorted(runs, key=lambda r: (r["trial"], r["run"].seed))]
    print_table("Each run (seconds)", ["trial", "rung", "role", "seed", "status", "wall",
                                       *[PART_NAMES[p] for p in PARTS], "steps"], rows)


def report(folder: Path, meta: dict, each_run: bool = False, alone_rate: float = 0.0) -> int:
    runs, info = collect(folder)
    held_wall = meta["end"] - meta["start"]
    gpus = sorted({r["gpu"] for r in runs}) or ["cpu"]
    on_cpu = gpus == ["cpu"]
    units = int(meta.get("slots") or len(gpus))  # what the search held: every slot of the pool, busy or not
    unit = "core" if on_cpu else "GPU"
    rate, rate_how = steady_rate(runs)
    packed = int(meta.get("pack") or 1)
    if alone_rate:
        rate_how = (f"given: the trainer alone on this GPU model, {alone_rate:.1f} k tokens/s; the packed base's "
                    f"own: {fmt(rate / 1e3)}")
        rate = alone_rate * 1e3
    elif packed > 1:
        rate_how += "; PACKED: slowed by its neighbours, so the share reads too high (give --alone-rate)"
    if packed > 1:
        print(f"packed: {packed} runs at once on each GPU ({meta.get('cpus')} CPUs a run)")
    if each_run:
        print_runs(runs)
    print(f"search {folder}: {meta['command']} (exit {meta['rc']})")
    print(f"held: {held_wall:.1f} s wall x {units} {unit}(s) = {held_wall * units:.1f} {unit}-s; "
          f"{len(runs)} runs recorded; steady rate {fmt(rate / 1e3, 1)} k tokens/s ({rate_how})")
    prep = meta.get("prepare", {})
    if "existed" in prep:
        print("data: already prepared before the search (not in its time)")
    elif "ready" in prep:
        since = prep.get("started", meta["start"])
        print(f"data prepare: {prep['ready'] - since:.1f} s (from its lock file to the data folder, 0.5 s "
              f"resolution), {prep['ready'] - meta['start']:.1f} s after launch; inside the first run(s)' other*")
    before = info["first_start"] - meta["start"]
    after = meta["end"] - info["last_end"]
    span = info["last_end"] - info["first_start"]
    print(f"before the first trial started (launch, Ray, pool): {fmt(before)} s; after the last trial ended "
          f"(summary, shutdown): {fmt(after)} s; runs at once, on average over the trials' span of {fmt(span)} s: "
          f"{fmt(sum(r['wall'] for r in runs) / span, 2)} (slots: {units})")

    # Per GPU (per slot on the CPU: the records name no core, so all slots are one row).
    rows, total_tokens = [], 0.0
    for g in gpus:
        mine = [r for r in runs if r["gpu"] == g]
        held = held_wall * (units if on_cpu else 1)
        tokens = sum(r["tokens_step"] * r["steps"] for r in mine)
        total_tokens += tokens
        train = sum(r["training"] for r in mine)
        busy = sum(r["wall"] for r in mine)
        rows.append([f"{unit} {g}" if not on_cpu else f"{units} core slot(s)", f"{held:.1f}", f"{busy:.1f}",
                     f"{held - busy:.1f}", f"{train:.1f}", f"{tokens / 1e6:.1f}",
                     fmt(tokens / held / 1e3, 1), pct(tokens / held / rate)])
    held_all = held_wall * units
    share = total_tokens / held_all / rate if rate == rate else math.nan
    rows.append(None)
    rows.append(["search", f"{held_all:.1f}", f"{sum(r['wall'] for r in runs):.1f}",
                 f"{held_all - sum(r['wall'] for r in runs):.1f}", f"{sum(r['training'] for r in runs):.1f}",
                 f"{total_tokens / 1e6:.1f}", fmt(total_tokens / held_all / 1e3, 1), pct(share)])
    print_table(f"Training share per {unit}", [unit, f"held {unit}-s", "runs' wall s", "no run s", "training s",
                                                "M tokens", "k tokens/held s", "training share"], rows,
                caption=f"training share = tokens per held {unit}-second / the steady rate "
                        f"({fmt(rate / 1e3)} k tokens/s, {rate_how})")

    # The split, per rung and role, and of the held time as a whole.
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["rung"], r["role"])].append(r)
    order = {"smoke": 0, "short": 1, "full": 2, "confirm": 3}
    rows = []
    for key in sorted(groups, key=lambda k: (order.get(k[0], 9), k[1])):
        rs = groups[key]
        wall = sum(r["wall"] for r in rs)
        rows.append([f"{key[0]} / {key[1]}", str(len(rs)), str(sum(r["no_startup"] for r in rs)), f"{wall:.1f}",
                     *[f"{sum(r[p] for r in rs):.1f}" for p in PARTS], f"{wall / len(rs):.1f}"])
    totals = {p: sum(r[p] for r in runs) for p in PARTS}
    wall_all = sum(r["wall"] for r in runs)
    rows.append(None)
    rows.append(["all runs", str(len(runs)), str(sum(r["no_startup"] for r in runs)), f"{wall_all:.1f}",
                 *[f"{totals[p]:.1f}" for p in PARTS], f"{wall_all / max(1, len(runs)):.1f}"])
    rows.append([f"share of held {unit}-s", "", "", pct(wall_all / held_all),
                 *[pct(totals[p] / held_all) for p in PARTS], ""])
    print_table("Run wall time split (seconds), per rung and role",
                ["rung / role", "runs", "no start-up fig.", "wall", *[PART_NAMES[p] for p in PARTS], "wall/run"], rows,
                caption="other* = before the sandbox (materialise, data prepare), the step-0 validation, the "
                        "trainer's exit and the sandbox's teardown: not told apart in the records. Data loading: the "
                        "validation set loads inside start-up and batches are drawn inside training steps, so it has "
                        "no column of its own. 'no start-up fig.': runs without a trusted measurement, whose "
                        f"start-up is in other*. Held {unit}-s with no run at all: "
                        f"{held_all - wall_all:.1f} ({pct((held_all - wall_all) / held_all)}).")

    print_held(runs, info, meta, held_all, units, unit)
    if packed > 1:
        print(f"packed: the parts above are run-seconds; with {packed} runs at once they overlap, so they can sum "
              f"past the held time and 'between runs' goes negative.")

    # Utilisation, throughput of verdicts, and the goals.
    samples = [s for s in meta.get("samples", []) if meta["start"] <= s[0] <= meta["end"]]
    util = [s[2] for s in samples]
    mean_util = sum(util) / len(util) if util else math.nan
    zero = sum(u == 0 for u in util) / len(util) if util else math.nan
    verdicts = info["verdicts"]
    evaluated = sum(v in VERDICTS for v in verdicts.values())
    per_hour = evaluated / (held_all / 3600)
    kinds = defaultdict(int)
    for v in verdicts.values():
        kinds[v or "no verdict yet"] += 1
    goal_rows = [
        ["training share of held GPU time (search)", pct(share), ">= 80 %", ok(share >= 0.8, on_cpu)],
        ["mean nvidia-smi utilisation", pct(mean_util / 100) if util else "n/a", ">= 70 %",
         ok(mean_util >= 70, on_cpu or not util)],
        ["nvidia-smi samples at 0 %", pct(zero) if util else "n/a", "", ""],
        [f"candidates evaluated per {unit}-hour", f"{per_hour:.0f} ({evaluated} in {held_all / 3600:.3f} h)",
         f">= {3 * ISSUE_PER_HOUR:.0f} (3x the issue's 11 in 6 min)", ok(per_hour >= 3 * ISSUE_PER_HOUR, on_cpu)],
        ["candidates by verdict", ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())), "", ""],
        ["peak GPU memory used (nvidia-smi)", f"{max(s[3] for s in samples) / 1024:.1f} GiB" if util else "n/a",
         "", ""],
        ["samples / interval", f"{len(util)} / 0.5 s" if util else "n/a (no nvidia-smi)", "", ""],
    ]
    print_table("Goals (issue #11, on the H100)", ["measure", "figure", "goal", ""], goal_rows,
                caption="On a CPU target the goals do not apply (shown n/a); the split holds per core.")
    print(f"verdict: {verdict_line(folder, meta)}")
    if on_cpu:
        return 0
    return 0 if share >= 0.8 and mean_util >= 70 and per_hour >= 3 * ISSUE_PER_HOUR else 1


def ok(cond: bool, na: bool) -> str:
    if na:
        return "n/a"
    return "PASS" if cond else "FAIL"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="tinygpt-gpu")
    ap.add_argument("--proposers", default="ideas,knobs")
    ap.add_argument("--budget-minutes", type=float, default=6.0)
    ap.add_argument("--workers", type=int, default=0, help="runs at once (0: as many as the machine fits)")
    ap.add_argument("--drain-minutes", type=float, default=4.0, help="launch's --drain-minutes")
    ap.add_argument("--stop-after", type=float, default=0.0,
                    help="seconds: then Ctrl-C the search (it records and sums up); 0: never")
    ap.add_argument("--dir", type=Path, default=None, help="the search folder (default: a new temporary one)")
    ap.add_argument("--runs", action="store_true", help="also a table of every run")
    ap.add_argument("--analyze", type=Path, default=None, help="only read a folder this bench launched")
    ap.add_argument("--pack", type=int, default=1, help="runs at once on one GPU (a copy of the target, pack = K)")
    ap.add_argument("--cpus", type=int, default=0, help="with --pack: the copy's CPUs a run (0: the target's)")
    ap.add_argument("--memory-mb", type=int, default=0, help="with --pack: the copy's memory a run (0: the target's)")
    ap.add_argument("--smoke", default="", help="launch's --smoke (on | off | auto; default: launch's own)")
    ap.add_argument("--alone-rate", type=float, default=0.0,
                    help="k tokens/s of the base alone on the GPU: the share's steady rate (0: the base's own)")
    args = ap.parse_args()
    if args.analyze:
        folder = args.analyze.resolve()
        meta = json.loads(meta_path(folder).read_text())
    else:
        folder = (args.dir or Path(tempfile.mkdtemp(prefix="gpu-share-")) / "search").resolve()
        folder.parent.mkdir(parents=True, exist_ok=True)
        meta = launch(args, folder)
    sys.exit(report(folder, meta, args.runs, args.alone_rate))


if __name__ == "__main__":
    main()
