"""Record types shared by env, runs_db and agent: a run's status, its curve points and its result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    OK = "ok"
    FAILED = "failed"  # the trainer raised, crashed, ran out of memory, printed NaN
    TIMEOUT = "timeout"  # killed at the target's time limit
    PRUNED = "pruned"  # stopped early: clearly worse than the baseline band at the same step
    INVALID = "invalid"  # the change broke a rule, did not apply, or the log is not to be trusted


@dataclass(frozen=True)
class Point:
    step: int
    val_loss: float
    train_ms: float


class Trust(StrEnum):
    """Whether a result's curve was measured by the evaluator (trusted) or read from the log (untrusted)."""

    TRUSTED = "trusted"  # losses recomputed by the target's frozen evaluator, times observed by the sandbox
    UNTRUSTED = "untrusted"  # the target declares no evaluator: claimed losses, observed times


@dataclass
class RunResult:
    """One run. `curve` is THE curve everything downstream uses: at a trusted target, each point is
    (step, the evaluator's held-out loss, the sandbox's observed time since step 0); `claimed` keeps
    what the trainer printed, for display only."""

    status: Status
    reason: str = ""
    curve: list[Point] = field(default_factory=list)
    total_steps: int = 0
    wall_s: float = 0.0
    log: str = ""
    seed: int = 0
    fidelity: str = ""
    commit: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    claimed: list[Point] = field(default_factory=list)
    trust: str = Trust.UNTRUSTED.value
    # guard name -> its score, computed on the host from the trusted evaluator's logits (search_space/guard.py)
    guards: dict[str, float] = field(default_factory=dict)

    @property
    def trusted(self) -> bool:
        return self.trust == Trust.TRUSTED

    @property
    def node(self) -> str:
        """The node it ran on ("" for a local run that did not say): the pool's worker id's first part."""
        return str(self.provenance.get("worker", "")).split("/")[0]

    @property
    def final(self) -> Point | None:
        return self.curve[-1] if self.curve else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = self.status.value
        out["curve"] = [[p.step, p.val_loss, p.train_ms] for p in self.curve]
        out["claimed"] = [[p.step, p.val_loss, p.train_ms] for p in self.claimed]
        f = self.final
        out["final"] = {"val_loss": f.val_loss, "train_ms": f.train_ms, "steps": f.step} if f else None
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["status"] = Status(d["status"])
        for key in ("curve", "claimed"):  # records written before `claimed` existed read as []
            d[key] = [Point(int(s), float(v), float(t)) for s, v, t in d.get(key, [])]
        return cls(**d)
