"""What a search found: `speedsearch status` and the summary at the end of `launch`.

Speed-ups are shown in the one wording (`judge.Speedup.text()`, kept in each trial's
`speedup_text`), and only a candidate confirmed by the paired sequential test is ever called
"best"; the others are listed as what they are (unconfirmed, with the rung they reached).
"""

from __future__ import annotations

import math
import re
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent.faults import LOST_KEY, summary_line
from agent.names import Verdict
from agent.resume import FDR_KEY
from agent.settings import LADDER
from env.run_progress import progress_line, progress_rows
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
                     "model": t.model, "title": t.title, "short_title": short_title(t.title), "state": t.state,
                     "value": _num(t.value),
                     "fidelity": t.fidelity, "speedup": _num(t.attrs.get("speedup")), "gain": gain(t.attrs),
                     "speedup_text": speedup_words(t.attrs), "verdict": t.attrs.get("verdict"),
                     "reason": (t.attrs.get("reason") or t.attrs.get("fail_reason") or "")[:300]})
    fdr = db.get_state(FDR_KEY, None)
    guarantee = OnlineFDR.from_dict(fdr).guarantee if isinstance(fdr, dict) else ""
    kind = objective_kind(db, trials)
    parents = {r["commit"]: r["parent"] for r in rows if r["parent"]}
    for r in rows:
        r["depth"] = depth(r["commit"], parents, db.base_commit)
        r["objective_text"] = readable(kind, r["value"])
    for b in baseline.values():
        b["objective_text"] = readable(kind, b["objective"])
    return {"study": db.study_name, "storage": db.storage_url, "dir": str(db.dir), "base": db.base_commit,
            "objective_kind": kind,
            "baseline": baseline, "best": best_trial(rows), "leading": leading_trial(rows), "guarantee": guarantee,
            "confirmed": sum(1 for r in rows if r.get("verdict") == Verdict.PASS),
            "rejected": sum(1 for r in rows if r.get("verdict") == Verdict.FAIL and r["fidelity"] == "confirm"),
            "trials": rows, "lost": db.get_state(LOST_KEY, None), "long_runs": progress_rows(db.dir),
            "counts": {s: sum(1 for r in rows if r["state"] == s) for s in ("complete", "fail", "pruned", "running")}}


def objective_kind(db: RunsDB, trials: list) -> str:
    """The search's objective (time_to_target, ...), from a recorded speed-up or else its target."""
    for t in trials:
        detail = t.attrs.get("speedup_detail")
        if isinstance(detail, dict) and detail.get("kind"):
            return str(detail["kind"])
    try:
        from search_space.target import load_target

        return load_target(db.settings.get("target", "tinygpt")).objective
    except Exception:  # the target file moved away: the numbers are still shown, without a unit
        return ""


def readable(kind: str, value: float | None) -> str:
    """An objective value with its unit: seconds (or ms) to the target, steps, or a loss."""
    if value is None:
        return "-"
    if kind == "time_to_target":
        return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"
    if kind == "steps_to_target":
        return f"{value:.0f} steps"
    if kind == "loss_at_budget":
        return f"loss {value:.4f}"
    return f"{value:.4g}"


def depth(commit: str, parents: dict[str, str], base: str) -> int:
    """How many changes a candidate stacks on the base (1: a child of the base)."""
    n, cur, seen = 0, commit, set()
    while cur and cur != base and cur not in seen:
        seen.add(cur)
        n += 1
        cur = parents.get(cur, "")
    return n


_KNOB = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=([^,\s]+)")


def short_title(title: str) -> str:
    """A title that tells candidates apart in a narrow column: knob values compact and first
    (`knobs LR=2.06e-3 WD=0.215 ...`), a proposal's headline before its colon."""
    if title.startswith("knobs:"):
        pairs = _KNOB.findall(title)
        abbrev = {n: "".join(p[0] for p in n.split("_") if p) if "_" in n else n for n, _ in pairs}
        clash = {a for a in abbrev.values() if list(abbrev.values()).count(a) > 1}
        parts = [f"{abbrev[n] if abbrev[n] not in clash else n}={_compact(v)}" for n, v in pairs]
        return "knobs " + " ".join(parts) if parts else title
    head, sep, _ = title.partition(": ")
    return head if sep and len(head) >= 8 else title


def _compact(value: str) -> str:
    try:
        x = float(value)
    except ValueError:
        return value
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    if abs(x) < 0.01:
        mant, _, exp = f"{x:.2e}".partition("e")
        return f"{mant}e{int(exp)}"
    return f"{x:.3g}"


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


SORTS = ("best", "speedup", "trial", "rung", "proposer")


def _sort_key(sort: str):
    def rung(r: dict[str, Any]) -> int:
        return LADDER.index(r["fidelity"]) if r["fidelity"] in LADDER else -1

    def gain_desc(r: dict[str, Any]) -> float:
        return -r["gain"] if r.get("gain") is not None else math.inf

    return {
        "best": lambda r: (r.get("verdict") != Verdict.PASS, -rung(r), gain_desc(r), r["number"]),
        "speedup": lambda r: (gain_desc(r), r["number"]),
        "trial": lambda r: r["number"],
        "rung": lambda r: (-rung(r), gain_desc(r), r["number"]),
        "proposer": lambda r: (r["proposer"], gain_desc(r), r["number"]),
    }[sort]


