"""Numeric knobs through an Optuna sampler, told every result.

The sampler lives in its own study (`<study>-knobs`) in the search's storage, so a resumed search
keeps what it learned, and the main study keeps one trial per candidate evaluation.
"""

from __future__ import annotations

import math
import threading

import optuna

from agent.proposal import Proposal, ProposalContext
from search_space.knobs import Knob


class KnobsProposer:
    name = "knobs"

    def __init__(self, knobs: tuple[Knob, ...], storage: str | None, study_name: str, seed: int = 0):
        self.knobs = knobs
        self.distributions = {k.name: k.distribution() for k in knobs}
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                         direction="minimize",
                                         sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=6))
        self.lock = threading.Lock()
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # asked before a crash: never told

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        if not self.knobs:
            return None
        with self.lock:
            trial = self.study.ask(self.distributions)
        values = dict(trial.params)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        return Proposal(title=f"knobs: {shown}", rationale="values sampled by Optuna's TPE over the target's knobs",
                        proposer=self.name, parent=ctx.parent, knobs=values, meta={"knob_trial": trial.number})

    def tell(self, proposal: Proposal, value: float | None, improved: bool = False) -> None:
        number = proposal.meta.get("knob_trial")
        if number is None:
            return
        with self.lock:
            try:
                if value is None or not math.isfinite(value):
                    self.study.tell(number, state=optuna.trial.TrialState.FAIL)
                else:
                    self.study.tell(number, value)
            except (ValueError, RuntimeError):
                pass  # told already (a resumed search)
