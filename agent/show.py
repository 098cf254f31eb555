"""`speedsearch show`: everything about one candidate, as data (the command renders it, or prints JSON).

A candidate is named by its commit (a prefix will do) or by the number of one of its trials.
Every number says which runs it comes from (its `runs` field): a screening rung's single seed
(the run that selected the candidate), the search's confirm runs (fresh seeds, each beside a base
run), or a replay's fresh seeds. Speed-ups are the one speed-up (`judge.Speedup`), in its words.
"""

from __future__ import annotations

import math
from typing import Any

from agent.names import LADDER, Verdict, Who
from runs_db.db import RunsDB
from runs_db.pairs import pair_up
from runs_db.study import TrialRecord
from search_space import judge
from search_space.errors import UserError
from search_space.records import RunResult


def resolve(db: RunsDB, ref: str, trials: list[TrialRecord]) -> tuple[str, int | None]:
    """(commit, trial number or None) for a trial number or a commit (prefix)."""
    ref = ref.strip()
    number = ref.isdigit() and len(ref) < 7
    if number:
        t = next((t for t in trials if t.number == int(ref)), None)
        if t is not None:
            if t.commit == db.base_commit:
                if t.attrs.get("pairs_for") is not None:  # a base run beside a candidate: show that one
                    return resolve(db, str(t.attrs["pairs_for"]), trials)
                raise UserError(f"trial {ref}: a run of the base (baseline), not a candidate; "
                                "name a candidate's trial or commit")
            return t.commit, t.number
    try:
        commit = db.resolve(ref)  # HistoryError (one line) for an unknown commit
    except ValueError:
        if not number:
            raise
        raise UserError(f"{ref}: neither a trial number (this search has trials 0 to {len(trials) - 1}) "
                        "nor a commit") from None
    if commit == db.base_commit:
        raise UserError(f"{ref}: the base itself, not a candidate; name a candidate's trial or commit")
    return commit, None


def run_set(t: TrialRecord) -> str:
    """Which runs a trial's numbers come from, in words."""
    if t.proposer == Who.REPLAY:
        purpose = t.attrs.get("purpose") or "replay"
        return f"{purpose}'s fresh seeds (trial {t.number}), each beside a base run"
    if t.fidelity == "confirm":
        return f"the search's confirm runs (trial {t.number}): fresh seeds, each beside a base run"
    return f"screening at {t.fidelity} (trial {t.number}): the single seed that selected it, vs the base's band"


def _speedup(t: TrialRecord) -> judge.Speedup | None:
    d = t.attrs.get("speedup_detail")
    return judge.Speedup.from_dict(d) if isinstance(d, dict) and d.get("kind") else None


def _best_trial(ts: list[TrialRecord]) -> TrialRecord | None:
    """The trial that speaks for a candidate: its highest rung with a speed-up, the latest there
    (a replay counts as confirm)."""
    measured = [t for t in ts if t.state == "complete" and _speedup(t) is not None]
    if not measured:
        return None
    return max(measured, key=lambda t: (LADDER.index(t.fidelity) if t.fidelity in LADDER else -1,
                                        t.proposer != Who.REPLAY, t.number))


def lineage(db: RunsDB, commit: str, by_commit: dict[str, list[TrialRecord]]) -> list[dict[str, Any]]:
    """From the base's first change to `commit`: each step with its own measured speed-up and its
    gain over its parent, where both were measured at the same rung against the same target."""
    chain = list(reversed(db.lineage(commit)))[1:]  # the base first, then left out
    steps: list[dict[str, Any]] = []
    prev: dict[int, tuple[judge.Speedup, TrialRecord]] = {}  # the parent's speed-ups by rung (base: none)
    for c in chain:
        ts = by_commit.get(c, [])
        mine: dict[int, tuple[judge.Speedup, TrialRecord]] = {}
        for t in sorted(ts, key=lambda t: t.number):
            sp = _speedup(t)
            if sp is not None and t.state == "complete" and t.fidelity in LADDER and t.proposer != Who.REPLAY:
                mine[LADDER.index(t.fidelity)] = (sp, t)
        best = _best_trial(ts)
        title = db.message(c).split("\n", 1)[0]
        step: dict[str, Any] = {"commit": c, "title": title, "proposer": ts[0].proposer if ts else "",
                                "rung": best.fidelity if best else None, "verdict": best.attrs.get("verdict") if best
                                else None, "speedup_text": best.attrs.get("speedup_text") if best else "",
                                "runs": run_set(best) if best else "never measured", "over_parent": None}
        if not steps:  # a child of the base: its gain over its parent is its speed-up
            if best is not None and (sp := _speedup(best)) is not None and math.isfinite(sp.gain):
                step["over_parent"] = {"factor": _factor(sp.kind, sp.gain), "text": sp.text(), "runs": run_set(best)}
            else:
                step["over_parent"] = {"factor": None, "text": "never measured", "runs": ""}
        else:
            both = sorted(set(mine) & set(prev), reverse=True)
            for rung in both:
                (a, ta), (b, tb) = mine[rung], prev[rung]
                if a.kind == b.kind and a.target_loss == b.target_loss and math.isfinite(a.gain - b.gain):
                    step["over_parent"] = {
                        "factor": _factor(a.kind, a.gain - b.gain),
                        "text": f"{_words(a.kind, a.gain - b.gain)} over its parent at {LADDER[rung]} (this "
                                f"step's speed-up over the parent's, both vs base)",
                        "runs": f"{run_set(ta)}; parent: {run_set(tb)}"}
                    break
            if step["over_parent"] is None:
                step["over_parent"] = {"factor": None, "text": "not comparable: it and its parent were never "
                                       "measured at the same rung", "runs": ""}
        steps.append(step)
        prev = mine
    return steps


