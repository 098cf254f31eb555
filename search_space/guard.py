"""Guard metrics: a second number a candidate must not make worse while it improves the objective.

A data-limited track refuses a lower validation loss that does not carry over to anything else
(a model tuned to the validation text, a mixture that drops what the validation set lacks). A
target declares `[[guard]]` entries; each names a second held-out corpus (outside the run's
mount, like `[trust] heldout`), a score the HOST computes from the trusted evaluator's logits on
it (env/guard.py), and how far the score may drop:

    [[guard]]
    name = "prose accuracy"
    heldout = "guard/text_000.bin"  # relative to the data folder; never visible to a run
    score = "accuracy"               # next-token accuracy ("higher" is better) or "loss" ("lower")
    tolerance = 0.01                 # the margin: the largest drop still accepted, in the score's unit
    alpha = 0.01                     # the non-inferiority test's level

A guard on compute (`score = "cpu"`, no corpus) holds a loss-at-a-budget track to what it means.
A budget of steps or tokens is the trainer's own count: a run can train before step 0's line (off
the step count; the evaluator's `[trust] fresh_start` refuses a step 0 that already learned, not one
that saved an untrained step 0 and then loaded what it trained), or draw several batches a step. What
the host can count is compute: the CPU seconds the kernel counted in the run's cgroup, the whole run
(wall time was tried first: on a loaded machine a base's start-up alone varied 4x). `tolerance` is
then a ratio: the most times the base's CPU seconds a candidate may use (compared in log space: the
drop is ln(candidate / base)); a pair counts only on one node. It measures a CPU trainer's work; a GPU
trainer's CPU seconds are its launches and waits, a weaker proxy.

    [[guard]]
    name = "compute"
    score = "cpu"
    tolerance = 1.5                  # at most 1.5 x the base's CPU seconds

The check is a paired non-inferiority test over the confirm pairs (candidate and base run of the
same seed): one-sided t-test of H0 "the mean drop is at least `tolerance`" at level `alpha`. A
candidate must show that its guard did not drop by the margin; failing to show it (too noisy, or
a real drop) keeps it from being confirmed. Several guards need no correction: the candidate
passes only if every one does (an intersection-union test), so each at `alpha` keeps the chance of
passing a guard that really dropped at most `alpha`.

Pure: no I/O. The record types and the statistics; the measurement lives in env/guard.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from scipy import stats

from search_space.errors import UserError, typed
from search_space.records import RunResult, Status

# what the host computes (from logits; "cpu" from the run's cgroup), and which way is better
SCORES = {"accuracy": "higher", "loss": "lower", "cpu": "lower"}
CPU = "cpu"
KEYS = ("name", "heldout", "score", "direction", "tolerance", "alpha", "windows", "seq_len")
ALPHA = 0.01


class GuardError(UserError):
    """A `[[guard]]` entry that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Guard:
    """One guard metric (see the module's docstring)."""

    name: str
    heldout: str  # a token shard (the speedrun's .bin format), relative to the data folder ("" for cpu)
    tolerance: float  # the non-inferiority margin, in the score's unit (accuracy: a fraction; cpu: a ratio)
    score: str = "accuracy"
    direction: str = "higher"
    alpha: float = ALPHA
    windows: int = 64  # windows of the guard corpus the model scores
    seq_len: int = 0  # tokens per window; 0: the trusted evaluator's seq_len


