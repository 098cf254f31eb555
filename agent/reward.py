"""What each learner is told, decided in one place. Pure.

- The bandit: one reward per candidate, when it leaves the ladder: 1 when it improved on its
  parent at the highest rung both reached (short or full, as objective / baseline objective
  measured at that rung, so baseline drift cancels), else 0. A candidate that failed, was pruned,
  or was rejected by confirmation earns 0. The base as parent scores 1.0 at every rung.
- The knobs sampler: its Optuna trial gets an intermediate value at every rung measured
  (the score), then is told once: COMPLETE with the score at the candidate's highest rung, or FAIL
  when it was never measured (failed smoke, pruned, rejected).
- The idea library and the LLM hear every Outcome (see agent.proposal.Outcome).
"""

from __future__ import annotations

from agent.names import MEASURED, Verdict, rung_index

BASE_SCORES = {str(r): 1.0 for r in MEASURED}


def compared_rung(mine: dict[str, float], parent: dict[str, float]) -> str | None:
    """The highest rung both were measured at."""
    both = [r for r in mine if r in parent and r in MEASURED]
    return max(both, key=rung_index) if both else None


def improved(mine: dict[str, float], parent: dict[str, float], verdict: str = "") -> bool:
    """The bandit's reward for a candidate with `mine` scores whose parent has `parent` scores."""
    if verdict == Verdict.FAIL:
        return False
    rung = compared_rung(mine, parent)
    return rung is not None and mine[rung] < parent[rung]


def knob_value(scores: dict[str, float]) -> float | None:
    """The value an Optuna knob trial is told: the score at the highest rung, or None (FAIL)."""
    done = [r for r in scores if r in MEASURED]
    return scores[max(done, key=rung_index)] if done else None