def _factor(kind: str, gain: float) -> float:
    return -gain if kind == "loss_at_budget" else math.exp(gain)


def _words(kind: str, gain: float) -> str:
    if kind == "loss_at_budget":
        return f"{-gain:+.4f} loss"
    return f"{math.exp(gain):.2f}x"


def _final(r: RunResult) -> dict[str, Any]:
    f = r.final
    if f is None:
        return {"val_loss": None, "train_ms": None, "steps": None}
    return {"val_loss": f.val_loss, "train_ms": f.train_ms, "steps": f.step}


def seeds_table(db: RunsDB, ts: list[TrialRecord], partners: dict[int, TrialRecord], kind: str,
                default_loss: float | None) -> list[dict[str, Any]]:
    """Every run of the candidate, with its base partner where it has one (confirm, replay); each
    run's objective against the target loss its trial was judged by."""
    rows = []
    for t in sorted(ts, key=lambda t: t.number):
        sp = _speedup(t)
        target_loss = sp.target_loss if sp is not None and math.isfinite(sp.target_loss) else default_loss
        base_runs = {r.seed: r for r in db.runs(partners[t.number].number)} if t.number in partners else {}
        for r in db.runs(t.number):
            row: dict[str, Any] = {"trial": t.number, "rung": t.fidelity, "runs": run_set(t), "seed": r.seed,
                                   "target_loss": target_loss,
                                   "status": r.status.value, "trusted": r.trusted, **_final(r), "objective": None,
                                   "base": None, "pair_gain": None, "guards": dict(r.guards)}
            if target_loss is not None and r.curve:
                o = judge.run_objective(kind, r.curve, target_loss)
                row["objective"] = o.value if o else None
                row["censored"] = bool(o and o.censored)
            b = base_runs.get(r.seed)
            if b is not None:
                row["base"] = {"trial": partners[t.number].number, "status": b.status.value, **_final(b),
                               "guards": dict(b.guards)}
                if target_loss is not None and b.curve and r.curve:
                    bo = judge.run_objective(kind, b.curve, target_loss)
                    row["base"]["objective"] = bo.value if bo else None
                    co = judge.run_objective(kind, r.curve, target_loss)
                    if co and bo:
                        g, _ = judge.gains(kind, [(co, bo)])
                        row["pair_gain"] = _factor(kind, g[0]) if g else None
            rows.append(row)
    return rows


def verdicts(db: RunsDB, ts: list[TrialRecord], partners: dict[int, TrialRecord]) -> list[dict[str, Any]]:
    """The statistics of every paired run set (confirm, each replay): the one speed-up, the paired
    test's p-value, the level the sequential test used, and the speedrun's own t-test."""
    out = []
    max_pairs = int(db.settings.get("max_seeds") or judge.MAX_PAIRS)
    selecting = {r.seed for t in ts if t.fidelity != "confirm" for r in db.runs(t.number)}
    for t in sorted(ts, key=lambda t: t.number):
        if t.number not in partners:
            continue
        sp = _speedup(t)
        if sp is None:
            continue
        paired = pair_up(db.runs(t.number), db.runs(partners[t.number].number), selecting)
        obs = paired.obs(sp.kind, sp.target_loss)
        g, _ = judge.gains(sp.kind, obs)
        p = judge.pvalue(g) if len(g) >= 2 else None
        alpha = t.attrs.get("alpha")
        level = judge.spent(len(obs), float(alpha), max_pairs) if isinstance(alpha, int | float) else None
        finals = [r.final.val_loss for r in paired.candidate if r.final]
        out.append({
            "trial": t.number, "base_trial": partners[t.number].number, "runs": run_set(t),
            "verdict": t.attrs.get("verdict") or ("replay: information, not a verdict" if t.proposer == Who.REPLAY
                                                  else None),
            "speedup_text": sp.text(), "speedup": sp.to_dict(), "pairs": len(obs), "lost": paired.lost,
            "untrusted": paired.untrusted, "pvalue": p, "alpha": alpha, "look_level": level or None,
            "fdr": t.attrs.get("fdr"), "target_loss": sp.target_loss,
            "mean_final_loss": sum(finals) / len(finals) if finals else None,
            "speedrun_pvalue": judge.speedrun_pvalue(finals, sp.target_loss),
            "guards": t.attrs.get("guards") or [],  # search_space/guard.py GuardCheck.to_dict()s
        })
    return out


