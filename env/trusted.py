"""Trusted measurement: what a run's result records is measured here, on the host, never believed.

- Clock: every training interval the log claims between two validations must agree with the interval
  the sandbox observed (the arrival of the step's pause marker minus the arrival of the previous
  validation line); the recorded times are the observed ones.
- Log: validations at every step the target expects (step 0 included), start-up within its allowance.
- Loss: the trainer saves a checkpoint at each validation; the host copies it out of the run when the
  validation line arrives (so a run cannot rewrite an earlier checkpoint later). After the run, the
  target's frozen `model_command` loads each checkpoint with the candidate's model code, in fresh
  sandboxed processes that see only the held-out INPUT windows (never the data folder), and writes
  logits; the loss against the next tokens is computed here, in numpy. Another fresh process gets
  the same windows with the tokens after a random cut (per row) replaced: logits before the cut
  must not change (look-ahead). The model processes may start with the training run (`{go}`): they
  import their frameworks and wait; candidate code loads only once the training run is gone.
Every disagreement is a problem string naming the detection and both numbers; the caller makes the
run `invalid`. The log's and the clock's checks, and the checkpoint keeper, are in env/trusted_log.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from env import rule_probes
from env.sandbox import Limits, Sandbox, SandboxOutcome, SandboxRequest
from search_space.target import Trust
from search_space.track_rules import TrackRules

MAGIC, HEADER_INTS = 20240520, 256  # the NanoGPT speedrun's .bin shard: int32 header, uint16 tokens
NORMAL_SHARDS = 2  # processes for the normal pass: each takes every other checkpoint, all run at once


def fresh_start_problem(trust: Trust, step0: float | None) -> str | None:
    """Step 0 must be an untrained model. Anything learned before step 0's line (inside the start-up
    allowance, where nothing is on the clock or the step count) would otherwise reach the objective
    for free: a tinylm-bpb run that trained 800 steps there scored 2.41 bpb against the base's 2.88."""
    if step0 is None or trust.fresh_start <= 0:  # a continued run's step 0 was measured before the break
        return None
    uniform = math.log(trust.vocab)
    floor = trust.fresh_start * uniform
    if step0 >= floor:
        return None
    return (f"step 0: the trusted evaluation measured {step0:.4f} nats a token at step 0, below an untrained "
            f"model's floor of {floor:.4f} ({trust.fresh_start:g} x ln {trust.vocab} = {uniform:.4f}): the model "
            "learned before its first step")


_WINDOWS: dict[tuple[Path, int, int], np.ndarray] = {}