def select_rows(data: dict[str, Any], all_rows: bool = False, sort: str = "best", rung: str = "",
                proposer: str = "") -> list[dict[str, Any]]:
    """The rows `status` shows. By default the measured candidates, each once at its highest rung
    (or at --rung), the best TOP of them; --all: every trial, in every state, no limit."""
    rows = data["trials"]
    if all_rows or proposer in ("baseline", "replay"):
        rows = list(rows)
    else:
        rows = _candidates(rows)
    if rung:
        rows = [r for r in rows if r["fidelity"] == rung]
    if proposer:
        rows = [r for r in rows if r["proposer"] == proposer]
    if not all_rows and proposer not in ("baseline", "replay"):
        top: dict[str, dict[str, Any]] = {}
        for r in rows:  # one row per candidate: its highest rung, the latest trial there
            key = (LADDER.index(r["fidelity"]), r["number"])
            if r["commit"] not in top or key > (LADDER.index(top[r["commit"]]["fidelity"]), top[r["commit"]]["number"]):
                top[r["commit"]] = r
        rows = list(top.values())
    rows = sorted(rows, key=_sort_key(sort))
    return rows if all_rows else rows[:TOP]


def candidates_table(rows: list[dict[str, Any]], title: str, width: int = 120) -> Table:
    """One row per trial: the candidate's short title, then its speed-up in the one wording; the
    title is cut to the room left, so that narrow terminals still tell candidates apart. Under
    110 columns the rung and its verdict, the proposer and the commit share a column each."""
    wide = width >= 110
    if wide:
        cols = [("#", 4), ("rung", 7), ("verdict", 11), ("who", 8), ("commit", 10), ("to target", 9)]
    else:
        cols = [("#", 4), ("rung", 11), ("who", 8)]
    room = max(20, width - sum(w + 2 for _, w in cols) - 3)
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    for name, w in cols:
        table.add_column(name, no_wrap=True, overflow="ellipsis", max_width=w)
    table.add_column("candidate, then its speed-up", overflow="fold", max_width=room, min_width=min(room, 20))
    for r in rows:
        name = r.get("short_title") or r["title"]
        more = f" (on {r['depth'] - 1} earlier)" if r.get("depth", 1) > 1 else ""
        if r["state"] != "complete":
            more += f" [{r['state']}]"
        if len(name) + len(more) > room:
            name = name[: max(1, room - len(more) - 1)] + "…"
        # Text, not markup: "[no interval]" and "[1.85, 2.10]" are words, not styles
        cell = Text(name + more)
        words = r.get("speedup_text") or (r.get("reason") or "")[:120]
        if words:
            cell += Text("\n" + words, style="bold" if r.get("speedup_text") else "dim")
        who = r["proposer"] if r["proposer"] != "llm" or not r.get("model") else f"llm:{r['model']}"
        verdict = r.get("verdict") or ""
        if wide:
            cells = [str(r["number"]), r["fidelity"], verdict, who, r["commit"][:10], r.get("objective_text") or "-"]
        else:
            rung = r["fidelity"] + ("\n" + verdict if verdict else "")
            cells = [str(r["number"]), rung, who + "\n" + r["commit"][:7]]
        table.add_row(*cells, cell)
    return table


def counts_line(data: dict[str, Any]) -> str:
    rows = data["trials"]
    base = sum(1 for r in rows if r["proposer"] == "baseline")
    c = data["counts"]
    line = (f"trials: {len(rows)} ({base} of the base): {c['complete']} complete, {c['fail']} failed, "
            f"{c['pruned']} pruned, {c['running']} running")
    lost = summary_line(data.get("lost"))  # the cluster's faults, apart from the candidates'
    line = f"{line}\n{lost}" if lost else line
    return "\n".join([line] + [progress_line(r) for r in data.get("long_runs") or []])  # checkpointed runs


def print_status(data: dict[str, Any], console: Console) -> None:
    for fid, b in data["baseline"].items():
        loss = f"{b['target_loss']:.4f}" if isinstance(b["target_loss"], int | float) else "-"
        kind = data.get("objective_kind", "")
        what = {"time_to_target": f"time to loss {loss}", "steps_to_target": f"steps to loss {loss}",
                "loss_at_budget": "loss at the budget"}.get(kind, "objective")
        value = b.get("objective_text") or "-"
        text = f"baseline @ {fid} (trial {b['trial']}, mean of its seeds): {what}: {value}"
        console.print(text, highlight=False, markup=False, soft_wrap=True)
    console.print(counts_line(data), highlight=False)
    rows = data.get("table")
    if rows is None:
        rows = select_rows(data)
    f = data.get("filters") or {}
    if f.get("all"):
        what = "every trial"
    else:
        where = f"at rung {f['rung']}" if f.get("rung") else "each at its highest rung"
        what = f"the best {TOP} candidates, {where}"
    narrowed = ", ".join(f"{k} {v}" for k, v in (("rung", f.get("rung") if f.get("all") else None),
                                                 ("proposer", f.get("proposer"))) if v)
    title = f"{what}{' (' + narrowed + ')' if narrowed else ''}; by {f.get('sort') or 'best'}"
    console.print(candidates_table(rows, title, console.width))
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
