"""What each learner is told (agent.reward), pure."""

from __future__ import annotations

import optuna

from agent import reward
from agent.names import Verdict
from agent.proposal import Outcome, Proposal, ProposalContext
from agent.proposers.ideas import IdeasProposer
from agent.proposers.knobs import KnobsProposer
from search_space.edits import Edit
from search_space.ideas import Idea
from search_space.knobs import Knob


def test_the_bandit_compares_with_the_parent_at_the_highest_rung_both_reached():
    parent = {"short": 0.9, "full": 0.8}
    assert reward.compared_rung({"short": 0.85}, parent) == "short"
    assert reward.improved({"short": 0.85}, parent)  # better than the parent at short
    assert not reward.improved({"short": 0.85, "full": 0.81}, parent)  # but not at full, which counts
    assert reward.improved({"short": 0.95, "full": 0.7}, parent)


def test_the_base_as_parent_scores_one():
    assert reward.improved({"short": 0.99}, reward.BASE_SCORES)
    assert not reward.improved({"short": 1.01}, reward.BASE_SCORES)


def test_no_measurement_or_a_rejected_confirmation_earns_nothing():
    assert not reward.improved({}, reward.BASE_SCORES)  # failed smoke, pruned
    assert not reward.improved({"full": 0.5}, reward.BASE_SCORES, Verdict.FAIL)
    assert reward.improved({"full": 0.5}, reward.BASE_SCORES, Verdict.PASS)
    assert not reward.improved({"full": 0.5}, {})  # a parent never measured


def test_a_knob_trial_gets_the_score_at_the_highest_rung_or_fails():
    assert reward.knob_value({"short": 0.7, "full": 0.9}) == 0.9
    assert reward.knob_value({"short": 0.7}) == 0.7
    assert reward.knob_value({}) is None


# -- the learners themselves, told as the loop tells them ----------------------------------------

KNOBS = (Knob("lr", "float", 1e-4, 1e-1, log=True),)


def ctx(parent: str = "p0") -> ProposalContext:
    return ProposalContext(target=None, parent=parent, files={"train.py": "A = 1\nB = 1\nC = 1\n"})  # type: ignore


def final(won: bool, score: float | None = 0.9) -> Outcome:
    return Outcome("full" if score else "smoke", "ok" if score else "failed", score=score, won=won, final=True,
                   verdict="stopped")


def test_the_idea_library_tries_winning_ideas_first_and_never_repeats_one():
    ideas = [Idea(n, n, "r", (Edit("train.py", f"{n} = 1", f"{n} = 2"),)) for n in "ABC"]
    lib = IdeasProposer(ideas, seed=0)
    for parent in "xyz":  # B wins everywhere it is tried, A and C lose
        for _ in range(3):
            p = lib.propose(ctx(parent))
            lib.tell(p, final(won=p.ideas[-1] == "B"))
    assert (lib.wins, lib.losses) == ({"B": 3}, {"A": 3, "C": 3})
    resumed = [IdeasProposer(ideas, seed=s) for s in range(20)]
    for r in resumed:  # a resumed search tells every ended candidate again
        for parent in "xyz":
            for name in "ABC":
                r.tell(Proposal(name, "r", "ideas", parent, ideas=(name,)), final(won=name == "B"))
    assert sum(r.propose(ctx("new")).ideas[-1] == "B" for r in resumed) >= 16  # the winner first
    assert resumed[0].propose(ctx("x")) is None  # nothing is proposed again where it was tried


def test_a_knob_trial_hears_every_rung_then_ends_complete_or_failed(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    kp = KnobsProposer(KNOBS, url, "knobs", seed=0)
    good, bad = kp.propose(ctx()), kp.propose(ctx())
    kp.tell(good, Outcome("short", "ok", 80.0, 0.8))
    kp.tell(good, Outcome("full", "ok", 85.0, 0.85))
    assert kp.running() == 2  # a rung's result is an intermediate value, not the end
    kp.tell(good, Outcome("full", "ok", 85.0, 0.85, won=True, final=True, verdict="unconfirmed"))
    kp.tell(bad, final(False, score=None))
    kp.tell(bad, final(False, score=None))  # told again (a resume): no error, no change
    trials = {t.number: t for t in kp.study.get_trials()}
    g, b = trials[good.meta["knob_trial"]], trials[bad.meta["knob_trial"]]
    assert g.state == optuna.trial.TrialState.COMPLETE and g.value == 0.85
    assert g.intermediate_values == {1: 0.8, 2: 0.85}  # keyed by the rung's index on the ladder
    assert b.state == optuna.trial.TrialState.FAIL and kp.running() == 0


def test_a_resumed_sampler_does_not_replay_its_draws_and_fails_only_orphans(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    first = KnobsProposer(KNOBS, url, "knobs", seed=0)
    before = [first.propose(ctx()) for _ in range(3)]  # asked, then the controller died
    again = KnobsProposer(KNOBS, url, "knobs", seed=0)
    after = [again.propose(ctx()).knobs for _ in range(3)]
    assert not {p.knobs["lr"] for p in before} & {k["lr"] for k in after}
    assert again.settle({before[0].meta["knob_trial"]}) == 2 + 3  # two orphans and the three just asked
    assert again.running() == 1  # the one a resumed candidate will still report on
    # the sampler's copy in memory is the record's, trial for trial (numbers, states, values)
    again.tell(before[0], final(True, score=0.7))
    seen = [[(t.number, t.state, t.params, t.value) for t in s.get_trials()] for s in (again.working, again.study)]
    assert seen[0] == seen[1] and len(seen[0]) == 6 and seen[0][before[0].meta["knob_trial"]][3] == 0.7