def heldout_windows(path: Path, n: int, seq_len: int) -> np.ndarray:
    """n windows of seq_len + 1 tokens, evenly spaced over the held-out shard (the same every run)."""
    key = (path, n, seq_len)
    if key not in _WINDOWS:
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
        if len(header) < HEADER_INTS or header[0] != MAGIC:
            raise ValueError(f"{path}: not a token shard (magic {MAGIC})")
        tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(int(header[2]),))
        starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
        _WINDOWS[key] = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    return _WINDOWS[key]


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean next-token cross-entropy, computed here (never by the candidate's code): float32
    arithmetic per position (exact enough for a few hundred classes), float64 sums."""
    x = np.asarray(logits, dtype=np.float32).reshape(-1, logits.shape[-1])
    m = x.max(axis=1)
    total = np.exp(x - m[:, None]).sum(axis=1, dtype=np.float64)
    picked = x[np.arange(len(x)), targets.reshape(-1)].astype(np.float64) - m
    return float(np.mean(np.log(total) - picked))


@dataclass
class Pass:
    """One fresh model process: its folder, the checkpoints it loads, its inputs, what it wrote."""

    name: str
    folder: Path
    steps: list[int] = field(default_factory=list)
    inputs: np.ndarray | None = None
    problem: str | None = None
    seconds: float = 0.0  # the model process's wall time
    outcome: SandboxOutcome | None = None
    thread: threading.Thread | None = None


@dataclass
class Measured:
    losses: dict[int, float]
    problems: list[str]
    info: dict


def probe_inputs(windows: np.ndarray, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[int, int]]:
    """The inputs with `rows` rows cut at their own random position: every token after the cut is
    replaced by the same positions of another held-out window (so it still looks like text)."""
    x = windows[:, :-1].copy()
    n, t = x.shape
    cuts: dict[int, int] = {}
    for r in rng.choice(n, size=min(rows, n), replace=False):
        cut = int(rng.integers(0, t - 1))
        donor = int((r + rng.integers(1, n)) % n) if n > 1 else r
        x[r, cut + 1:] = windows[donor, cut + 1:t]
        cuts[int(r)] = cut
    return x, cuts


def lookahead_problem(normal: np.ndarray, probed: np.ndarray, cuts: dict[int, int],
                      tol: float) -> tuple[str | None, float]:
    worst = (0.0, 0, 0)
    for r, cut in cuts.items():
        d = np.abs(probed[r, :cut + 1] - normal[r, :cut + 1]).max(axis=-1)
        if not np.all(np.isfinite(d)):
            return f"look-ahead: logits at positions up to {cut} of a probed row are not finite", float("inf")
        worst = max(worst, (float(d.max()), int(d.argmax()), cut))
    d, pos, cut = worst
    if d > tol:
        return (f"look-ahead: logits at position {pos} changed by {d:.4g} when only tokens after position "
                f"{cut} changed (tolerance {tol:g})"), d
    return None, d


def rule_checkpoint(steps: list[int], budget: int | None, rng: np.random.Generator) -> int | None:
    """The checkpoint the rule probes take: the one a loss at a budget reads, else one at random
    (a time or steps to target counts wherever its curve crosses)."""
    if budget in steps or not steps:
        return budget if steps else None
    return steps[int(rng.integers(len(steps)))]


class Evaluator:
    """The model processes of one run's trusted evaluation: the normal pass over the checkpoints
    (split between NORMAL_SHARDS processes, which run at once) and the look-ahead probe of the
    checkpoint the objective reads (the last, unless a budget ends earlier), each a fresh sandboxed
    process in a fresh copy of the candidate's committed code (not what the run left behind), in a
    folder named at random and hidden from the others (env/evaluate.py makes the run's folder private).

    With `{go}` in the model command, `start()` launches them beside the training run: they import
    their frameworks, then wait for the go file; `finish()` writes their inputs and the go file once
    the training run has ended, so no candidate code ever runs beside it. Without `{go}`, `finish()`
    starts them. `close()` stops and removes whatever is left, whatever happened.
    """

    def __init__(self, trust: Trust, sandbox: Sandbox, materialise: Callable[[Path], None], run_dir: Path,
                 env: dict[str, str], limits: Limits, hide: tuple[Path, ...], keep: bool = False,
                 rules: TrackRules | None = None):
        self.trust, self.sandbox, self.materialise = trust, sandbox, materialise
        self.rules = rules  # the track's rules: their passes are env/rule_probes.py's
        self.env, self.limits, self.hide, self.keep = env, limits, hide, keep
        self.run_dir = run_dir
        self.early = "{go}" in trust.model_command
        self.cancel = threading.Event()
        # Each process's folder is named at random: its name (the model's working directory) must not
        # tell a probe from the normal pass.
        self.normal = [Pass(f"trusted-{i}", _folder(run_dir)) for i in range(NORMAL_SHARDS)]
        self.probe = Pass("probe", _folder(run_dir)) if trust.probe_rows else None
        self.rule_passes = [Pass(name, _folder(run_dir)) for name in rule_probes.pass_names(rules)]
        self.passes = self.normal + ([self.probe] if self.probe else []) + self.rule_passes
        self.started = False

    def start(self, wait_s: float = 0.0) -> None:
        """Launch the model processes; `wait_s` is how long they may wait for the go file."""
        command = self.trust.model_command.format(ckpts=".trusted/ckpts.txt", inputs=".trusted/inputs.npy",
                                                  out=".trusted/out", go=".trusted/go")
        limits = dataclasses.replace(self.limits, timeout_s=self.trust.timeout_s + wait_s)
        for p in self.passes:
            if not p.folder.exists():
                self.materialise(p.folder)
                (p.folder / ".trusted").mkdir()
            request = SandboxRequest(command=command, workdir=p.folder, log_path=self.run_dir / f"{p.name}.log",
                                     env=dict(self.env), limits=limits, data=None, hide=self.hide)
            p.thread = threading.Thread(target=self._run, args=(p, request), name=f"trusted-{p.name}", daemon=True)
            p.thread.start()
        self.started = True

    def _run(self, p: Pass, request: SandboxRequest) -> None:
        t = time.perf_counter()
        try:
            p.outcome = self.sandbox.run(request, cancel=self.cancel)
        except Exception as e:  # a sandbox that cannot start: still a reason
            p.problem = f"sandbox error: {type(e).__name__}: {e}"
        p.seconds = round(time.perf_counter() - t, 3)

    def finish(self, kept: dict[int, Path], heldout: Path, claimed: dict[int, float],
               at: int | None = None) -> Measured:
        """Recompute the loss at every kept checkpoint; probe every one for look-ahead (a time or
        steps to target is read where the curve crosses it, at any validation) and one for the track's
        rules: `at`, the checkpoint the objective reads (a loss at a budget short of the run's end),
        else one drawn at random here (a time or steps to target counts wherever the curve crosses:
        a model that keeps to the rules at some checkpoints only cannot know which one is probed)."""
        trust = self.trust
        windows = heldout_windows(heldout, trust.windows, trust.seq_len)
        rng = np.random.default_rng(secrets.randbits(64))  # drawn here, unknown to the model process
        probed, cuts = probe_inputs(windows, trust.probe_rows, rng)
        steps = sorted(kept)
        rule_at = rule_checkpoint(steps, at, rng)
        at = at if at in kept else steps[-1] if steps else None
        for i, p in enumerate(self.normal):
            p.steps, p.inputs = steps[i::len(self.normal)], windows[:, :-1]
        if self.probe is not None:
            self.probe.steps, self.probe.inputs = list(steps), probed
        rule_plan = rule_probes.plan(self.rules, windows, heldout, rng)
        for p in self.rule_passes:
            p.steps, p.inputs = [rule_at], rule_plan[p.name].inputs
        if not self.started:
            for p in self.passes:
                self.materialise(p.folder)
                (p.folder / ".trusted").mkdir()
                self._hand_over(p, kept)
            self.start()
        else:
            for p in self.passes:
                # The process says when it is inside its sandbox and waiting: the folder it sees is mounted.
                deadline = time.monotonic() + trust.timeout_s
                while not (p.folder / ".trusted" / "waiting").exists() and p.thread.is_alive() \
                        and time.monotonic() < deadline:
                    time.sleep(0.005)
                self._hand_over(p, kept)
        # The losses are computed as each checkpoint's logits appear, while the process works on the next.
        losses: dict[int, float] = {}
        at_logits = None  # the normal pass's logits of checkpoint `rule_at`, for the rule probes
        for p in self.normal:
            got, logits = self._stream(p, windows[:, 1:], rule_at)
            losses.update(got)
            if logits is not None:
                at_logits = logits
        for p in self.passes:
            p.thread.join()
            self._check_outcome(p)
        rule_logits = {p.name: self._load(p, 0) for p in self.rule_passes if not p.problem}
        info: dict = {"heldout_windows": int(len(windows)), "heldout_tokens": int(windows[:, 1:].size),
                      "probe_rows": len(cuts), "probe_step": at, "rule_step": rule_at,
                      "process_s": {p.name: p.seconds for p in self.passes},
                      "started_early": self.early}
        problems = [f"trusted evaluation ({p.name} pass): {p.problem}" for p in self.passes if p.problem]
        if problems:
            return Measured({}, problems, info)
        if self.probe is not None:
            why, info["probe_max_change"] = self._lookahead(cuts)
            if why:
                problems.append(why)
        problems += self._rule_problems(rule_plan, at_logits, rule_logits, windows, heldout, info)
        losses = dict(sorted(losses.items()))
        if (why := fresh_start_problem(trust, losses.get(0))) is not None:
            problems.append(why)
        for s in steps:
            c, m = claimed.get(s), losses[s]
            if c is not None and not abs(c - m) <= trust.loss_tolerance:
                problems.append(f"loss: the log claims val_loss {c:.4f} at step {s}, the trusted evaluation "
                                f"measured {m:.4f} (tolerance {trust.loss_tolerance:g})")
        if len(problems) > 3:  # one loss line per checkpoint says nothing more after the first few
            problems[3:] = [f"{len(problems) - 3} more disagreements"]
        return Measured(losses, problems, info)

    def _lookahead(self, cuts: dict[int, int]) -> tuple[str | None, float]:
        """The look-ahead probe at each checkpoint against the normal pass's logits of the same one,
        read back from their files one checkpoint at a time (two arrays in memory, never all)."""
        assert self.probe is not None
        worst = 0.0
        for i, s in enumerate(self.probe.steps):
            owner = next(p for p in self.normal if s in p.steps)
            probed, normal = self._load(self.probe, i), self._load(owner, owner.steps.index(s))
            if probed is None or normal is None:
                return f"trusted evaluation (probe pass): no logits for the checkpoint of step {s}", float("inf")
            why, d = lookahead_problem(normal, probed, cuts, self.trust.probe_tolerance)
            if why:
                return f"{why} at the checkpoint of step {s}", d
            worst = max(worst, d)
        return None, worst

    def _rule_problems(self, plan: dict, last: np.ndarray | None, logits: dict[str, np.ndarray],
                       windows: np.ndarray, heldout: Path, info: dict) -> list[str]:
        """The track's rules (env/rule_probes.py): its passes' logits, the windows, the data budget."""
        if self.rules is None:
            return []
        found, info["rules"] = rule_probes.problems(self.rules, plan, last, logits)
        info["rules"]["pack"], info["rules"]["heldout_digest"] = self.rules.pack, rule_probes.windows_digest(windows)
        found += filter(None, [rule_probes.overlap_problem(self.rules, windows, heldout)])
        data_folder = heldout.parents[len(Path(self.trust.heldout).parts) - 1]
        why, info["rules"]["train_tokens"] = rule_probes.budget_problem(self.rules, data_folder)
        return found + ([why] if why else [])

    def _stream(self, p: Pass, targets: np.ndarray, keep: int | None) -> tuple[dict[int, float], np.ndarray | None]:
        """The loss of each checkpoint of the normal pass as soon as its file is complete (the server
        renames it into place); returns the losses and the logits of checkpoint `keep` (for the probes)
        when this pass has it."""
        losses: dict[int, float] = {}
        kept = None
        for i, s in enumerate(p.steps):
            path = p.folder / ".trusted" / "out" / f"{i:03d}.npy"
            while not path.exists() and p.thread.is_alive():
                time.sleep(0.005)
            logits = self._load(p, i)
            if logits is None:
                break
            losses[s] = cross_entropy(logits, targets)
            kept = logits if s == keep else kept
        return losses, kept

    def _hand_over(self, p: Pass, kept: dict[int, Path]) -> None:
        """The checkpoints, their list and the inputs into the pass's folder; the go file last."""
        io = p.folder / ".trusted"
        (io / "ckpt").mkdir(exist_ok=True)
        names = []
        for s in p.steps:
            shutil.copyfile(kept[s], io / "ckpt" / kept[s].name)
            names.append(f".trusted/ckpt/{kept[s].name}")
        (io / "ckpts.txt").write_text("\n".join(names) + "\n")
        np.save(io / "inputs.npy", p.inputs)
        (io / "go.tmp").write_text("")
        os.replace(io / "go.tmp", io / "go")

    def _check_outcome(self, p: Pass) -> None:
        out, log = p.outcome, self.run_dir / f"{p.name}.log"
        if out is None or out.killed or out.exit_code != 0:  # the cause, rather than its missing logits
            if out is None:
                p.problem = p.problem or "the model process did not start"
                return
            why = "; ".join(filter(None, (out.killed or f"exit code {out.exit_code}", out.detail)))
            # Not its log: the model process ran candidate code beside the held-out windows, and a reason
            # reaches the proposer (its prompt's recent failures): a tail quoted here sent back 1 KiB of
            # held-out text a run (tests/test_redteam_data.py). The log stays in the run's folder.
            p.problem = f"the model process failed ({why}); its log ({log.name}) is not quoted: it saw held-out data"

    def _load(self, p: Pass, i: int) -> np.ndarray | None:
        """The i-th logits file of a pass, checked (a plain file, float32, the expected shape)."""
        path, step = p.folder / ".trusted" / "out" / f"{i:03d}.npy", p.steps[i]
        want = (*p.inputs.shape, self.trust.vocab)
        if not path.is_file() or path.is_symlink():
            p.problem = p.problem or f"no logits for the checkpoint of step {step}"
            return None
        try:
            arr = np.load(path, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError) as e:
            # the error's text, the shape and the dtype are the candidate's choice (an .npy header's keys,
            # a field's name): none of them is quoted, as for the log above
            p.problem = p.problem or f"unreadable logits for step {step} ({type(e).__name__})"
            return None
        if arr.shape != want or arr.dtype != np.float32:
            p.problem = p.problem or f"logits for step {step} are not float32{list(want)}"
            return None
        return np.array(arr)

    def close(self) -> None:
        """Stop what still runs (a run that ended badly never sends go) and remove the folders, all
        passes at once (unmounting a volume takes a while)."""
        self.cancel.set()

        def clean(p: Pass) -> None:
            if p.thread is not None:
                p.thread.join()
            release = getattr(self.sandbox, "release", None)
            if release is not None and p.folder.exists():
                release(p.folder, keep=self.keep)
            if not self.keep:
                shutil.rmtree(p.folder, ignore_errors=True)

        cleaners = [threading.Thread(target=clean, args=(p,)) for p in self.passes]
        for t in cleaners:
            t.start()
        for t in cleaners:
            t.join()


def _folder(run_dir: Path) -> Path:
    return run_dir / f"m-{secrets.token_hex(6)}"


def extra_pass(ev: Evaluator, name: str, steps: list[int], inputs: np.ndarray,
               kept: dict[int, Path]) -> tuple[list[np.ndarray], str | None]:
    """One more fresh model process of `ev`'s kind, run after `finish` (env/guard.py's guard corpora):
    the same frozen model command, sandbox, limits and hidden paths, in a fresh copy of the committed
    code; it loads the checkpoints of `steps` and writes logits for `inputs`. Returns the checked
    logits, one array per step, or the problem. `ev.close()` removes its folder with the others'."""
    p = Pass(name, _folder(ev.run_dir), steps=list(steps), inputs=inputs)
    ev.passes.append(p)
    ev.materialise(p.folder)
    (p.folder / ".trusted").mkdir()
    ev._hand_over(p, kept)  # the go file is there before the process starts: it goes straight on
    command = ev.trust.model_command.format(ckpts=".trusted/ckpts.txt", inputs=".trusted/inputs.npy",
                                            out=".trusted/out", go=".trusted/go")
    request = SandboxRequest(command=command, workdir=p.folder, log_path=ev.run_dir / f"{name}.log",
                             env=dict(ev.env), limits=dataclasses.replace(ev.limits, timeout_s=ev.trust.timeout_s),
                             data=None, hide=ev.hide)
    ev._run(p, request)
    ev._check_outcome(p)
    logits = [] if p.problem else [ev._load(p, i) for i in range(len(p.steps))]
    if p.problem or any(x is None for x in logits):
        return [], p.problem or "no logits"
    return logits, None
