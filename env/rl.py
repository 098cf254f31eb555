"""A Gymnasium-style view of the environment, for people who train policies on it.

`reset()` returns the task text and the editable code; `step(patch)` evaluates the patch on top of
the base through the same `evaluate` and returns a bounded reward: 0 for an invalid or failed run,
otherwise clip(log(baseline / candidate objective), -1, 1) / 2 + 1/2, so the base itself scores 0.5.

The reward comes only from trusted numbers: the objective is read from `result.curve`, which for a
target with a `[trust]` evaluator holds recomputed held-out losses and observed times. A result that
is not `trusted` scores 0, and `reset()` refuses a target whose baseline cannot be trusted (one
without an evaluator) unless `allow_untrusted` is set, so a policy never learns from claimed numbers
by accident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from env.evaluate import RunSpec, evaluate
from env.sandbox import Sandbox
from env.stats import objective
from env.workspace import materialise_base
from search_space.judge import score
from search_space.records import Status
from search_space.rules import matches
from search_space.target import Target


@dataclass
class SpeedrunEnv:
    target: Target
    sandbox: Sandbox
    run_root: Path
    fidelity: str = "short"
    seed: int = 0
    baseline_value: float | None = None
    target_loss: float | None = None
    allow_untrusted: bool = False  # reward claimed numbers of a target without an evaluator
    _observation: dict[str, Any] = field(default_factory=dict)

    def reset(self, seed: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        if seed is not None:
            self.seed = seed
        if self.baseline_value is None:
            base = evaluate(RunSpec(self.target, self.seed, self.fidelity), self.sandbox, self.run_root)
            if base.status != Status.OK:
                raise RuntimeError(f"the baseline itself does not run: {base.reason}")
            if not base.trusted and not self.allow_untrusted:
                raise RuntimeError(f"target {self.target.name} has no [trust] evaluator, so its results are "
                                   "untrusted; pass allow_untrusted=True to reward its claimed numbers")
            if self.target_loss is None:
                self.target_loss = (self.target.target_loss if isinstance(self.target.target_loss, float)
                                    and self.fidelity == "full" else base.final.val_loss)
            self.baseline_value = objective(self.target.objective, [base], self.target_loss)
        self._observation = {"task": self.task_text(), "files": self._editable_files()}
        return self._observation, {"baseline": self.baseline_value, "target_loss": self.target_loss}

    def step(self, patch: str) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self.baseline_value is None:
            raise RuntimeError("call reset() first")
        result = evaluate(RunSpec(self.target, self.seed, self.fidelity, patch=patch), self.sandbox, self.run_root)
        usable = result.status == Status.OK and (result.trusted or self.allow_untrusted)
        value = objective(self.target.objective, [result], self.target_loss) if usable else None
        info = {"status": result.status.value, "reason": result.reason, "value": value, "trust": result.trust,
                "result": result.to_dict()}
        return self._observation, self.reward(value), True, False, info

    def reward(self, value: float | None) -> float:
        if value is None or self.baseline_value is None or value <= 0:
            return 0.0
        if math.isinf(value):
            return 0.0
        speedup = -math.log(score(value, self.baseline_value))  # log(base / value), on the verdict's floor
        return max(-1.0, min(1.0, speedup)) / 2 + 0.5

    def task_text(self) -> str:
        return (f"Change the trainer `{self.target.name}` so that it reaches the target loss "
                f"({self.target_loss:.4f}) faster ({self.target.objective}). Editable: "
                f"{', '.join(self.target.editable)}; frozen: {', '.join(self.target.frozen)}. "
                "Answer with SEARCH/REPLACE blocks or a unified diff.")

    def _editable_files(self) -> dict[str, str]:
        scratch = self.run_root / "rl-base"
        if not scratch.exists():
            materialise_base(self.target, scratch)
        return {str(p.relative_to(scratch)): p.read_text() for p in sorted(scratch.rglob("*"))
                if p.is_file() and matches(str(p.relative_to(scratch)), self.target.editable)}
