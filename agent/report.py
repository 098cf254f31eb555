"""What a search found: `speedsearch status` and the summary at the end of `launch`.

Speed-ups are shown in the one wording (`judge.Speedup.text()`, kept in each trial's
`speedup_text`), and only a candidate confirmed by the paired sequential test is ever called
"best"; the others are listed as what they are (unconfirmed, with the rung they reached).
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent.names import Verdict
from agent.resume import FDR_KEY
from agent.settings import LADDER
from runs_db.db import RunsDB
from search_space.judge import OnlineFDR, Speedup

TOP = 8


def _num(x: Any) -> float | None:
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def speedup_words(attrs: dict[str, Any]) -> str:
    """A trial's speed-up in the one wording; older searches kept only a bare ratio."""
    if attrs.get("speedup_text"):
        return str(attrs["speedup_text"])
    if isinstance(attrs.get("speedup_detail"), dict):
        return Speedup.from_dict(attrs["speedup_detail"]).text()
    x = _num(attrs.get("speedup"))
    return f"{x:.2f}x (an older search: no interval)" if x else ""


def gain(attrs: dict[str, Any]) -> float | None:
    """The speed-up on one scale, positive = better than the base (log ratio, or loss reduction for
    loss_at_budget, whose estimate is a difference); None when not measured."""
    if isinstance(attrs.get("speedup_detail"), dict):
        g = Speedup.from_dict(attrs["speedup_detail"]).gain
        return g if math.isfinite(g) else None
    x = _num(attrs.get("speedup"))
    return math.log(x) if x and x > 0 else None


def status_dict(db: RunsDB) -> dict[str, Any]:
    trials = db.trials()
    baseline: dict[str, Any] = {}
    rows = []
    for t in trials:
        if t.proposer == "baseline" and t.state == "complete" and "pairs_for" not in t.attrs:
            band = t.attrs.get("baseline", {})
            baseline[t.fidelity] = {"trial": t.number, "target_loss": t.attrs.get("target_loss"),
                                    "objective": _num(t.value), "band": band}
        rows.append({"number": t.number, "commit": t.commit, "parent": t.parent, "proposer": t.proposer,
                     "model": t.model, "title": t.title, "state": t.state, "value": _num(t.value),
                     "fidelity": t.fidelity, "speedup": _num(t.attrs.get("speedup")), "gain": gain(t.attrs),
                     "speedup_text": speedup_words(t.attrs), "verdict": t.attrs.get("verdict"),
                     "reason": (t.attrs.get("reason") or t.attrs.get("fail_reason") or "")[:300]})
    fdr = db.get_state(FDR_KEY, None)
    guarantee = OnlineFDR.from_dict(fdr).guarantee if isinstance(fdr, dict) else ""
    return {"study": db.study_name, "storage": db.storage_url, "dir": str(db.dir), "base": db.base_commit,
            "baseline": baseline, "best": best_trial(rows), "leading": leading_trial(rows), "guarantee": guarantee,
            "confirmed": sum(1 for r in rows if r.get("verdict") == Verdict.PASS),
            "rejected": sum(1 for r in rows if r.get("verdict") == Verdict.FAIL and r["fidelity"] == "confirm"),
            "trials": rows,
            "counts": {s: sum(1 for r in rows if r["state"] == s) for s in ("complete", "fail", "pruned", "running")}}


def _candidates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["proposer"] not in ("baseline", "replay") and r["state"] == "complete"
            and r["fidelity"] in LADDER and r["fidelity"] != "smoke" and r.get("gain") is not None]


def _pick(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in ("number", "commit", "title", "speedup", "speedup_text", "fidelity", "verdict")}


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The confirmed candidate with the largest speed-up; None when nothing was confirmed."""
    good = [r for r in _candidates(rows) if r.get("verdict") == Verdict.PASS]
    return _pick(max(good, key=lambda r: r["gain"])) if good else None


def leading_trial(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The unconfirmed candidate furthest up the ladder that beats the base there (never "best")."""
    good = [r for r in _candidates(rows) if r.get("verdict") not in (Verdict.PASS, Verdict.FAIL) and r["gain"] > 0]
    return _pick(max(good, key=lambda r: (LADDER.index(r["fidelity"]), r["gain"]))) if good else None


