"""What a search found: `speedsearch status` and the summary at the end of `launch`."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from agent.settings import LADDER
from runs_db.db import RunsDB

TOP = 8


def _num(x: Any) -> float | None:
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def status_dict(db: RunsDB) -> dict[str, Any]:
    trials = db.trials()
    baseline: dict[str, Any] = {}
    rows = []
    for t in trials:
        if t.proposer == "baseline" and t.state == "complete":
            band = t.attrs.get("baseline", {})
            baseline[t.fidelity] = {"trial": t.number, "target_loss": t.attrs.get("target_loss"),
                                    "objective": _num(t.value), "band": band}
        rows.append({"number": t.number, "commit": t.commit, "parent": t.parent, "proposer": t.proposer,
                     "model": t.model, "title": t.title, "state": t.state, "value": _num(t.value),
                     "fidelity": t.fidelity, "speedup": t.attrs.get("speedup"), "verdict": t.attrs.get("verdict"),
                     "reason": (t.attrs.get("reason") or t.attrs.get("fail_reason") or "")[:300]})
    best = best_trial(rows)
    return {"study": db.study_name, "storage": db.storage_url, "dir": str(db.dir), "base": db.base_commit,
            "baseline": baseline, "best": best, "trials": rows,
            "counts": {s: sum(1 for r in rows if r["state"] == s) for s in ("complete", "fail", "pruned", "running")}}


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    good = [r for r in rows if r["proposer"] != "baseline" and r["state"] == "complete"
            and (r.get("speedup") or 0) > 1.0 and r["fidelity"] in LADDER and r.get("verdict") != "fail"]
    if not good:
        return None
    r = max(good, key=lambda r: (LADDER.index(r["fidelity"]), r["speedup"]))
    return {"number": r["number"], "commit": r["commit"], "title": r["title"], "speedup": r["speedup"],
            "fidelity": r["fidelity"], "verdict": r.get("verdict")}


COLUMNS = (("trial", 5), ("rung", 7), ("title", 0), ("proposer", 8), ("speed-up", 8), ("verdict", 7), ("commit", 10))


def candidates_table(rows: list[dict[str, Any]], title: str, width: int = 120) -> Table:
    table = Table(title=title)
    room = max(16, min(60, width - sum(w + 3 for _, w in COLUMNS) - 4))  # the title takes what is left
    for col, w in COLUMNS:
        table.add_column(col, overflow="ellipsis", no_wrap=True, min_width=w or None, max_width=room if not w else None)
    top = sorted((r for r in rows if r["proposer"] != "baseline" and r["state"] == "complete"
                  and (r.get("speedup") or 0) > 0 and r["fidelity"] != "smoke"),
                 key=lambda r: (-LADDER.index(r["fidelity"]), -(r["speedup"] or 0)))[:TOP]
    for r in top:
        table.add_row(str(r["number"]), r["fidelity"], r["title"], r["proposer"], f"{r['speedup']:.3f}x",
                      r.get("verdict") or "", r["commit"][:10])
    return table


def print_status(data: dict[str, Any], console: Console) -> None:
    for fid, b in data["baseline"].items():
        value = f"{b['objective']:.1f}" if b["objective"] is not None else "-"
        console.print(f"baseline @ {fid}: target loss {b['target_loss']:.4f}, objective {value}")
    console.print(f"trials: {data['counts']}")
    console.print(candidates_table(data["trials"], f"best candidates in {data['dir']}", console.width))
    best = data["best"]
    console.print(f"best: {best['title']} ({best['speedup']:.3f}x at {best['fidelity']}, commit {best['commit'][:10]})"
                  if best else "best: none beats the baseline yet")


def plots(db: RunsDB, data: dict[str, Any]) -> list[str]:
    """Draw the search's progress and the best candidate's loss curves; lines saying where they are."""
    from runs_db.plots import plot_progress

    points = [(r["number"], r["fidelity"], r["speedup"]) for r in data["trials"]
              if r["proposer"] != "baseline" and r["state"] == "complete" and r.get("speedup")]
    out = []
    if path := plot_progress(points, db.dir / "progress.png", f"speedsearch: {data['study']}"):
        out.append(f"progress plot: {path}")
    if data["best"] and (path := db.plot(data["best"]["number"])):
        out.append(f"best candidate's loss curves: {path}")
    return out


def print_summary(db: RunsDB, summary, console: Console) -> None:
    data = status_dict(db)
    print_status(data, console)
    for line in plots(db, data):
        console.print(line)
    console.print(f"stopped: {summary.stopped_by}; {summary.trials} candidate trials; "
                  f"{summary.worker_hours:.2f} worker-hours; LLM ${summary.dollars:.2f}")
    console.print(f"search folder: {db.dir}  (speedsearch status --dir {db.dir}; "
                  f"optuna-dashboard {data['storage']})")