def show_data(db: RunsDB, ref: str) -> dict[str, Any]:
    trials = db.trials()
    commit, asked = resolve(db, ref, trials)
    by_commit: dict[str, list[TrialRecord]] = {}
    for t in trials:
        by_commit.setdefault(t.commit, []).append(t)
    ts = [t for t in by_commit.get(commit, []) if t.commit == commit]
    partners = {int(t.attrs["pairs_for"]): t for t in trials
                if t.commit == db.base_commit and t.attrs.get("pairs_for") is not None}
    best = _best_trial(ts)
    sp = _speedup(best) if best else None
    kind = _budgeted(db, sp.kind if sp else _kind(db))
    target_loss = _target_loss(trials, db.base_commit)
    parent = db.history.parent(commit)
    message = db.message(commit)
    final = next((t.attrs.get("verdict") for t in sorted(ts, key=lambda t: -t.number)
                  if t.attrs.get("verdict") in (Verdict.PASS, Verdict.FAIL)), None)
    return {
        "dir": str(db.dir), "commit": commit, "asked": ref, "trial": asked, "base": db.base_commit, "parent": parent,
        "title": message.split("\n", 1)[0], "message": message, "proposer": ts[0].proposer if ts else "",
        "model": ts[0].model if ts else None, "trials": [t.number for t in ts], "objective_kind": kind,
        "target_loss": target_loss,
        "rung": best.fidelity if best else None, "verdict": final or (best.attrs.get("verdict") if best else None),
        "speedup_text": best.attrs.get("speedup_text") if best else "", "speedup_runs": run_set(best) if best else "",
        "lineage": lineage(db, commit, by_commit),
        "diff_base": db.diff(commit, db.base_commit), "diff_parent": db.diff(commit) if parent else "",
        "parent_is_base": parent == db.base_commit,
        "seeds": seeds_table(db, ts, partners, kind, target_loss),
        "statistics": verdicts(db, ts, partners),
        "cost": cost(ts, [partners[t.number] for t in ts if t.number in partners]),
        "failures": [{"trial": t.number, "rung": t.fidelity, "state": t.state, "reason": t.reason[:500]}
                     for t in sorted(ts, key=lambda t: t.number) if t.state in ("fail", "pruned") or
                     t.attrs.get("status") not in (None, "ok")],
    }


def cost(ts: list[TrialRecord], base_partners: list[TrialRecord]) -> dict[str, float]:
    """What the candidate cost: its proposal's LLM tokens and dollars, and the worker- and GPU-
    seconds recorded on its trials (and on base trials of its own, where they carry any)."""
    out = {"llm_input_tokens": 0.0, "llm_output_tokens": 0.0, "llm_dollars": 0.0, "worker_seconds": 0.0,
           "gpu_seconds": 0.0}
    for t, mine in [(t, True) for t in ts] + [(t, False) for t in base_partners]:
        for key in out:
            x = t.attrs.get(key)
            if isinstance(x, int | float) and math.isfinite(x) and (mine or not key.startswith("llm")):
                out[key] += x
    return out


def _budgeted(db: RunsDB, kind: str) -> str:
    """The search target's own objective where it is `kind`: it carries the budget the verdict read
    each run's loss at (search_space/budget.py), so the per-seed numbers are read there too."""
    try:
        from search_space.target import load_target

        own = load_target(db.settings.get("target", "tinygpt")).objective
    except Exception:  # the target file moved away: read at the run's end
        return kind
    return own if own == kind else kind


def _kind(db: RunsDB) -> str:
    from agent.report import objective_kind

    return objective_kind(db, db.trials()) or "time_to_target"


def _target_loss(trials: list[TrialRecord], base: str) -> float | None:
    """The search's target loss at `full` (where the loop fixed it), else at any rung."""
    for fid in ("full", "short"):
        for t in trials:
            tl = t.attrs.get("target_loss")
            if t.commit == base and t.fidelity == fid and isinstance(tl, int | float) and math.isfinite(tl):
                return float(tl)
    return None


def curve_runs(db: RunsDB, data: dict[str, Any]) -> tuple[list[RunResult], list[RunResult], str]:
    """The runs the plot and sparkline draw: the candidate's paired runs (confirm or the latest
    replay) and their base partners; else its highest single-seed rung against the base's runs
    there. The third item names the run set, briefly."""
    stats = data["statistics"]
    if stats:
        s = max(stats, key=lambda s: (s["verdict"] in (Verdict.PASS, Verdict.FAIL), s["trial"]))
        t = db.trial(s["trial"])
        what = f"{t.attrs.get('purpose') or 'replay'}'s" if t.proposer == Who.REPLAY else "confirm"
        return (db.runs(s["trial"]), db.runs(s["base_trial"]),
                f"{what} runs (trial {s['trial']}) beside the base's (trial {s['base_trial']})")
    ts = [db.trial(n) for n in data["trials"]]
    ts = [t for t in ts if t.fidelity in ("short", "full") and db.runs(t.number)]
    if not ts:
        return [], [], ""
    t = max(ts, key=lambda t: (LADDER.index(t.fidelity), t.number))
    return (db.runs(t.number), db.baseline(t.fidelity),
            f"one seed at {t.fidelity} (trial {t.number}), the base's runs there")