def parse_guards(raw: Any, seq_len: int | None, mount: str | None) -> tuple[Guard, ...]:
    """The `[[guard]]` entries. `seq_len`: `[trust] seq_len` (None without `[trust]`: guards are
    then refused, since their logits come from the trusted evaluator); `mount`: `[data] mount`
    (a guard corpus must lie outside it, or the run could train on it)."""
    if not isinstance(raw, list) or not all(isinstance(g, dict) for g in raw):
        raise GuardError("guard: expected [[guard]] tables")
    if seq_len is None:
        raise GuardError("guard: needs a [trust] section (a guard is scored from the trusted evaluator's logits)")
    out: list[Guard] = []
    for i, g in enumerate(raw):
        where = f"guard[{i}]"
        unknown = sorted(set(g) - set(KEYS))
        if unknown:
            raise GuardError(f"{where}.{unknown[0]}: unknown key (valid: {', '.join(KEYS)})")
        name = typed(g, "name", str, where, error=GuardError)
        if not name.strip() or any(o.name == name for o in out):
            raise GuardError(f"{where}.name: a non-empty name used once, got {name!r}")
        where = f"guard {name!r}"
        score = typed(g, "score", str, where, "accuracy", error=GuardError)
        if score not in SCORES:
            raise GuardError(f"{where}.score: {score!r} is not one of {', '.join(SCORES)}")
        direction = typed(g, "direction", str, where, SCORES[score], error=GuardError)
        if direction != SCORES[score]:
            raise GuardError(f"{where}.direction: {score} is better {SCORES[score]}, got {direction!r}")
        if score == CPU:
            out.append(_cpu_guard(g, name, where))
            continue
        heldout = typed(g, "heldout", str, where, error=GuardError)
        parts = Path(heldout).parts
        if not heldout or Path(heldout).is_absolute() or ".." in parts:
            raise GuardError(f"{where}.heldout: a relative path inside the data folder, got {heldout!r}")
        if mount is None:
            raise GuardError(f"{where}.heldout: needs data.mount (a run sees only its mount, never the guard corpus)")
        if parts[0] == Path(mount).parts[0]:
            raise GuardError(f"{where}.heldout: {heldout} is inside the run's mount {mount!r}; the run could "
                             "train on it")
        tolerance = float(typed(g, "tolerance", (int, float), where, error=GuardError))
        if not tolerance >= 0 or not math.isfinite(tolerance) or (score == "accuracy" and tolerance >= 1):
            raise GuardError(f"{where}.tolerance: a margin >= 0 in the score's unit, got {tolerance!r}")
        alpha = _alpha(g, where)
        windows = typed(g, "windows", int, where, 64, error=GuardError)
        win_len = typed(g, "seq_len", int, where, seq_len, error=GuardError)
        if windows < 1 or win_len < 1:
            raise GuardError(f"{where}: windows and seq_len must be positive, got {windows} and {win_len}")
        out.append(Guard(name, heldout, tolerance, score, direction, alpha, windows, win_len))
    return tuple(out)


def _cpu_guard(g: dict, name: str, where: str) -> Guard:
    extra = sorted(set(g) & {"heldout", "windows", "seq_len"})
    if extra:
        raise GuardError(f"{where}.{extra[0]}: a cpu guard reads the run's cgroup, it has no corpus")
    ratio = float(typed(g, "tolerance", (int, float), where, error=GuardError))
    if not (ratio >= 1 and math.isfinite(ratio)):
        raise GuardError(f"{where}.tolerance: a cpu guard's tolerance is a ratio >= 1 (at most that many times "
                         f"the base's CPU seconds), got {ratio!r}")
    return Guard(name, "", ratio, CPU, SCORES[CPU], _alpha(g, where), windows=0)


def _alpha(g: dict, where: str) -> float:
    alpha = float(typed(g, "alpha", (int, float), where, ALPHA, error=GuardError))
    if not 0 < alpha < 0.5:
        raise GuardError(f"{where}.alpha: between 0 and 0.5, got {alpha!r}")
    return alpha


