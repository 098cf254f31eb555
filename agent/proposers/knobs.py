"""Numeric knobs through an Optuna sampler, told every result.

The sampler lives in its own study (`<study>-knobs`) in the search's storage, so a resumed search
keeps what it learned, and the main study keeps one trial per candidate evaluation.

What it is told (agent.reward): at every rung the candidate is measured at, an intermediate value
(step = the rung's index) = the score there (objective / baseline objective, < 1 beats the base);
once, when the candidate leaves the ladder, COMPLETE with the score at its highest rung, or FAIL
when it never was measured. A resumed search draws from a sampler seeded with the number of trials
the study already holds, so it never replays the sequence it drew before the stop.

The sampler draws from a copy of the study in memory (`working`), made from the record at start
and kept in step with it; the record in the search's storage gets each trial as it is asked and
told, in the same order, so both number it alike. An ask on the record itself reads every trial
still running (a candidate's trial runs until it leaves the ladder: hundreds in a 64-worker search)
at each draw, and took 4 s from ask to answer on the H100 host (bench/loop.py); in memory it is a
few milliseconds and one write.
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
                                         direction="minimize")  # the record
        done = self.study.get_trials(deepcopy=False)
        self.working = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(
            seed=seed + len(done), n_startup_trials=STARTUP))
        for t in done:  # numbered 0, 1, ... in both
            self.working._storage.create_new_trial(self.working._study_id, template_trial=t)
        self.lock = threading.Lock()

    def settle(self, outstanding: set[int]) -> int:
        """FAIL the sampler's RUNNING trials that no candidate of the search will report on
        (asked before a crash, never committed); returns how many."""
        n = 0
        with self.lock:
            for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if t.number not in outstanding:
                    for study in (self.working, self.study):
                        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                    n += 1
        return n

    def running(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        if not self.knobs:
            return None
        with self.lock:
            trial = self.working.ask(self.distributions)
            drawn = self.working._storage.get_trial(trial._trial_id)
            recorded = self.study._storage.create_new_trial(self.study._study_id, template_trial=drawn)
            if self.study._storage.get_trial_number_from_id(recorded) != trial.number:
                raise RuntimeError(f"the knobs study {self.study.study_name} numbered a trial unlike its copy: "
                                   "is another search writing to it?")
        values = dict(trial.params)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        return Proposal(title=f"knobs: {shown}", rationale="values sampled by Optuna's TPE over the target's knobs",
                        proposer=self.name, parent=ctx.parent, knobs=values, meta={"knob_trial": trial.number})

    def tell(self, proposal: Proposal, outcome: Outcome) -> None:
        number = proposal.meta.get("knob_trial")
        if number is None:
            return
        with self.lock:
            for study in (self.working, self.study):  # the copy, then the record: alike
                try:
                    if not outcome.final:
                        if outcome.score is not None and math.isfinite(outcome.score) and outcome.rung:
                            trial = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
                            study._storage.set_trial_intermediate_value(trial, rung_index(outcome.rung), outcome.score)
                    elif outcome.score is None or not math.isfinite(outcome.score):
                        study.tell(number, state=optuna.trial.TrialState.FAIL)
                    else:
                        study.tell(number, outcome.score)
                except (ValueError, RuntimeError, KeyError):
                    pass  # told already: a resumed search tells every finished candidate again
