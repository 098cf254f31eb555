"""Guard metrics measured: the trusted evaluator's model process scores a second held-out corpus
and the HOST computes the guard's score from the logits (search_space/guard.py says what a guard
is and how it is judged).

A guard's number is never one the candidate prints: its corpus lies outside the run's mount, the
frozen model command (the same one that recomputes the validation loss) only ever sees the input
windows, and the accuracy or loss against the next tokens is computed here, in numpy.

The guard's windows are probed for look-ahead as the held-out ones are (env/trusted.py): a second
fresh process scores them with the tokens after a random cut replaced, and the logits before the cut
must not move. Without it a model that looks ahead only on the guard's kind of text (it can tell
prose from code) would pass any guard. The model scored is the one the objective was read from
(`at`: at a budget short of the run's end, that checkpoint, not the last).
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from env.readout import CurveReader
from env.trusted import Evaluator, cross_entropy, extra_pass, heldout_windows, lookahead_problem, probe_inputs
from search_space.guard import CPU, Guard


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
                   info: dict, at: int | None = None) -> tuple[dict[str, float], list[str]]:
    """Each guard's score of checkpoint `at` (the model the objective was read from; default the
    last), a fresh model process per guard and one more for its look-ahead probe; returns (scores,
    problems). `info` gets each guard's windows, tokens, step and the probe's largest change."""
    scores: dict[str, float] = {}
    problems: list[str] = []
    step = at if at in kept else max(kept)
    trust = evaluator.trust
    rng = np.random.default_rng(secrets.randbits(64))  # drawn here, unknown to the model process
    for i, g in enumerate(guards):
        if g.score == CPU:  # the kernel's count (cpu_scores), not a model's
            continue
        try:
            windows = heldout_windows(data_folder / g.heldout, g.windows, g.seq_len)
        except (OSError, ValueError) as e:  # the target's own data: its fault, but the run cannot be judged
            problems.append(f"guard {g.name}: its corpus {g.heldout} cannot be read ({e})")
            continue
        probed, cuts = probe_inputs(windows, trust.probe_rows, rng)
        inputs = {f"guard-{i}": windows[:, :-1], **({f"guard-{i}-probe": probed} if cuts else {})}
        with ThreadPoolExecutor(len(inputs)) as ex:  # the two processes at once
            got = dict(zip(inputs, ex.map(lambda kv: extra_pass(evaluator, kv[0], [step], kv[1], kept),
                                          inputs.items()), strict=True))
        why = next((w for _, w in got.values() if w is not None), None)
        if why is not None:
            problems.append(f"guard {g.name} (trusted evaluation): {why}")
            continue
        logits = got[f"guard-{i}"][0][0]
        entry = {"score": g.score, "windows": int(len(windows)), "tokens": int(windows[:, 1:].size), "step": step}
        if cuts:
            why, entry["probe_max_change"] = lookahead_problem(logits, got[f"guard-{i}-probe"][0][0], cuts,
                                                               trust.probe_tolerance)
            if why is not None:
                problems.append(f"guard {g.name}: {why}")
                continue
        scores[g.name] = round(score(g.score, logits, windows[:, 1:]), 6)
        info.setdefault("guards", {})[g.name] = entry
    return scores, problems



def cpu_scores(guards: tuple[Guard, ...], reader: CurveReader, cpu_s: float | None) -> dict[str, float]:
    """Each cpu guard's score: the CPU seconds of the whole run, the kernel's count in its cgroup. A
    continued run's count starts at its restart: it has no score, and its pair is lost."""
    if cpu_s is None or reader.continued:
        return {}
    return {g.name: cpu_s for g in guards if g.score == CPU}
