"""One vocabulary for the agent: the rungs of the ladder, who proposed a trial, and how a candidate ends.

Every enum is a `StrEnum`, so a member equals the plain string the runs database stores
(`Rung.SHORT == "short"`): old records and new code read each other without conversion.
"""

from __future__ import annotations

from enum import StrEnum


class Rung(StrEnum):
    """Where a candidate stands on the ladder; each rung is one study trial."""

    SMOKE = "smoke"  # does it run at all (a few steps)
    SHORT = "short"  # one seed, part of the steps
    FULL = "full"  # one seed, all the steps
    CONFIRM = "confirm"  # fresh seeds, each paired with a baseline run, until the sequential test answers


LADDER: tuple[Rung, ...] = tuple(Rung)
MEASURED = (Rung.SHORT, Rung.FULL)  # single-seed rungs whose objective the learners compare


def run_fidelity(rung: str) -> str:
    """The trainer fidelity a rung runs at: `confirm` repeats `full` with new seeds."""
    return Rung.FULL.value if rung == Rung.CONFIRM else str(rung)


def rung_index(rung: str) -> int:
    return LADDER.index(Rung(rung))


class Who(StrEnum):
    """Who a study trial belongs to (its `proposer` column)."""

    BASELINE = "baseline"  # the base's own runs: the band, refreshes, and confirm's paired runs
    IDEAS = "ideas"
    KNOBS = "knobs"
    LLM = "llm"
    REPLAY = "replay"  # `speedsearch replay`, run by hand


SEARCH_PROPOSERS = (Who.IDEAS, Who.KNOBS, Who.LLM)  # trials of the search itself


class Verdict(StrEnum):
    """A candidate's last word. Only PASS is ever called a win."""

    PASS = "pass"  # confirmed by the paired sequential test at its FDR level
    FAIL = "fail"  # confirmation rejected it
    MORE = "more"  # confirm goes on with more pairs (never final)
    STOPPED = "stopped"  # left the ladder before confirm: failed, pruned or not faster at a rung
    UNCONFIRMED = "unconfirmed"  # beat the baseline at the top rung the settings allow, never confirmed
    UNTRUSTED = "untrusted"  # its measurement is not trusted, so it is shown but never confirmed
