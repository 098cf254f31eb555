"""Guard metrics measured: the trusted evaluator's model process scores a second held-out corpus
and the HOST computes the guard's score from the logits (search_space/guard.py says what a guard
is and how it is judged).

A guard's number is never one the candidate prints: its corpus lies outside the run's mount, the
frozen model command (the same one that recomputes the validation loss) only ever sees the input
windows, and the accuracy or loss against the next tokens is computed here, in numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from env.trusted import Evaluator, cross_entropy, extra_pass, heldout_windows
from search_space.guard import Guard


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Next-token accuracy: how often the highest logit is the token that came next."""
    x = np.asarray(logits).reshape(-1, logits.shape[-1])
    return float(np.mean(x.argmax(axis=1) == targets.reshape(-1)))


def score(kind: str, logits: np.ndarray, targets: np.ndarray) -> float:
    if kind == "accuracy":
        return accuracy(logits, targets)
    if kind == "loss":
        return cross_entropy(logits, targets)
    raise ValueError(f"guard score {kind!r}")


def measure_guards(guards: tuple[Guard, ...], evaluator: Evaluator, kept: dict[int, Path], data_folder: Path,
                   info: dict) -> tuple[dict[str, float], list[str]]:
    """Each guard's score of the run's last checkpoint (the model the objective was read from at the
    run's end), one fresh model process per guard; returns (scores, problems). `info` gets each
    guard's windows, tokens and process time."""
    scores: dict[str, float] = {}
    problems: list[str] = []
    last = max(kept)
    for i, g in enumerate(guards):
        try:
            windows = heldout_windows(data_folder / g.heldout, g.windows, g.seq_len)
        except (OSError, ValueError) as e:  # the target's own data: its fault, but the run cannot be judged
            problems.append(f"guard {g.name}: its corpus {g.heldout} cannot be read ({e})")
            continue
        logits, why = extra_pass(evaluator, f"guard-{i}", [last], windows[:, :-1], kept)
        if why is not None:
            problems.append(f"guard {g.name} (trusted evaluation): {why}")
            continue
        scores[g.name] = round(score(g.score, logits[0], windows[:, 1:]), 6)
        info.setdefault("guards", {})[g.name] = {"score": g.score, "windows": int(len(windows)),
                                                 "tokens": int(windows[:, 1:].size), "step": last}
    return scores, problems