COLUMNS = (("trial", 5), ("rung", 7), ("candidate: title, then its speed-up", 0), ("proposer", 8),
           ("verdict", 11), ("commit", 10))


def candidates_table(rows: list[dict[str, Any]], title: str, width: int = 120) -> Table:
    table = Table(title=title)
    room = max(24, width - sum(w + 3 for _, w in COLUMNS) - 4)  # the candidate column takes what is left
    for col, w in COLUMNS:
        table.add_column(col, overflow="fold" if not w else "ellipsis", no_wrap=bool(w),
                         min_width=w or None, max_width=room if not w else None)
    top = sorted(_candidates(rows), key=lambda r: (r.get("verdict") != Verdict.PASS, -LADDER.index(r["fidelity"]),
                                                   -r["gain"]))[:TOP]
    for r in top:  # Text, not markup: "[no interval]" and "[1.85, 2.10]" are words, not styles
        cell = Text(r["title"]) + Text("\n" + r["speedup_text"], style="bold")
        table.add_row(str(r["number"]), r["fidelity"], cell, r["proposer"], r.get("verdict") or "", r["commit"][:10])
    return table


def print_status(data: dict[str, Any], console: Console) -> None:
    for fid, b in data["baseline"].items():
        value = f"{b['objective']:.1f}" if b["objective"] is not None else "-"
        loss = f"{b['target_loss']:.4f}" if isinstance(b["target_loss"], int | float) else "-"
        console.print(f"baseline @ {fid}: target loss {loss}, objective {value}")
    console.print(f"trials: {data['counts']}")
    console.print(candidates_table(data["trials"], f"best candidates in {data['dir']}", console.width))
    console.print(best_lines(data), highlight=False, markup=False)


def best_lines(data: dict[str, Any]) -> str:
    """What was found, said plainly: the best confirmed candidate, or that nothing was confirmed."""
    guarantee = f" ({data['guarantee']})" if data.get("guarantee") else ""
    best, lead = data["best"], data.get("leading")
    if best:
        out = (f"best (confirmed{guarantee}): {best['title']}: {best['speedup_text']}, commit {best['commit'][:10]}; "
               f"{data['confirmed']} confirmed, {data['rejected']} rejected by confirmation")
    else:
        out = f"nothing confirmed{guarantee}: {data['rejected']} candidate(s) rejected by confirmation"
        if lead:
            out += (f"; leading, NOT confirmed: {lead['title']} at {lead['fidelity']}: {lead['speedup_text']}, "
                    f"commit {lead['commit'][:10]}")
    return out


def plots(db: RunsDB, data: dict[str, Any]) -> list[str]:
    """Draw the search's progress and the best candidate's loss curves; lines saying where they are."""
    from runs_db.plots import plot_progress

    # Ratios only: a loss_at_budget speed-up is a difference and has no place on a ratio axis.
    points = [(r["number"], r["fidelity"], math.exp(r["gain"])) for r in _candidates(data["trials"])
              if not r["speedup_text"].startswith("loss at")]
    out = []
    # What the speed-up compares, e.g. "time to loss 2.466", from the one wording.
    what = next((r["speedup_text"].split(":")[0] for r in data["trials"] if " to loss " in r["speedup_text"]), "")
    if path := plot_progress(points, db.dir / "progress.png", f"speedsearch: {data['study']}", what):
        out.append(f"progress plot: {path}")
    shown = data["best"] or data.get("leading")
    if shown and (path := db.plot(shown["number"])):
        out.append(f"{'best' if data['best'] else 'leading (unconfirmed)'} candidate's loss curves: {path}")
    return out


def print_summary(db: RunsDB, summary, console: Console) -> None:
    data = status_dict(db)
    print_status(data, console)
    for line in plots(db, data):
        console.print(line, markup=False)
    console.print(f"stopped: {summary.stopped_by}; {summary.trials} candidate trials; "
                  f"{summary.worker_hours:.2f} worker-hours; LLM ${summary.dollars:.2f}")
    console.print(f"search folder: {db.dir}  (speedsearch status --dir {db.dir}; "
                  f"optuna-dashboard {data['storage']})")
