"""The launch settings of one search, saved in its folder so `--resume` needs nothing else."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from agent.names import LADDER
from search_space.judge import MAX_PAIRS, MIN_PAIRS

__all__ = ["LADDER", "SearchSettings"]


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
    seeds: int = 3  # baseline seeds per fidelity, and the first confirm batch (pairs)
    max_seeds: int = MAX_PAIRS  # confirm adds pairs while the sequential test is unclear, up to this many
    max_fidelity: str = "confirm"
    storage: str = ""  # empty: sqlite in the search folder
    ray_address: str = ""
    sandbox: str = "process"
    study: str = "speedsearch"
    models: str = "claude-sonnet-4-6"  # "model" or "model:weight,model:weight"
    seed: int = 0  # the policy's random seed
    min_speedup: float = 1.0  # a rung is passed when the candidate beats the baseline by this ratio
    plots: bool = False  # a loss plot per trial as it finishes (about 0.5 s each); the summary plots the best
    fdr: float = 0.05  # the false discovery rate the confirmations are held to, across the whole search
    allow_untrusted: bool = False  # True: confirm candidates whose measurement is not trusted (shown either way)
    # At the minutes budget nothing new starts, but confirmations already under way may finish for up
    # to this many minutes more: a half-run confirmation would otherwise be thrown away.
    drain_minutes: float = 4.0

    def __post_init__(self) -> None:
        if self.max_fidelity not in LADDER:
            raise ValueError(f"max_fidelity {self.max_fidelity!r}: use one of {', '.join(LADDER)}")
        unknown = set(self.proposers) - {"ideas", "knobs", "llm"}
        if unknown or not self.proposers:
            raise ValueError(f"proposers {','.join(self.proposers)}: choose from ideas, knobs, llm")
        if self.drain_minutes < 0:
            raise ValueError(f"drain_minutes {self.drain_minutes}: zero or more")
        if not 0 < self.fdr < 1:
            raise ValueError(f"fdr {self.fdr}: a rate between 0 and 1, e.g. 0.05")
        if self.seeds < 1 or self.max_seeds < max(self.seeds, MIN_PAIRS):
            raise ValueError(f"seeds {self.seeds} / max_seeds {self.max_seeds}: need 1 <= seeds <= max_seeds "
                             f"and max_seeds >= {MIN_PAIRS} (the fewest pairs confirmation judges)")

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
