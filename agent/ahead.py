"""Proposals run ahead of evaluations: which arm and parent to ask, in a thread pool, and what came back.

An LLM call takes tens of seconds, so proposals are asked for before workers free up. An arm whose
proposer raised a fatal error, or had nothing to offer NONE_STREAK times in a row, is retired; the
idea library is only dry for the parents it has nothing left for.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

from agent.candidates import Candidates
from agent.live import Live
from agent.names import Who
from agent.policy import Node, Policy
from agent.proposal import Proposal, Proposer

NONE_STREAK = 8  # an arm that had nothing to offer this many times in a row is retired


class Ahead:
    def __init__(self, policy: Policy, proposers: dict[str, Proposer], candidates: Candidates, live: Live,
                 threads: int):
        self.policy, self.proposers, self.candidates, self.live = policy, proposers, candidates, live
        self.futures: dict[Future, tuple[str, str]] = {}
        self.none_streak: dict[str, int] = {}
        self.dry: dict[str, set[str]] = {}  # arm -> parents it had nothing left for
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="propose")
        # What came of the asks, for bench/loop.py: (arm, "none" | "error" | "returned") -> count,
        # and each proposal's seconds from the ask to its answer (queueing for a thread included).
        self.counts: Counter[tuple[str, str]] = Counter()
        self.seconds: dict[str, list[float]] = {}

    def proposer(self, arm_or_who: str) -> Proposer:
        return self.proposers[arm_or_who.split(":")[0]]

    def ask(self, n: int, base: str, nodes: list[Node], baseline_line: str) -> None:
        """Ask for up to `n` more proposals."""
        for _ in range(max(0, n)):
            arm = self.policy.choose_arm()
            if arm is None:
                return
            parent = self.parent(arm, base, nodes)
            if parent is None:
                self.policy.retire(arm)  # dry on every parent for now; new nodes bring it back
                continue
            ctx = self.candidates.context(parent, baseline_line)
            if arm.startswith("llm:"):
                ctx.notes = ctx.notes + [f"model: {arm[4:]}"]
            fut = self.pool.submit(self.proposer(arm).propose, ctx)
            self.futures[fut] = (arm, parent)
            asked = time.perf_counter()
            fut.add_done_callback(lambda _f, arm=arm, asked=asked:
                                  self.seconds.setdefault(arm, []).append(time.perf_counter() - asked))

    def rejected(self, arm: str, why: str) -> None:
        """Count a proposal the candidates refused, by the kind of reason (bench/loop.py)."""
        self.counts[arm, "rejected: " + why.split(" as ")[0].split(" of ")[0][:40]] += 1

    def parent(self, arm: str, base: str, nodes: list[Node]) -> str | None:
        parent, _why = self.policy.choose_parent(base, nodes)
        dry = self.dry.get(arm, set())
        if parent not in dry:
            return parent
        ranked = [n.commit for n in sorted(nodes, key=lambda n: (-n.rung, n.score))] + [base]
        return next((c for c in ranked if c not in dry), None)

    def new_parent(self) -> None:
        """A candidate beat the base somewhere: arms dry on the old parents may have something again."""
        self.policy.exhausted -= set(self.dry)

    def collect(self) -> list[tuple[str, str, Proposal]]:
        """The proposals that came back: (arm, parent, proposal)."""
        out = []
        for fut in [f for f in self.futures if f.done()]:
            arm, parent = self.futures.pop(fut)
            try:
                proposal = fut.result()
            except Exception as e:  # a proposer bug must not end the search
                self.live.note(f"{arm} failed: {type(e).__name__}: {e}")
                self.counts[arm, "error"] += 1
                if getattr(e, "fatal", False):
                    self.policy.retire(arm)
                    continue
                proposal = None
            self.counts[arm, "none" if proposal is None else "returned"] += 1
            if proposal is None:
                if arm == Who.IDEAS:  # the library has nothing more for this parent
                    self.dry.setdefault(arm, set()).add(parent)
                else:
                    self.none_streak[arm] = self.none_streak.get(arm, 0) + 1
                    if self.none_streak[arm] >= NONE_STREAK:
                        self.policy.retire(arm)
                        self.live.note(f"{arm}: {NONE_STREAK} proposals in a row failed; retired")
                continue
            self.none_streak[arm] = 0
            out.append((arm, parent, proposal))
        return out

    def stop(self) -> None:
        for fut in self.futures:
            fut.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
