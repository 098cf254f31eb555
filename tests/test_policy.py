"""The policy: Thompson sampling over arms, parents from the tree, state across a resume."""

from __future__ import annotations

from collections import Counter

from agent.policy import Node, Policy


def test_the_arm_that_wins_gets_most_proposals():
    p = Policy(["ideas", "knobs", "llm:m"], seed=1)
    p.rebuild([("ideas", True)] * 8 + [("ideas", False)] * 12 + [("knobs", False)] * 20 + [("llm:m", False)] * 20)
    picks = Counter(p.choose_arm() for _ in range(500))
    assert picks["ideas"] > 400


def test_rebuild_replaces_the_counts():
    p = Policy(["a", "b"])
    p.reward("a", True)
    p.rebuild([("b", True), ("b", False), ("gone", True)])
    assert p.counts == {"a": [0.0, 0.0], "b": [1.0, 1.0]}


def test_state_restores_the_random_stream_not_the_counts():
    p = Policy(["a", "b"], seed=3)
    p.reward("a", True)
    q = Policy(["a", "b"], seed=99)
    q.load(p.state())
    assert q.counts == {"a": [0.0, 0.0], "b": [0.0, 0.0]}  # the counts come from rebuild
    state = p.state()
    p2, q2 = Policy(["a", "b"]), Policy(["a", "b"])
    p2.load(state)
    q2.load(state)
    assert [p2.choose_arm() for _ in range(20)] == [q2.choose_arm() for _ in range(20)]


def test_retired_arms_are_never_chosen():
    p = Policy(["a", "b"])
    p.retire("a")
    assert {p.choose_arm() for _ in range(50)} == {"b"}
    p.retire("b")
    assert p.choose_arm() is None


def test_parents_improve_the_best_explore_or_draft():
    nodes = [Node("fast", 0.5, 2), Node("ok", 0.9, 1), Node("slow", 1.2, 2)]
    p = Policy(["a"], seed=0)
    whys = Counter()
    for _ in range(400):
        commit, why = p.choose_parent("base", nodes)
        whys[why] += 1
        assert commit != "slow"  # never a parent that lost to the base
        if why == "best":
            assert commit == "fast"
        if why == "draft":
            assert commit == "base"
    assert set(whys) == {"best", "explore", "draft"}
    assert p.choose_parent("base", [Node("slow", 1.2, 2)])[0] == "base"
