"""Loss at a budget: where on a run's curve the `loss_at_budget` objective is read.

    [objective]
    kind = "loss_at_budget"
    budget = "tokens"        # "steps" | "epochs" | "tokens" | "wall_s"
    tokens_per_step = 4096   # budget = "tokens": what one step trains on (frozen in the trainer)
    limit = 1_000_000        # the budget in its unit; optional but for wall_s (default: the run's end)

The loss is the curve's last validation AT OR BEFORE the budget, never one after it and never
interpolated: a validation past the limit measured a model that trained past it, and a line
between two validations guesses. With no limit the budget is the run's own length (its steps or
epochs at the rung's fidelity): what `loss_at_budget` always meant. `wall_s` reads the curve's
time axis: at a trusted target the sandbox's observed wall time since step 0's line, validations
included (the trainer's own clock is only a claim there).

The objective's kind travels through every caller (baselines, the ladder, replay, export) as a
string; `Objective` is that string carrying its budget, so each of them reads the loss at the same
point without being taught about budgets. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from search_space.errors import UserError
from search_space.records import Point

UNITS = ("steps", "epochs", "tokens", "wall_s")
KEYS = ("budget", "limit", "tokens_per_step")


class BudgetError(UserError):
    """An `[objective]` budget that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Budget:
    unit: str = "steps"
    limit: float | None = None  # in `unit`; None: the run's end
    tokens_per_step: int | None = None
    value: str = "loss"  # what the curve holds ("bpb" for a readout in bits per byte): for the words only

    def cut(self, curve: list[Point]) -> list[Point]:
        """The points of the curve inside the budget."""
        if self.limit is None:
            return curve
        if self.unit == "wall_s":
            return [p for p in curve if p.train_ms <= 1000 * self.limit]
        steps = self.limit / self.tokens_per_step if self.unit == "tokens" and self.tokens_per_step else self.limit
        return [p for p in curve if p.step <= steps + 1e-9]

    def read_at(self, curve: list[Point]) -> int | None:
        """The step (or epoch) whose validation the objective reads: the last inside the budget. The
        trusted evaluator probes that checkpoint and scores the guards on it (env/evaluate.py)."""
        inside = self.cut(curve)
        return inside[-1].step if inside else None

    def words(self, steps: int | None = None) -> str:
        """The budget in words for a run of `steps` steps (or epochs), e.g. "410K tokens (bpb)"."""
        unit = self.unit
        n = self.limit if self.limit is not None else steps
        if n is None:
            text = "the budget" if unit == "steps" else f"the budget in {unit.replace('wall_s', 'seconds')}"
        elif unit == "wall_s":
            text = f"{n:g} s of training"
        elif unit == "tokens":
            text = f"{_human(n if self.limit is not None else n * (self.tokens_per_step or 1))} tokens"
        else:
            text = f"{n:g} {unit if n != 1 else unit[:-1]}"
        return text + (f" ({self.value})" if self.value != "loss" else "")


def _human(n: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:g}"


class Objective(str):
    """An objective's kind (`time_to_target`, `steps_to_target`, `loss_at_budget`) that carries the
    budget loss_at_budget is read at. Equal to, hashed and serialised as its plain kind."""

    budget: Budget

    def __new__(cls, kind: str, budget: Budget | None = None) -> Objective:
        obj = super().__new__(cls, kind)
        obj.budget = budget or Budget()
        return obj

    def __reduce__(self):  # pickles (Ray ships targets to workers) with its budget
        return (Objective, (str(self), self.budget))


def parse_budget(obj: dict, kind: str, counts: str, value: str = "loss") -> Budget:
    """The budget keys of `[objective]`; `counts`: what the readout's points count ("step" or
    "epoch"); `value`: the readout's unit, for the words."""
    given = [k for k in KEYS if k in obj]
    if kind != "loss_at_budget":
        if given:
            raise BudgetError(f"objective.{given[0]}: only with kind = \"loss_at_budget\"")
        return Budget(value=value)
    unit = obj.get("budget", "epochs" if counts == "epoch" else "steps")
    if unit not in UNITS:
        raise BudgetError(f"objective.budget: {unit!r} is not one of {', '.join(UNITS)}")
    if unit == "epochs" and counts != "epoch":
        raise BudgetError("objective.budget: \"epochs\" needs a readout that counts epochs (a pattern with the "
                          "named group epoch)")
    if unit in ("steps", "tokens") and counts == "epoch":
        raise BudgetError(f"objective.budget: {unit!r} with a readout that counts epochs; use \"epochs\" or "
                          "\"wall_s\"")
    limit = obj.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not math.isfinite(limit) or limit <= 0):
        raise BudgetError(f"objective.limit: a positive number of {unit}, got {limit!r}")
    if unit == "wall_s" and limit is None:
        raise BudgetError("objective.limit: budget = \"wall_s\" needs the seconds of training the loss is read at")
    tps = obj.get("tokens_per_step")
    if unit == "tokens":
        if isinstance(tps, bool) or not isinstance(tps, int) or tps <= 0:
            raise BudgetError(f"objective.tokens_per_step: budget = \"tokens\" needs a positive integer, got {tps!r}")
    elif tps is not None:
        raise BudgetError("objective.tokens_per_step: only with budget = \"tokens\"")
    return Budget(unit, None if limit is None else float(limit), tps, value)