# -- the check ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardCheck:
    """A guard held over paired runs. `drop`: the mean of (base - candidate) for a higher-is-better
    score, (candidate - base) for a lower-is-better one: positive = the candidate is worse. `bound`:
    its one-sided upper (1 - alpha) confidence bound; `passed` iff bound < tolerance, i.e. the
    non-inferiority test's p-value is below alpha."""

    name: str
    score: str
    tolerance: float
    alpha: float
    pairs: int
    drop: float
    bound: float
    pvalue: float
    passed: bool
    candidate: float = math.nan  # the candidate's mean score
    base: float = math.nan  # the base's

    def text(self) -> str:
        if self.score == CPU and self.pairs >= 2:
            verb = "held" if self.passed else "failed"
            return (f"guard {self.name} {verb}: {self.candidate:.2f} CPU s vs base {self.base:.2f} CPU s a run, "
                    f"x{math.exp(self.drop):.3f} (one-sided {1 - self.alpha:.0%} bound "
                    f"x{math.exp(self.bound):.3f}) against a limit of x{self.tolerance:g}; paired non-inferiority "
                    f"t-test on log CPU time p = {self.pvalue:.3g}, alpha {self.alpha:g}, {self.pairs} pairs")
        if self.pairs < 2:
            return (f"guard {self.name}: {self.pairs} pair{'s' if self.pairs != 1 else ''} with a guard score, "
                    "too few to show it did not drop")
        verb = "held" if self.passed else "failed"
        return (f"guard {self.name} {verb}: {self.score} {self.candidate:.4f} vs base {self.base:.4f}, a drop of "
                f"{self.drop:+.4f} (one-sided {1 - self.alpha:.0%} bound {self.bound:+.4f}) against a tolerance of "
                f"{self.tolerance:g}; paired non-inferiority t-test p = {self.pvalue:.3g}, alpha {self.alpha:g}, "
                f"{self.pairs} pairs")

    def to_dict(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> GuardCheck:
        floats = ("tolerance", "alpha", "drop", "bound", "pvalue", "candidate", "base")
        return cls(**{k: (math.nan if d.get(k) is None else float(d[k])) if k in floats else d[k]
                      for k in cls.__dataclass_fields__ if k in d})


def check(guard: Guard, pairs: list[tuple[float, float]]) -> GuardCheck:
    """The non-inferiority test of one guard over (candidate score, base score) pairs."""
    cand = mean(c for c, _ in pairs) if pairs else math.nan
    base = mean(b for _, b in pairs) if pairs else math.nan
    margin = guard.tolerance
    if guard.score == CPU:  # a ratio: log time, where a run twice as costly is as far off as one half as costly
        pairs = [(math.log(max(c, 1e-9)), math.log(max(b, 1e-9))) for c, b in pairs]
        margin = math.log(guard.tolerance)
    sign = 1.0 if guard.direction == "higher" else -1.0
    drops = [sign * (b - c) for c, b in pairs]
    if len(drops) < 2:
        m = drops[0] if drops else math.nan
        return GuardCheck(guard.name, guard.score, guard.tolerance, guard.alpha, len(drops), m, math.inf, 1.0,
                          False, cand, base)
    m, s, n = mean(drops), stdev(drops), len(drops)
    if s == 0:
        p = 0.0 if m < margin else 1.0
        bound = m
    else:
        se = s / math.sqrt(n)
        p = float(stats.t.cdf((m - margin) / se, n - 1))  # H0: mean drop >= the margin
        bound = m + float(stats.t.ppf(1 - guard.alpha, n - 1)) * se
    return GuardCheck(guard.name, guard.score, guard.tolerance, guard.alpha, n, m, bound, p, p < guard.alpha,
                      cand, base)


def run_pairs(name: str, runs: Iterable[RunResult], paired: dict[int, RunResult],
              same_node: bool = False) -> list[tuple[float, float]]:
    """(candidate, base) scores of guard `name` for every seed where both runs ended OK with one.
    A model's score is a property of the trained model: pairs on two nodes still count; a time
    cpu guard's only on one node (`same_node`)."""
    out = []
    for c in runs:
        b = paired.get(c.seed)
        if b is None or c.status != Status.OK or b.status != Status.OK or (same_node and c.node != b.node):
            continue
        cs, bs = c.guards.get(name), b.guards.get(name)
        if cs is not None and bs is not None and math.isfinite(cs) and math.isfinite(bs):
            out.append((float(cs), float(bs)))
    return out


def check_runs(guards: Iterable[Guard], runs: Iterable[RunResult], paired: dict[int, RunResult]) -> list[GuardCheck]:
    runs = list(runs)
    return [check(g, run_pairs(g.name, runs, paired, same_node=g.score == CPU)) for g in guards]


def hold_guards(answer: str, guards: tuple[Guard, ...], runs: list[RunResult],
                paired: dict[int, RunResult]) -> tuple[str, str, list[GuardCheck]]:
    """A confirmation's answer after the target's guards, over its candidate runs and their base
    partners by seed: (answer, why it changed, the checks). Guards are judged only on a "pass"."""
    checks = check_runs(guards, runs, paired) if answer == "pass" and guards else []
    return (*guarded(answer, checks), checks)


def guarded(answer: str, checks: list[GuardCheck]) -> tuple[str, str]:
    """The objective's answer held against the target's guards: a "pass"
    stands only when every guard showed it did not drop beyond its tolerance; otherwise it is a
    "fail" whose reason names each failed guard, its drop and its tolerance."""
    failed = [c for c in checks if not c.passed]
    if answer != "pass" or not failed:
        return answer, ""
    return "fail", "the objective improved, but " + "; ".join(c.text() for c in failed)
