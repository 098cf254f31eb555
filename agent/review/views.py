"""What the review page shows, as plain JSON built from the runs database (no HTML but the diff).

`table(db)` is polled every two seconds, so it reads the study once and nothing else; `candidate(db,
commit)` reads one candidate's trials, runs, lineage and diff when its page is opened.
"""

from __future__ import annotations

import math
from typing import Any

from agent.names import Rung, Who
from agent.report import speedup_words
from agent.review import diffview
from env.run_progress import progress_line, progress_rows
from runs_db.curves import baseline_band
from runs_db.db import RunsDB
from runs_db.pairs import paired_runs
from runs_db.reviews import queued, reviews
from runs_db.study import TrialRecord
from search_space import judge
from search_space.records import RunResult

FIDELITY_ORDER = ("smoke", "short", "full")


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def _row(t: TrialRecord) -> dict[str, Any]:
    a = t.attrs
    return {"number": t.number, "commit": t.commit, "parent": t.parent, "proposer": t.proposer,
            "model": t.model, "title": t.title, "state": t.state, "rung": t.fidelity, "value": _num(t.value),
            "speedup": _num(a.get("speedup")), "speedup_text": speedup_words(a), "verdict": a.get("verdict") or "",
            "purpose": a.get("purpose") or "", "reason": str(a.get("reason") or a.get("fail_reason") or "")[:300],
            "gpu_seconds": _num(a.get("gpu_seconds")), "llm_dollars": _num(a.get("llm_dollars"))}


def table(db: RunsDB) -> dict[str, Any]:
    """Every trial as a row, the reviews (recorded and still queued), and the search's base."""
    rows = [_row(t) for t in db.trials()]
    return {"base": db.base_commit, "trials": rows, "reviews": {c: r.to_dict() for c, r in reviews(db).items()},
            "queued": [q["commit"] for q in queued(db.dir)], "dir": str(db.dir),
            "long_runs": [progress_line(r) for r in progress_rows(db.dir)]}  # epoch k of n, ETA


def band(runs: list[RunResult]) -> list[dict[str, float]]:
    """The base's runs as a band (runs_db.curves.baseline_band): per step, the mean, min and max loss
    and the mean training time in ms."""
    return [{"step": step, "mean": mean, "low": low, "high": high, "ms": seconds * 1000.0}
            for step, seconds, mean, low, high in baseline_band(runs)]


def _series(r: RunResult, rung: str, number: int) -> dict[str, Any]:
    pts = [p for p in r.curve if math.isfinite(p.val_loss)]
    return {"name": f"seed {r.seed} ({rung}, trial {number})", "seed": r.seed, "rung": rung, "status": r.status.value,
            "step": [p.step for p in pts], "loss": [p.val_loss for p in pts], "ms": [p.train_ms for p in pts]}


def curves(db: RunsDB, mine: list[TrialRecord]) -> dict[str, Any]:
    """Per fidelity: the candidate's runs (one series per seed and rung) and the base's band."""
    out: dict[str, Any] = {}
    for t in mine:
        for r in db.runs(t.number):
            fid = r.fidelity or t.fidelity
            if r.curve:
                out.setdefault(fid, {"series": [], "band": [], "base_runs": 0})["series"].append(
                    _series(r, t.fidelity, t.number))
    for fid, entry in out.items():
        base = db.baseline(fid)
        entry["band"], entry["base_runs"] = band(base), len(base)
    return out


def _stats(db: RunsDB, mine: list[TrialRecord]) -> dict[str, Any]:
    """The one speed-up at each rung, confirm's paired p-value, replays, and cost."""
    rungs = []
    for t in mine:
        rungs.append({"number": t.number, "rung": t.fidelity, "state": t.state, "proposer": t.proposer,
                      "purpose": t.attrs.get("purpose") or "", "speedup_text": speedup_words(t.attrs),
                      "verdict": t.attrs.get("verdict") or "", "pvalue": _num(t.attrs.get("pvalue")),
                      "pairs": t.attrs.get("pairs"), "reason": str(t.attrs.get("reason") or "")[:500]})
    confirm = next((t for t in reversed(mine) if t.fidelity == Rung.CONFIRM and t.proposer != Who.REPLAY
                    and isinstance(t.attrs.get("speedup_detail"), dict)), None)
    pvalue = None
    if confirm is not None:  # the paired one-sided test over the confirm (and replay) pairs
        d = confirm.attrs["speedup_detail"]
        kind, target_loss = d.get("kind"), _num(d.get("target_loss"))
        if kind and target_loss is not None:
            g, _ = judge.gains(kind, paired_runs(db, confirm.commit).obs(kind, target_loss))
            pvalue = judge.pvalue(g) if len(g) >= 2 else None
    cost = {"llm_input_tokens": 0, "llm_output_tokens": 0, "llm_dollars": 0.0, "gpu_seconds": 0.0}
    for t in mine:
        for key in cost:
            cost[key] += _num(t.attrs.get(key)) or 0
    return {"rungs": rungs, "pvalue": pvalue, "confirm_trial": confirm.number if confirm else None, "cost": cost}


def _best_words(ts: list[TrialRecord]) -> str:
    """The latest measured speed-up, naming the run set it comes from (a rung, or a replay)."""
    done = [t for t in ts if t.state == "complete" and t.fidelity != "smoke" and speedup_words(t.attrs)]
    if not done:
        return ""
    t = done[-1]
    return f"{speedup_words(t.attrs)} ({t.attrs.get('purpose') or t.fidelity} runs, trial {t.number})"


def candidate(db: RunsDB, commit: str, against: str = "parent") -> dict[str, Any]:
    """One candidate's page: title, message, lineage, diff (against its parent or the base), curves,
    statistics and cost, and its review."""
    commit = db.resolve(commit)
    trials = db.trials()
    mine = [t for t in trials if t.commit == commit and (commit != db.base_commit or t.proposer != Who.BASELINE)]
    by_commit: dict[str, list[TrialRecord]] = {}
    for t in trials:
        by_commit.setdefault(t.commit, []).append(t)
    lineage = []
    for c in db.lineage(commit):
        lineage.append({"commit": c, "title": db.message(c).split("\n", 1)[0], "base": c == db.base_commit,
                        "speedup_text": "" if c == db.base_commit else _best_words(by_commit.get(c, []))})
    parent = lineage[1]["commit"] if len(lineage) > 1 else None
    other = db.base_commit if against == "base" or parent is None else parent
    diff = [] if other == commit else diffview.tree_diff(db.files(other), db.files(commit))  # the base: none
    review = reviews(db).get(commit)
    return {"commit": commit, "title": lineage[0]["title"], "message": db.message(commit), "parent": parent,
            "is_base": commit == db.base_commit, "against": "base" if other == db.base_commit else "parent",
            "against_commit": other, "lineage": lineage, "diff_html": diffview.to_html(diff),
            "changed": [{k: f[k] for k in ("path", "status", "added", "removed")} for f in diff],
            "curves": curves(db, mine), "stats": _stats(db, mine),
            "review": review.to_dict() if review else None,
            "queued": any(q["commit"] == commit for q in queued(db.dir))}
