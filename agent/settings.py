"""The launch settings of one search, saved in its folder so `--resume` needs nothing else."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from agent.names import LADDER, Rung
from search_space.errors import UserError
from search_space.judge import MAX_PAIRS, MIN_PAIRS

__all__ = ["LADDER", "RESUMABLE", "SANDBOXES", "SearchSettings", "option"]

SANDBOXES = ("process", "docker")
# A study name: the search's Optuna study, and two beside it (`<name>-knobs`, `<name>-candidates`).
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PROPOSERS = ("ideas", "knobs", "llm")
SMOKE = ("auto", "on", "off")
LONG_STARTUP_S = 60.0  # a declared start-up this long: --smoke auto skips the smoke rung
# What `--resume` may change: how long and how wide the search goes on, never what it measures or
# how it judges (a new target, sandbox or rule would mix incomparable results in one search).
RESUMABLE = ("workers", "budget_trials", "budget_minutes", "budget_gpu_hours", "budget_dollars", "drain_minutes",
             "ray_address", "plots")


def option(name: str) -> str:
    """The command-line option that sets settings field `name`."""
    return "--" + name.replace("_", "-")


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
    # The Optuna study's name: several searches share one PostgreSQL database (--storage) under
    # different names. Saved in search.toml, so resume, status, show, replay and export find it.
    study_name: str = "speedsearch"
    models: str = "claude-sonnet-4-6"  # "model" or "model:weight,model:weight"
    seed: int = 0  # the policy's random seed
    min_speedup: float = 1.0  # a rung is passed when the candidate beats the baseline by this ratio
    plots: bool = False  # a loss plot per trial as it finishes (about 0.5 s each); the summary plots the best
    fdr: float = 0.05  # the false discovery rate the confirmations are held to, across the whole search
    allow_untrusted: bool = False  # True: confirm candidates whose measurement is not trusted (shown either way)
    # At the minutes budget nothing new starts, but confirmations already under way may finish for up
    # to this many minutes more: a half-run confirmation would otherwise be thrown away.
    drain_minutes: float = 4.0
    # The smoke rung (a few steps: does it run?) before short. Where a run's start-up is long (a
    # target declaring `[resources] startup_s` >= LONG_STARTUP_S, e.g. a speedrun's minutes of
    # torch.compile) smoke pays it for a few steps and short pays it again: auto skips smoke there.
    # On tinygpt-gpu (about 30 s of start-up and compile a run) skipping it bought nothing: smoke runs
    # fill the single free slots that a pair (two at once) cannot (bench/results/gpu-share-*-nosmoke*).
    smoke: str = "auto"

    def __post_init__(self) -> None:
        """Refuse a bad value with one line naming its option (UserError), before anything is made."""
        if self.max_fidelity not in LADDER:
            raise UserError(f"--max-fidelity {self.max_fidelity}: use one of {', '.join(LADDER)}")
        if self.smoke not in SMOKE:
            raise UserError(f"--smoke {self.smoke}: use one of {', '.join(SMOKE)}")
        if self.smoke == "off" and self.max_fidelity == Rung.SMOKE:
            raise UserError("--smoke off with --max-fidelity smoke: the ladder would be empty")
        unknown = [p for p in self.proposers if p not in PROPOSERS]
        if unknown or not self.proposers:
            raise UserError(f"--proposers {','.join(self.proposers) or '(none)'}: "
                            f"{'unknown ' + unknown[0] + '; ' if unknown else ''}choose from {', '.join(PROPOSERS)}")
        if self.sandbox not in SANDBOXES:
            raise UserError(f"--sandbox {self.sandbox}: use {' or '.join(SANDBOXES)}")
        for name in ("workers", "budget_trials", "budget_minutes", "budget_gpu_hours", "budget_dollars",
                     "drain_minutes"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:  # NaN fails too
                raise UserError(f"{option(name)} {value}: must be 0 or more"
                                + (" (0: no limit)" if name.startswith("budget") else ""))
        if not 0 < self.fdr < 1:
            raise UserError(f"--fdr {self.fdr}: a rate between 0 and 1, e.g. 0.05")
        if self.seeds < 1 or self.max_seeds < max(self.seeds, MIN_PAIRS):
            raise UserError(f"--seeds {self.seeds} (max_seeds {self.max_seeds}): need 1 <= seeds <= max_seeds "
                            f"and max_seeds >= {MIN_PAIRS} (the fewest pairs confirmation judges)")
        if not isinstance(self.study_name, str) or not STUDY_NAME.fullmatch(self.study_name):
            raise UserError(f"--study-name {self.study_name!r}: use 1 to 100 letters, digits, '.', '_' or '-' "
                            "(starting with a letter or digit)")
        if not self.min_speedup > 0:
            raise UserError(f"min_speedup {self.min_speedup}: must be positive")
        self.model_weights()  # refuses a malformed --models

    def ladder(self, startup_s: float = 0.0) -> tuple[str, ...]:
        """The rungs a candidate climbs, for a target whose runs declare `startup_s` (see `smoke`)."""
        rungs = LADDER[: LADDER.index(self.max_fidelity) + 1]
        skip = self.smoke == "off" or (self.smoke == "auto" and startup_s >= LONG_STARTUP_S
                                       and self.max_fidelity != Rung.SMOKE)
        return tuple(r for r in rungs if r != Rung.SMOKE) if skip else rungs

    def model_weights(self) -> dict[str, float]:
        out = {}
        for part in self.models.split(","):
            name, _, weight = part.strip().partition(":")
            try:
                w = float(weight) if weight else 1.0
            except ValueError:
                w = -1.0
            if not name or not w >= 0:
                raise UserError(f"--models {self.models}: give model or model:weight,model:weight "
                                "with weights of 0 or more")
            out[name] = w
        if sum(out.values()) <= 0:
            raise UserError(f"--models {self.models}: the weights must not all be 0")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["proposers"] = list(self.proposers)
        return d

    def with_changes(self, changes: dict[str, Any]) -> SearchSettings:
        """These settings with `changes` (field -> value) for `--resume`: only RESUMABLE fields may
        change; another that differs is refused with one line."""
        for name, value in changes.items():
            if name not in RESUMABLE and value != getattr(self, name):
                raise UserError(f"{option(name)}: cannot change on --resume (the search has "
                                f"{getattr(self, name)!r}); start a new --dir to search with {value!r}")
        return SearchSettings.from_dict({**self.to_dict(), **{k: v for k, v in changes.items() if k in RESUMABLE}})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSettings:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "proposers" in d:
            d["proposers"] = tuple(d["proposers"])
        return cls(**d)
