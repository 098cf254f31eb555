"""The one verdict: a candidate's speed-up over the base, its interval, the sequential paired test
that confirms it, multiplicity across the search, and the seeds each purpose uses. Pure: no I/O.

Every place that shows a speed-up (live table, status, replay, export, plots, the study's value)
builds a `Speedup` here and prints `Speedup.text()`, so the number and its words are the same.

Pairs. A pair is (candidate run, baseline run) measured on ONE node in the same window of time,
ideally with the same seed. Only the pair's own gain enters the statistics (a log-ratio of the two
objectives, or a loss difference), so pairs from several nodes can be pooled without ever
comparing raw times across machines.

Censoring. A run that never reaches the target loss has no crossing time; we know only that its
crossing lies past its last point. Such a pair is neither dropped in the candidate's favour nor
treated as infinitely slow:
- candidate censored, base reached: the pair's gain is at most log(base / candidate's last time);
  it is imputed as the mean of the exactly known gains below that bound (Efron's
  redistribute-to-the-right), or the bound less one spread when none is below, and never above 0:
  a seed that misses the loss the base reached is never counted as a win;
- base censored, candidate reached: the gain is at least the bound; it counts as the bound, the
  least favourable value for the candidate that the data allow;
- both censored: nothing is known about the ratio; the pair is left out of the estimate (and
  counted in `Speedup.censored`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, fields
from statistics import mean, stdev

from scipy import stats

from search_space.budget import Budget
from search_space.guard import guarded, hold_guards  # noqa: F401 (the verdict's guard step: loop and tests call judge's)
from search_space.records import Point

KINDS = ("time_to_target", "steps_to_target", "loss_at_budget")
RATIO_KINDS = ("time_to_target", "steps_to_target")

# The confirmation rule's defaults, tuned with bench/verdict.py (see bench/README.md).
MIN_PAIRS = 6
MAX_PAIRS = 24
LOOKS = 4  # scheduled looks between MIN_PAIRS and MAX_PAIRS
FUTILITY_P = 0.2  # at a look, a one-sided p-value above this stops the candidate
TARGET_QUANTILE = 0.975  # a new baseline seed reaches the chosen target loss with this probability (over
# the 95 % floor; 0.99, with the 3 seeds a search starts with, put the target far up the curve)


def SPENDING(t: float) -> float:  # noqa: N802 (a constant of the rule, swappable in the bench)
    """The share of alpha spent by information fraction t (pairs / MAX_PAIRS): t^2, which keeps
    most of alpha for the later looks, where modest gains on noisy machines become significant
    (large gains still pass early). bench/verdict.py measured Pocock-type, linear and t^3 too."""
    return t * t


# -- one run's objective -----------------------------------------------------------------------


@dataclass(frozen=True)
class Obs:
    """One run's objective, lower is better: ms or steps to the target loss, or the final loss
    (loss_at_budget). censored=True: the target was never reached and `value` is the last time or
    step seen, a lower bound on the true crossing."""

    value: float
    censored: bool = False


def crossing(curve: list[Point], target_loss: float, axis: str = "train_ms") -> float | None:
    """Where the curve first reaches target_loss, interpolated linearly between validation points;
    None when it never does."""
    prev = None
    for p in curve:
        if p.val_loss <= target_loss:
            x = float(getattr(p, axis))
            if prev is None or prev.val_loss == p.val_loss:
                return x
            px = float(getattr(prev, axis))
            return px + (prev.val_loss - target_loss) / (prev.val_loss - p.val_loss) * (x - px)
        prev = p
    return None


def run_objective(kind: str, curve: list[Point], target_loss: float, budget: Budget | None = None) -> Obs | None:
    """The objective of one run's (trusted) curve; None when there is no curve. loss_at_budget reads
    the last validation inside `budget` (default: the one `kind` carries, search_space/budget.py;
    without one, the run's end); a run with no validation inside it gets an infinite loss."""
    if kind not in KINDS:
        raise ValueError(f"objective {kind!r}: use one of {', '.join(KINDS)}")
    finite = [p for p in curve if math.isfinite(p.val_loss)]
    if not finite:
        return None
    if kind == "loss_at_budget":
        budget = budget or getattr(kind, "budget", None)
        inside = budget.cut(curve) if budget is not None else curve
        if not inside or not all(math.isfinite(p.val_loss) for p in inside):
            return Obs(math.inf)
        return Obs(inside[-1].val_loss)
    axis = "train_ms" if kind == "time_to_target" else "step"
    x = crossing(finite, target_loss, axis)
    return Obs(x) if x is not None else Obs(float(getattr(curve[-1], axis)), True)


def choose_target_loss(baseline_final_losses: list[float], quantile: float = TARGET_QUANTILE) -> float:
    """A target loss that a new baseline seed reaches with probability `quantile` (>= 0.95).

    The upper one-sided normal prediction bound mean + t * sd * sqrt(1 + 1/n) of the base's final
    losses, and never below the worst of them, so every recorded baseline seed reaches it. A
    target at the base's mean would leave half the base's own seeds censored.
    """
    xs = [x for x in baseline_final_losses if math.isfinite(x)]
    if not xs:
        raise ValueError("no finite baseline final loss to choose a target from")
    if len(xs) == 1:
        return xs[0]
    t = stats.t.ppf(quantile, len(xs) - 1)
    return max(max(xs), mean(xs) + t * stdev(xs) * math.sqrt(1 + 1 / len(xs)))


# -- the speed-up ------------------------------------------------------------------------------


def gains(kind: str, pairs: list[tuple[Obs, Obs]]) -> tuple[list[float], int]:
    """Each pair's gain, positive = the candidate is better: log(base / candidate) for the ratio
    kinds, base loss - candidate loss for loss_at_budget. Censoring as the module says. Returns
    (gains, pairs with a censored side)."""
    if kind == "loss_at_budget":
        return [b.value - c.value for c, b in pairs], 0
    exact = [_log(b.value) - _log(c.value) for c, b in pairs if not c.censored and not b.censored]
    spread = stdev(exact) if len(exact) >= 2 else 0.0
    out, censored = [], 0
    for c, b in pairs:
        if not c.censored and not b.censored:
            out.append(_log(b.value) - _log(c.value))
            continue
        censored += 1
        if c.censored and b.censored:
            continue
        bound = _log(b.value) - _log(c.value)
        if c.censored:  # the true gain is below `bound`
            below = [g for g in exact if g < bound]
            out.append(min(0.0, mean(below) if below else bound - spread))
        else:  # base censored: the true gain is above `bound`
            out.append(bound)
    return out, censored


def _log(x: float) -> float:
    return math.log(max(x, 1e-9))  # a crossing at step 0 (target above the first loss) is 0


def score(value: float, base_value: float) -> float:
    """A rung's score: value / the base's value (< 1 beats the base), on the same floor as the
    gains, so a crossing at step 0 or 0 ms on either side is a number, not a division by zero."""
    if math.isinf(value) and math.isinf(base_value):
        return 1.0
    if math.isinf(value) or math.isinf(base_value):
        return value / base_value
    return math.exp(_log(value) - _log(base_value))


@dataclass(frozen=True)
class Speedup:
    """THE speed-up of a candidate over the base on the target's objective.

    Ratio kinds: estimate = base / candidate (> 1: faster), a geometric mean over pairs with a
    t interval on the log scale. loss_at_budget: estimate = candidate - base final loss (< 0:
    lower loss), a mean difference with its t interval. low/high are NaN with fewer than 2 pairs.
    """

    kind: str
    target_loss: float
    estimate: float
    low: float
    high: float
    pairs: int
    budget: str = ""  # loss_at_budget: the budget in words, e.g. "300 steps"
    censored: int = 0  # pairs with a censored side
    confidence: float = 0.95
    # What the candidate was compared with, when not pairs: a screening rung's single seed against
    # the mean of the base's recent runs says so, rather than "1 pair".
    versus: str = ""

    def text(self) -> str:
        n = f"{self.pairs} pair{'s' if self.pairs != 1 else ''}" + (
            f", {self.censored} censored" if self.censored else "")
        if self.versus:
            n = self.versus
        if self.kind == "loss_at_budget":
            what, fmt = f"loss at {self.budget or 'the budget'}", "{:+.4f}"
        else:
            what = f"{'time' if self.kind == 'time_to_target' else 'steps'} to loss {self.target_loss:.4g}"
            fmt = "{:.2f}"
        if not math.isfinite(self.estimate):
            return f"{what}: n/a vs base, {n}"
        est = fmt.format(self.estimate) + ("x" if self.kind in RATIO_KINDS else "")
        ci = (f"[{fmt.format(self.low)}, {fmt.format(self.high)}]"
              if math.isfinite(self.low) and math.isfinite(self.high) else "[no interval]")
        return f"{what}: {est} {ci} vs base, {n}"

    @property
    def better(self) -> bool:
        """The estimate favours the candidate (not a verdict: see `decide`)."""
        if not math.isfinite(self.estimate):
            return False
        return self.estimate < 0 if self.kind == "loss_at_budget" else self.estimate > 1

    @property
    def gain(self) -> float:
        """The estimate on one scale, positive = better: log ratio, or loss reduction."""
        if not math.isfinite(self.estimate):
            return math.nan
        return -self.estimate if self.kind == "loss_at_budget" else math.log(self.estimate)

    def to_dict(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Speedup:
        known = {f.name: f for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("target_loss", "estimate", "low", "high"):
            kw[k] = math.nan if kw.get(k) is None else float(kw[k])
        return cls(**kw)


def speedup(kind: str, target_loss: float, pairs: list[tuple[Obs, Obs]], confidence: float = 0.95,
            budget: str = "", versus: str = "") -> Speedup:
    """The speed-up over (candidate, baseline) pairs, each measured on one node in one window."""
    g, censored = gains(kind, pairs)
    if not budget and getattr(kind, "budget", None) is not None and kind == "loss_at_budget":
        budget = kind.budget.words()  # e.g. "the budget in tokens (bpb)" where the caller knows no steps
    m, low, high = _interval(g, confidence)
    if kind == "loss_at_budget":  # shown as candidate - base: flip the gain's sign and its bounds
        est, lo, hi = -m, -high, -low
    else:
        est, lo, hi = math.exp(m), math.exp(low), math.exp(high)
    return Speedup(kind, float(target_loss), est, lo, hi, len(pairs), budget, censored, confidence, versus)


def _interval(g: list[float], confidence: float) -> tuple[float, float, float]:
    if not g:
        return math.nan, math.nan, math.nan
    m = mean(g)
    if len(g) < 2:
        return m, math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(g) - 1) * stdev(g) / math.sqrt(len(g))
    return m, m - half, m + half


# -- the sequential test -----------------------------------------------------------------------


def looks(min_pairs: int = MIN_PAIRS, max_pairs: int = MAX_PAIRS, count: int = LOOKS) -> tuple[int, ...]:
    """The pair counts at which `decide` may pass: min_pairs, max_pairs and evenly spaced ones
    between, at most `count` in all. Few looks keep each look's share of alpha large."""
    if not 1 <= min_pairs <= max_pairs:
        raise ValueError(f"need 1 <= min_pairs <= max_pairs, got {min_pairs}, {max_pairs}")
    k = max(1, min(count, max_pairs - min_pairs + 1))
    if k == 1:
        return (max_pairs,)
    return tuple(sorted({round(min_pairs + i * (max_pairs - min_pairs) / (k - 1)) for i in range(k)}))


def next_look(n: int, min_pairs: int = MIN_PAIRS, max_pairs: int = MAX_PAIRS) -> int:
    """How many pairs the next look needs: run pairs up to it (in parallel), then call `decide`."""
    return next((m for m in looks(min_pairs, max_pairs) if m > n), max_pairs)


def spent(n: int, alpha: float, max_pairs: int = MAX_PAIRS, min_pairs: int = MIN_PAIRS) -> float:
    """The level of the look at n pairs (0 when n is not a look): f(n/N) - f(previous look/N) with
    the spending function f(t) = alpha SPENDING(t); the looks' levels sum to alpha."""
    schedule = looks(min_pairs, max_pairs)
    if n not in schedule:
        return 0.0
    i = schedule.index(n)

    def f(k: int) -> float:
        return alpha * SPENDING(k / max_pairs)
    return f(n) - (f(schedule[i - 1]) if i else 0.0)


def pvalue(g: list[float]) -> float:
    """One-sided paired t-test that the mean gain is above 0."""
    if len(g) < 2:
        return 1.0
    m, s = mean(g), stdev(g)
    if s == 0:
        return 0.0 if m > 0 else 1.0
    return float(stats.t.sf(m / (s / math.sqrt(len(g))), len(g) - 1))


def speedrun_pvalue(final_losses: list[float], target_loss: float) -> float | None:
    """The NanoGPT speedrun's own rule, kept as a line for the record: a one-sided t-test that the
    mean final loss is below the target (p < 0.01 passes). None with fewer than 2 losses."""
    xs = [x for x in final_losses if math.isfinite(x)]
    if len(xs) < 2 or not math.isfinite(target_loss):
        return None
    m, s = mean(xs), stdev(xs)
    if s == 0:
        return 0.0 if m < target_loss else 1.0
    return float(stats.t.cdf((m - target_loss) / (s / math.sqrt(len(xs))), len(xs) - 1))


def decide(kind: str, pairs: list[tuple[Obs, Obs]], alpha: float, max_pairs: int = MAX_PAIRS,
           min_pairs: int = MIN_PAIRS) -> str:
    """"pass" | "fail" | "more", after the latest pair.

    A group-sequential one-sided paired t-test of the pairs' gains (log ratio of the objectives,
    or loss difference) with Bonferroni alpha spending: it may pass only at the scheduled
    `looks(min_pairs, max_pairs)`, the look at n pairs testing at `spent(n, ...)`; these levels
    sum to alpha, so by the union bound the chance that a candidate no better than the base ever
    passes is at most alpha (a look that is skipped only wastes its share). At a look it fails
    for futility when the test's p-value is above FUTILITY_P (the gain so far is too small to
    become significant; stopping for futility never adds false passes), and at max_pairs without
    a pass. Between looks it answers "more". Run pairs up to `next_look(n)` at once, then call it
    (calling it at every pair count gives the same answers).
    """
    n = len(pairs)
    if n < min_pairs:
        return "more"
    look = spent(n, alpha, max_pairs, min_pairs)
    if look == 0.0:  # between looks: only the cap ends it
        return "fail" if n >= max_pairs else "more"
    g, _ = gains(kind, pairs)
    p = pvalue(g) if len(g) >= 2 else 1.0
    if p < look:
        return "pass"
    if n >= max_pairs or p > FUTILITY_P:
        return "fail"
    return "more"


# -- multiplicity across the search ------------------------------------------------------------


def _lord_gamma(j: int) -> float:
    """The LORD++ default sequence (Javanmard & Montanari 2018), summing to 1 over j >= 1."""
    return 0.07720838 * math.log(max(j, 2)) / (j * math.exp(math.sqrt(math.log(j))))


@dataclass
class OnlineFDR:
    """LORD++ online false discovery rate control (Ramdas, Yang, Wainwright & Jordan 2017) for a
    search with an unknown number of candidates.

    Each candidate that starts confirming takes `next_alpha()` as the alpha of its `decide`; its
    verdict is `record`ed when known. Tests may overlap: a rejection counts from the first test
    started after it was recorded (LORD++ with the rejections known at each start, as in
    asynchronous online testing). The sequence gamma puts half its mass evenly on the first
    `horizon` tests (a search confirms tens of candidates, not millions) and half on the default
    LORD++ sequence, so later tests still get some alpha; it is non-increasing and sums to 1.
    With no true winner every test gets gamma_t * w0, so the chance of any false winner in the
    whole search is at most w0 <= level.
    """

    level: float = 0.05
    w0: float | None = None
    horizon: int = 100
    tests: int = 0  # tests started
    rejections: list[int] = field(default_factory=list)  # tests started when each rejection was recorded

    def __post_init__(self) -> None:
        if self.w0 is None:
            self.w0 = self.level
        if not 0 < self.w0 <= self.level < 1:
            raise ValueError(f"need 0 < w0 <= level < 1, got w0={self.w0}, level={self.level}")

    @property
    def guarantee(self) -> str:
        return f"online FDR <= {self.level:.0%} (LORD++)"

    def gamma(self, j: int) -> float:
        return (0.5 / self.horizon if j <= self.horizon else 0.0) + 0.5 * _lord_gamma(j)

    def peek_alpha(self) -> float:
        """The alpha the next test would get, without starting it."""
        t = self.tests + 1
        a = self.gamma(t) * self.w0
        for i, tau in enumerate(self.rejections):
            a += (self.level - self.w0 if i == 0 else self.level) * self.gamma(t - tau)
        return a

    def next_alpha(self) -> float:
        a = self.peek_alpha()
        self.tests += 1
        return a

    def record(self, rejected: bool) -> None:
        if rejected:
            self.rejections.append(self.tests)

    def to_dict(self) -> dict:
        return {"method": "LORD++", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> OnlineFDR:
        return cls(float(d["level"]), d.get("w0"), int(d.get("horizon", 100)), int(d.get("tests", 0)),
                   [int(x) for x in d.get("rejections", [])])


# -- seeds ---------------------------------------------------------------------------------------

SEED_FLOOR = 1_000_000  # fresh seeds never collide with the small fixed seeds of baselines and rungs


def fresh_seeds(commit: str, purpose: str, start: int, n: int) -> list[int]:
    """Seeds for one purpose of one commit ("confirm", "replay-1", "replay-2", ...): the i-th is
    sha256("commit:purpose:i"), so they differ between commits and purposes, never repeat the
    single-seed rungs' seeds, and the same call gives the same seeds after a resume."""
    out = []
    for i in range(start, start + n):
        h = int.from_bytes(hashlib.sha256(f"{commit}:{purpose}:{i}".encode()).digest()[:8], "big")
        out.append(SEED_FLOOR + h % (2**31 - 1 - SEED_FLOOR))
    return out
