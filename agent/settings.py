"""The launch settings of one search, saved in its folder so `--resume` needs nothing else."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

LADDER = ("smoke", "short", "full", "confirm")


@dataclass(frozen=True)
class SearchSettings:
    """Everything `speedsearch launch` was told; budgets of 0 mean no limit."""

    target: str = "tinygpt"
    proposers: tuple[str, ...] = ("ideas", "knobs")
    workers: int = 0  # 0: as many runs as the cluster fits
    budget_trials: int = 0
    budget_minutes: float = 0.0
    budget_gpu_hours: float = 0.0
    budget_dollars: float = 0.0
    seeds: int = 3  # baseline seeds per fidelity, and the first confirm batch
    max_seeds: int = 8  # confirm adds seeds while the t-test is unclear, up to this many
    max_fidelity: str = "confirm"
    storage: str = ""  # empty: sqlite in the search folder
    ray_address: str = ""
    sandbox: str = "process"
    study: str = "speedsearch"
    models: str = "claude-sonnet-4-6"  # "model" or "model:weight,model:weight"
    seed: int = 0  # the policy's random seed
    min_speedup: float = 1.0  # a rung is passed when the candidate beats the baseline by this ratio
    plots: bool = False  # a loss plot per trial as it finishes (about 0.5 s each); the summary plots the best

    def __post_init__(self) -> None:
        if self.max_fidelity not in LADDER:
            raise ValueError(f"max_fidelity {self.max_fidelity!r}: use one of {', '.join(LADDER)}")
        unknown = set(self.proposers) - {"ideas", "knobs", "llm"}
        if unknown or not self.proposers:
            raise ValueError(f"proposers {','.join(self.proposers)}: choose from ideas, knobs, llm")
        if self.seeds < 1 or self.max_seeds < self.seeds:
            raise ValueError(f"seeds {self.seeds} / max_seeds {self.max_seeds}: need 1 <= seeds <= max_seeds")

    @property
    def ladder(self) -> tuple[str, ...]:
        return LADDER[: LADDER.index(self.max_fidelity) + 1]

    def model_weights(self) -> dict[str, float]:
        out = {}
        for part in self.models.split(","):
            name, _, weight = part.strip().partition(":")
            out[name] = float(weight) if weight else 1.0
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["proposers"] = list(self.proposers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSettings:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "proposers" in d:
            d["proposers"] = tuple(d["proposers"])
        return cls(**d)
