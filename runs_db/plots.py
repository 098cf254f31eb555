"""Loss curves of a candidate against the baseline, as a PNG.

Uses matplotlib's Agg canvas directly (no pyplot), so it never touches the global backend and
works on headless workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from runs_db.curves import baseline_band
from search_space.records import RunResult

CANDIDATE_COLOR, BASELINE_COLOR = "tab:red", "tab:gray"


def _points(result: RunResult) -> tuple[list[float], list[float], list[float]]:
    pts = [p for p in result.curve if math.isfinite(p.val_loss)]
    return [p.step for p in pts], [p.train_ms / 1000.0 for p in pts], [p.val_loss for p in pts]


def plot_loss_curves(candidate: Sequence[RunResult], baseline: Sequence[RunResult], path: Path,
                     title: str = "", target_loss: float | None = None) -> Path | None:
    """Validation loss against step and against training time: the candidate one line per seed,
    the base as its band (mean line, min to max shaded) so seeds of both are told apart at a glance.

    Returns the PNG's path, or None when no run has a curve to draw.
    """
    band = baseline_band(baseline)
    if not band and not any(r.curve for r in candidate):
        return None
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2)
    if band:  # drawn first, so the candidate's lines lie on top
        steps, secs, mean, low, high = (list(x) for x in zip(*band, strict=True))
        n = sum(1 for r in baseline if _points(r)[2])
        label = f"base: mean of {n} run{'s' if n != 1 else ''}, min to max shaded"
        for ax, xs in ((by_step, steps), (by_time, secs)):
            ax.fill_between(xs, low, high, color=BASELINE_COLOR, alpha=0.3, linewidth=0)
            ax.plot(xs, mean, color=BASELINE_COLOR, linewidth=1.4, label=label)
    seeds = [r for r in candidate if _points(r)[2]]
    for i, r in enumerate(seeds):
        steps, secs, losses = _points(r)
        kw = {"color": CANDIDATE_COLOR, "alpha": 0.8, "linewidth": 1.2,
              "label": f"candidate ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})" if i == 0 else None}
        by_step.plot(steps, losses, **kw)
        by_time.plot(secs, losses, **kw)
    for ax, xlabel in ((by_step, "step"), (by_time, "training time (s)")):
        if target_loss is not None and math.isfinite(target_loss):
            ax.axhline(target_loss, color="black", linestyle="--", linewidth=0.8, label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
        _zoom(ax, [*candidate, *baseline], target_loss)
    by_step.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title[:120], fontsize=10)
    return _save(fig, path)


def _zoom(ax, runs: Sequence[RunResult], target_loss: float | None) -> None:
    """Keep the interesting part: the first points of a curve dwarf its end, so the top is the
    highest loss seen a tenth of the way into any run."""
    curves = [[p.val_loss for p in r.curve if math.isfinite(p.val_loss)] for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return
    low = min(min(c) for c in curves)
    if target_loss is not None and math.isfinite(target_loss):
        low = min(low, target_loss)
    high = max(c[min(len(c) - 1, len(c) // 10)] for c in curves)
    span = max(high - low, 1e-3)
    ax.set_ylim(low - 0.05 * span, high + 0.05 * span)


def plot_progress(points: Sequence[tuple[int, str, float]], path: Path, title: str = "", what: str = "") -> Path | None:
    """Speed-up over the baseline per trial (one marker per rung) and the best so far at `full`
    or above. `points` are (trial number, rung, speed-up estimate); `what` says what the speed-up
    compares, in the words of `judge.Speedup.text()` (e.g. "time to loss 2.466"); returns the PNG's path."""
    if not points:
        return None
    rungs = ("short", "full", "confirm")
    fig = Figure(figsize=(9, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for rung, marker in zip(rungs, ("o", "s", "*"), strict=True):
        xs = [n for n, r, _ in points if r == rung]
        ys = [s for _, r, s in points if r == rung]
        if xs:
            ax.scatter(xs, ys, marker=marker, s=40 if marker == "*" else 18, alpha=0.7, label=rung)
    best, line = 0.0, []
    for n, r, s in sorted(points):
        if r in ("full", "confirm"):
            best = max(best, s)
        line.append((n, best))
    if any(b for _, b in line):
        ax.step([n for n, _ in line], [b for _, b in line], where="post", color="black", linewidth=1,
                label="best estimate at full or confirm (not a verdict)")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"speed-up vs base{', ' + what if what else ''} (base / candidate)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title[:120], fontsize=10)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
