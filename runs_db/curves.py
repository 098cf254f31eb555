"""The base's band over its seeds: shared by the PNG plots (runs_db/plots.py) and the review page,
without matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence

from search_space.records import RunResult


def baseline_band(runs: Sequence[RunResult]) -> list[tuple[int, float, float, float, float]]:
    """The base's curve over seeds: (step, mean seconds, mean loss, min loss, max loss) at each
    step that at least half of the runs logged (runs of one fidelity log the same steps; a run
    stopped early must not make the band's end a single seed)."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    curves = [r for r in runs if any(math.isfinite(p.val_loss) for p in r.curve)]
    for r in curves:
        for p in r.curve:
            if math.isfinite(p.val_loss):
                by_step.setdefault(p.step, []).append((p.train_ms / 1000.0, p.val_loss))
    need = max(1, (len(curves) + 1) // 2)
    out = []
    for step in sorted(by_step):
        pts = by_step[step]
        if len(pts) >= need:
            losses = [loss for _, loss in pts]
            out.append((step, sum(s for s, _ in pts) / len(pts), sum(losses) / len(losses), min(losses), max(losses)))
    return out
