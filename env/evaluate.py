"""One run end to end: materialise, check, run sandboxed, read live, stop early, classify, and (for a
target with a `[trust]` section) measure instead of believe: env/trusted.py."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from env.cache_layer import shared_cache
from env.continuation import Continuation
from env.data import DataError, data_root, ensure_data, hidden_paths
from env.guard import cpu_scores, measure_guards
from env.machine import run_memory_mb
from env.provenance import provenance
from env.readout import CurveReader
from env.sandbox import Limits, Sandbox, SandboxRequest
from env.source import DataSource, Source, prepare_folder, unship
from env.stats import Band
from env.trusted import Evaluator
from env.trusted_log import CheckpointKeeper, expected_steps, log_problems, observed_curve
from env.workspace import apply_patch, materialise_base, materialise_commit
from search_space.edits import EditError
from search_space.knobs import routed_values
from search_space.records import RunResult, Status, Trust
from search_space.rules import RuleViolation
from search_space.target import Target

TAIL_CHARS = 3000


@dataclass(frozen=True)
class RunSpec:
    """One run: which candidate, which seed, how long, and the band that may stop it early."""

    target: Target
    seed: int = 0
    fidelity: str = "full"
    repo: Path | None = None  # with `commit`: a candidate of a search's history
    commit: str | None = None
    patch: str | None = None  # applied on top of the commit (or of the target's base)
    band: Band | None = None
    gpu_ids: tuple[str, ...] = ()
    run_id: str = ""
    env: tuple[tuple[str, str], ...] = ()  # extra environment (e.g. the controller's NCCL safety settings)
    # Set by env/source.py `ship` on the controller: the source by value (a worker never opens
    # `repo` or the target's folder), the target's base for data.prepare, the controller's code version.
    source: Source | None = None
    data_source: DataSource | None = None
    code_version: str = ""
    origin_node: str = ""  # the controller's Ray node: a run elsewhere keeps its folder in its node's cache
    fills_cache: bool = False  # a run of the base: it may write the shared compile cache (env/cache_layer.py)
    # the controller's data key, for a `{key}` data path (env/data.py); "": this node's own. Never printed.
    data_key: str = field(default="", repr=False)


def make_sandbox(name: str, target: Target | None = None, image: str | None = None, warm: bool = False) -> Sandbox:
    """`warm`: a long-lived caller (a pool worker) lets the process sandbox start the next training
    run ahead (env/warm.py)."""
    if name == "process":
        from env.process_sandbox import ProcessSandbox

        return ProcessSandbox(warm=warm)
    if name == "docker":
        from env.docker_sandbox import DockerSandbox

        return DockerSandbox(image=image or (target.docker_image if target else "speedsearch-runner:latest"))
    raise ValueError(f"sandbox {name!r}: use process or docker")


def log_tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _materialise(spec: RunSpec, workdir: Path) -> None:
    if spec.source is not None:
        unship(spec.source, workdir)
    elif spec.commit:
        materialise_commit(spec.repo or spec.target.repo, spec.commit, workdir)
    else:
        materialise_base(spec.target, workdir)
    if spec.patch:
        apply_patch(spec.target, workdir, spec.patch)


def _link_data(target: Target, workdir: Path, data: Path | None) -> None:
    """`data.link`: a symlink in the workdir to the data folder (mounted read-only at its own path
    in the sandbox), for loaders that accept only relative paths; it travels with the workspace."""
    if target.data_link is None or data is None:
        return
    link = workdir / target.data_link
    if link.exists() or link.is_symlink():
        raise DataError(f"data.link: {target.data_link} already exists in the candidate's tree")
    folder = workdir
    for part in Path(target.data_link).parts[:-1]:  # never through a link of the tree's (out of the workdir)
        folder = folder / part
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise DataError(f"data.link: {folder.relative_to(workdir)} in the candidate's tree is no folder")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(data).resolve(), target_is_directory=True)


def evaluate(spec: RunSpec, sandbox: Sandbox, run_root: Path, cancel: threading.Event | None = None,
             cache_dir: Path | None = None, keep_workdir: bool = False, continuation: Continuation | None = None
             ) -> RunResult:
    """Never raises for anything the candidate does: every outcome is a RunResult with a reason.
    `continuation`: a `[checkpoint]` target's run state (env/run_state.py): restored before the run
    when one was saved, watched and sent back while it runs."""
    target = spec.target
    t0 = time.perf_counter()
    run_dir = Path(run_root) / (spec.run_id or f"{spec.fidelity}-s{spec.seed}-{uuid.uuid4().hex[:8]}")
    if continuation is not None and run_dir.exists():  # a lost run sent again to this node: what it left
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.lost-{uuid.uuid4().hex[:6]}"))  # (its processes' folders)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)  # the sandbox then hides it: a run (or a probe) sees its own folder, not its siblings
    workdir, log_path = run_dir / "work", run_dir / "run.log"
    steps = target.steps(spec.fidelity)
    result = RunResult(Status.INVALID, total_steps=steps, seed=spec.seed, fidelity=spec.fidelity,
                       commit=spec.commit or "", log=str(log_path),
                       provenance=provenance(spec.gpu_ids, spec.code_version))
    try:
        _materialise(spec, workdir)
        data = ensure_data(target, prepare_folder(spec.data_source) if spec.data_source else None, spec.data_key)
        _link_data(target, workdir, data)
    except (EditError, RuleViolation) as e:
        result.reason = f"invalid change: {e}"
        log_path.write_text(result.reason + "\n")
        return _done(result, t0, workdir, keep_workdir, sandbox)
    except DataError as e:
        result.status, result.reason = Status.FAILED, str(e)
        return _done(result, t0, workdir, keep_workdir, sandbox)

    env, flags = routed_values(workdir, target.knobs)
    resume = continuation.restore(workdir) if continuation is not None else ""
    command = target.render_command(seed=spec.seed, steps=steps, data=data or "", resume=resume)
    target_env = target.render_env(seed=spec.seed, steps=steps, data=data or "", resume=resume)
    if continuation is not None:
        target_env = {**continuation.env(resume), **target_env}
    if flags:
        command += " " + " ".join(shlex.quote(f) for f in flags)
    trust = target.checked_trust
    reader = (continuation.make_reader if continuation is not None else CurveReader)(
        target.readout, steps, trust.pause_regex if trust else None)
    keeper = CheckpointKeeper(trust, workdir, run_dir / "ckpt") if trust else None
    if continuation is not None and keeper is not None:  # the weights kept before a break come back
        continuation.restore_kept(keeper)
    pruned: list[str] = []

    def on_line(line: str) -> bool:
        if target.readout.format == "jsonl":  # read from its metrics file once the run ended
            return False
        point = reader.feed(line)
        if point is None:
            return reader.nonfinite is not None
        if keeper is not None:
            keeper.take(point.step)  # now, before the run could replace it with a later model
        if spec.band is not None and spec.band.worse(point):
            pruned.append(f"val_loss {point.val_loss:.4f} at step {point.step} is above the baseline band "
                          f"({spec.band.limit(point.step):.4f})")
            return True
        return False

    request = SandboxRequest(
        command=command, workdir=workdir, log_path=log_path,
        env={**{k: os.environ[k] for k in target.passthrough_env if k in os.environ}, **dict(spec.env),
             **target_env, **env},
        limits=Limits(timeout_s=target.resources.run_timeout_s,
                      memory_mb=run_memory_mb(target.resources.memory_mb, target.resources.gpus, target.resources.cpus),
                      cpus=target.resources.cpus, gpu_ids=spec.gpu_ids, pids=target.resources.pids,
                      log_mb=target.resources.log_mb, disk_mb=target.resources.disk_mb),
        data=data, cache_dir=cache_dir if cache_dir is not None else shared_cache(),
        cache_write=spec.fills_cache or (spec.commit is None and spec.patch is None),
        hide=hidden_paths(target, spec.data_key), warm=True,
        warm_imports=target.warm_imports)
    evaluator = None if trust is None else Evaluator(
        trust, sandbox, lambda dest: _materialise(spec, dest), run_dir, request.env, request.limits, request.hide,
        keep_workdir, rules=target.rules)
    try:
        if evaluator is not None and evaluator.early:  # its imports overlap the training run
            evaluator.start(wait_s=target.resources.run_timeout_s)
        started = reader.started = time.monotonic()  # a regex readout's clock starts with the run
        if continuation is not None:
            continuation.watch(workdir, log_path, keeper)
        try:
            outcome = sandbox.run(request, on_line=on_line, cancel=cancel)
        except Exception as e:  # a sandbox that cannot start is the machine's fault, not the candidate's
            result.status, result.reason = Status.FAILED, f"sandbox error: {type(e).__name__}: {e}"
            return _done(result, t0, workdir, keep_workdir, sandbox)
        finally:
            if keeper is not None:
                keeper.settle()  # the copies asked for while the run went on, before its folder goes
            if continuation is not None:  # a continued run's log: the saved one, then its own
                continuation.finish(log_path, result.provenance)
        if target.readout.format == "jsonl":
            reader.read_metrics_file(workdir)
            result.curve = list(reader.points)  # no arrival times to observe: the claimed curve, untrusted
        else:
            result.curve = observed_curve(reader)  # claimed losses, observed times (untrusted until measured)
        result.claimed = list(reader.points)
        result.provenance["peak_rss_mb"] = outcome.peak_rss_mb
        result.provenance["cpu_s"] = outcome.cpu_s
        result.provenance["sandbox"] = sandbox.name
        result.provenance["containment"] = outcome.containment
        result.provenance["command"] = command
        result.status, result.reason = _classify(outcome, reader, pruned, log_path)
        if result.status == Status.OK and evaluator is not None and keeper is not None:
            _trusted_measurement(spec, result, reader, keeper, max(started, outcome.began or started), evaluator,
                                 continuation.untrusted_before() if continuation is not None else (-1, ""),
                                 outcome.cpu_s)
    except BaseException:  # a cancel (KeyboardInterrupt in a Ray task) still frees the workspace volume
        sandbox.release(workdir, keep_workdir)
        raise
    finally:
        if evaluator is not None:
            evaluator.close()
        if keeper is not None and not keep_workdir:
            shutil.rmtree(keeper.keep_dir, ignore_errors=True)
    return _done(result, t0, workdir, keep_workdir, sandbox)


def _trusted_measurement(spec: RunSpec, result: RunResult, reader: CurveReader, keeper: CheckpointKeeper,
                         started: float, evaluator: Evaluator, continued: tuple[int, str] = (-1, ""),
                         cpu_s: float | None = None) -> None:
    """Check the log against what the sandbox observed, then recompute every point's loss from its
    checkpoint on held-out data (env/trusted.py). Any disagreement makes the run invalid. A continued
    run (env/run_state.py) has its clock checked across the break; the weights kept before it came
    back with its state, so every point is measured. `continued` = (floor, why): where they did not
    (over the cap), only the points after step `floor` are, and the run stays untrusted."""
    floor, why = continued
    trust, target = spec.target.trust, spec.target
    data_folder = data_root(target, spec.data_key)
    assert trust is not None and data_folder is not None
    t = time.perf_counter()
    problems, info = log_problems(trust, reader, result.total_steps, started, target.resources.startup_s)
    problems += keeper.problems([s for s in expected_steps(result.total_steps, trust.every) if s > floor])
    result.provenance["trust"] = info
    # A timing problem alone (start-up, clock) leaves every checkpoint in place: the losses are still
    # measured, so the reason names every problem. On a loaded machine a late line can trip the clock
    # check first and hide what the loss check finds (stop 17's CI: a subset-validation attack).
    if not [p for p in problems if not p.startswith(TIMING_PROBLEMS)]:
        scale = target.readout.scale  # the evaluator measures nats; the curve may hold bpb (readout.unit)
        # the checkpoint the objective reads (a loss at a budget short of the run's end): probed, and the guards' model
        budget = getattr(target.objective, "budget", None)
        at = budget.read_at(observed_curve(reader)) if target.objective == "loss_at_budget" and budget else None
        measured = evaluator.finish(keeper.kept, data_folder / trust.heldout,
                                    {p.step: p.val_loss / scale for p in reader.points}, at=at)
        problems, info["losses"] = problems + measured.problems, measured.losses
        info.update(measured.info)
        if not problems and target.guards:  # scores that must not drop: the evaluator's logits', the kernel's
            result.guards, problems = measure_guards(target.guards, evaluator, keeper.kept, data_folder, info,
                                                     at=measured.info.get("probe_step"))
            result.guards.update(cpu_scores(target.guards, reader, cpu_s))
        if not problems:
            result.curve = observed_curve(reader, {s: v * scale for s, v in measured.losses.items()})
            result.trust = Trust.TRUSTED.value if floor < 0 else result.trust
            if why:
                info["continued"] = why
    info["seconds"] = round(time.perf_counter() - t, 3)
    if problems:
        result.status, result.reason = Status.INVALID, "the log is not to be trusted: " + "; ".join(problems)


TIMING_PROBLEMS = ("clock:", "start-up:")  # env/trusted_log.log_problems' problems that leave the log whole
TRACEBACK = "Traceback (most recent call last):"
RANK_PREFIX = re.compile(r"^\[(?:default)?rank(\d+)\]:\s?")  # torchrun's per-rank line prefix
ROOT_RANK = re.compile(r"Root Cause \(first observed failure\):.*?\brank\s*:\s*(\d+)", re.S)
TRACE_LINES, TRACE_TAIL_CHARS, SCAN_BYTES = 60, 1000, 32 << 20


def first_traceback(log_path: Path) -> str:
    """The first `Traceback (most recent call last):` block of the log, through its exception line,
    without torchrun's `[rankN]:` prefixes; the failing rank's where the launcher's report names it
    ("Root Cause ... rank: N"), else the first of any rank. Empty when the log holds none."""
    try:
        with open(log_path, "rb") as f:
            text = f.read(SCAN_BYTES).decode(errors="replace")
    except OSError:
        return ""
    root = ROOT_RANK.search(log_tail(log_path, 8000))
    want = root.group(1) if root else None
    blocks: dict[str | None, list[str]] = {}  # an open block per rank (None: unprefixed lines)
    for raw in text.splitlines():
        m = RANK_PREFIX.match(raw)
        rank, line = (m.group(1), raw[m.end():]) if m else (None, raw)
        block = blocks.get(rank)
        if block is None:
            if line.strip() == TRACEBACK and (want is None or rank in (want, None)):
                blocks[rank] = [line]
            continue
        block.append(line)
        if line and not line[0].isspace():
            return _clip(block)  # the exception line ends the block (a chained one's cause is this)
    return _clip(next(iter(blocks.values()))) if blocks else ""


def _clip(lines: list[str]) -> str:
    """A long traceback keeps its first frames and its last ones (the exception is at the end)."""
    if len(lines) > TRACE_LINES:
        lines = lines[:10] + [f"  ... {len(lines) - TRACE_LINES} lines ..."] + lines[-(TRACE_LINES - 10):]
    return "\n".join(lines)


def _classify(outcome, reader: CurveReader, pruned: list[str], log_path: Path) -> tuple[Status, str]:
    if outcome.killed == "stopped" and pruned:
        return Status.PRUNED, pruned[0]
    if reader.nonfinite:
        return Status.FAILED, f"loss diverged: {reader.nonfinite}"
    if outcome.killed == "timeout":
        return Status.TIMEOUT, f"killed after the time limit; {outcome.detail}".strip("; ")
    if outcome.killed == "memory":
        return Status.FAILED, f"out of memory: {outcome.detail or 'memory limit exceeded'}"
    if outcome.killed == "log":
        return Status.INVALID, outcome.detail or "log over its cap"
    if outcome.killed == "disk":
        return Status.FAILED, outcome.detail or "disk quota"
    if outcome.killed == "cancelled":
        return Status.FAILED, "cancelled"
    if outcome.exit_code != 0:
        detail = f" ({outcome.detail})" if outcome.detail else ""  # e.g. the process limit was reached
        tail = log_tail(log_path)
        trace = first_traceback(log_path)
        # the exception's own line first: a table shows a reason's head, and frames come before it
        head = f"exit code {outcome.exit_code}{detail}" + (f": {trace.splitlines()[-1].strip()[:200]}" if trace else "")
        if trace and trace not in tail:  # under torchrun the tail is the launcher's report, not the cause
            return Status.FAILED, (f"{head}; first traceback:\n{trace}\n"
                                   f"log tail:\n{tail[-TRACE_TAIL_CHARS:]}")
        return Status.FAILED, f"{head}; log tail:\n{tail}"
    if problem := reader.problem:
        return Status.INVALID, f"the log is not to be trusted: {problem}"
    if why := reader.incomplete():
        return Status.FAILED, f"{why}; log tail:\n{log_tail(log_path)}"
    return Status.OK, ""


def _done(result: RunResult, t0: float, workdir: Path, keep: bool, sandbox: Sandbox) -> RunResult:
    sandbox.release(workdir, keep)  # unmounts the workspace's volume (its files stay if kept)
    result.wall_s = time.perf_counter() - t0
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result
