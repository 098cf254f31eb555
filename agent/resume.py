"""Resume: everything the loop knows is in the runs database, so the queue is rebuilt from it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.baseline import build_baseline
from agent.candidates import Record
from agent.trials import SEARCH_PROPOSERS, Pending

if TYPE_CHECKING:
    from agent.loop import Search

INTERRUPTED = "interrupted"  # the reason on trials cut short: a resumed search runs them again


def restore(search: Search) -> None:
    """Rebuild the loop's queue and knowledge from the runs database (a new search finds it empty).

    Trials a dead controller left running are marked failed and run again; completed ones are
    reused, and each candidate climbs on from where it stopped.
    """
    for t in search.db.stale_running():
        search.db.mark_failed(t.number, INTERRUPTED)
    trials = search.db.trials()
    search.next_number = max((t.number for t in trials), default=-1) + 1
    latest: dict[tuple[str, str], object] = {}
    for t in trials:
        latest[(t.commit, t.fidelity if t.proposer != "baseline" else "baseline:" + t.fidelity)] = t
    base = search.db.base_commit
    fids = search.baseline_fidelities()
    # Workers that would idle until the baseline is known measure it with more seeds instead.
    n_seeds = max(search.settings.seeds, min(search.settings.max_seeds, search.capacity // max(1, len(fids))))
    for fid in fids:
        t = latest.get((base, "baseline:" + fid))
        if t is not None and t.state == "complete":
            search.baselines[fid] = build_baseline(search.target, fid, search.db.runs(t.number))
        else:
            search.push(Pending(base, "", fid, tuple(range(n_seeds)), "baseline", "baseline"))
    for (commit, rung), t in sorted(latest.items(), key=lambda kv: kv[1].number):
        if t.proposer not in SEARCH_PROPOSERS:  # the baseline, and replays run by hand
            continue
        if t.state == "complete" and t.value is not None:
            search.values[(commit, rung)] = t.value
        search.candidates.record(Record(commit, t.parent, t.title, t.proposer, rung, t.attrs.get("status", t.state),
                                        t.value, t.attrs.get("speedup", 0.0), t.attrs.get("reason", "")))
        if t.state == "fail" and t.attrs.get("reason") == INTERRUPTED:
            search.push(Pending(commit, t.parent, rung, tuple(t.attrs.get("seeds", [0])), t.title, t.proposer,
                             t.model))
        elif t.state in ("complete", "fail", "pruned") and rung in search.settings.ladder:
            search.climb(commit, t.parent, rung, t.title, t.proposer, t.model, search.db.runs(t.number),
                     t.value, resumed=latest)
    tried = {t.commit for t in trials}
    for commit, parent, title, proposer in search.db.candidates():
        if commit not in tried:  # committed, then the controller died before its trial started
            search.push(Pending(commit, parent, "smoke", (0,), title, proposer))
    search.summary.trials = sum(1 for t in trials if t.proposer in SEARCH_PROPOSERS)
