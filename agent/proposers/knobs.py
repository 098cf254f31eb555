"""Numeric knobs through an Optuna sampler, told every result.

The sampler lives in its own study (`<study>-knobs`) in the search's storage, so a resumed search
keeps what it learned, and the main study keeps one trial per candidate evaluation.

What it is told (agent.reward): at every rung the candidate is measured at, an intermediate value
(step = the rung's index) = the score there (objective / baseline objective, < 1 beats the base);
once, when the candidate leaves the ladder, COMPLETE with the score at its highest rung, or FAIL
when it never was measured. A resumed search draws from a sampler seeded with the number of trials
the study already holds, so it never replays the sequence it drew before the stop.
"""

from __future__ import annotations

import math
import threading

import optuna

from agent.names import rung_index
from agent.proposal import Outcome, Proposal, ProposalContext
from search_space.knobs import Knob

STARTUP = 6  # random draws before TPE models the landscape


class KnobsProposer:
    name = "knobs"

    def __init__(self, knobs: tuple[Knob, ...], storage: str | None, study_name: str, seed: int = 0):
        self.knobs = knobs
        self.distributions = {k.name: k.distribution() for k in knobs}
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                         direction="minimize")
        done = len(self.study.get_trials(deepcopy=False))
        self.study.sampler = optuna.samplers.TPESampler(seed=seed + done, n_startup_trials=STARTUP)
        self.lock = threading.Lock()

    def settle(self, outstanding: set[int]) -> int:
        """FAIL the sampler's RUNNING trials that no candidate of the search will report on
        (asked before a crash, never committed); returns how many."""
        n = 0
        with self.lock:
            for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if t.number not in outstanding:
                    self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                    n += 1
        return n

    def running(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        if not self.knobs:
            return None
        with self.lock:
            trial = self.study.ask(self.distributions)
        values = dict(trial.params)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        return Proposal(title=f"knobs: {shown}", rationale="values sampled by Optuna's TPE over the target's knobs",
                        proposer=self.name, parent=ctx.parent, knobs=values, meta={"knob_trial": trial.number})

    def tell(self, proposal: Proposal, outcome: Outcome) -> None:
        number = proposal.meta.get("knob_trial")
        if number is None:
            return
        with self.lock:
            try:
                if not outcome.final:
                    if outcome.score is not None and math.isfinite(outcome.score) and outcome.rung:
                        trial = self.study._storage.get_trial_id_from_study_id_trial_number(
                            self.study._study_id, number)
                        self.study._storage.set_trial_intermediate_value(trial, rung_index(outcome.rung),
                                                                         outcome.score)
                elif outcome.score is None or not math.isfinite(outcome.score):
                    self.study.tell(number, state=optuna.trial.TrialState.FAIL)
                else:
                    self.study.tell(number, outcome.score)
            except (ValueError, RuntimeError, KeyError):
                pass  # told already: a resumed search tells every finished candidate again
