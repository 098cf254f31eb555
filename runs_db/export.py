"""Export a winner: a record folder in the NanoGPT speedrun's format, a PR body, and a branch.

    <out_dir>/records/<YYYY-MM-DD>_<Name>/
        README.md           title, rationale, results, per-seed table, lineage, the diff
        pr.md               the pull request's body
        statistics.json     every number the README quotes
        candidate.patch     the change against the base trainer
        loss_curve.png      candidate against baseline
        trial-<n>-seed-<s>.txt, baseline/trial-<n>-seed-<s>.txt   the run logs

The headline is the one speed-up (`search_space.judge.Speedup`, the same words as the search,
`status` and `replay` print), over the pairs recorded for the commit: confirm's and replay's fresh
seeds, each beside a base run with the same seed on the same node. The runs that selected the
candidate (its single-seed rungs) are never pooled in. The speedrun's own rule, a one-sided t-test
of mean final loss below the target (p < 0.01), is kept as an extra line for the record.
Untrusted runs (claimed, not recomputed, losses) are refused unless `allow_untrusted`.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import shutil
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from runs_db.db import RunsDB
from runs_db.pairs import Paired, budget_words, paired_runs, search_target_loss
from runs_db.plots import plot_loss_curves
from search_space import judge
from search_space.records import RunResult
from search_space.target import Target

EXPORT_PREFIX = "export/"
PLOT_NAME = "loss_curve.png"


class ExportError(ValueError):
    """Nothing (or nothing sound) to export; the message says what is missing."""


def export(db: RunsDB, commit: str, out_dir: str | Path, name: str, target: Target,
           date: datetime.date | None = None, allow_untrusted: bool = False) -> Path:
    """Write the record folder for `commit` under `out_dir`/records/ and branch `export/<name>`.

    Uses the commit's paired runs (confirm, replay) and their base partners. Returns the record
    folder; refuses to overwrite one that exists.
    """
    commit = db.resolve(commit)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "", name.replace(" ", "_")).strip("._-")
    if not name:
        raise ExportError("name: give a record name made of letters, digits, - or _")
    paired = paired_runs(db, commit)
    if not paired.candidate:
        raise ExportError(f"{commit[:12]}: no runs paired with the base (confirm or replay); run "
                          f"`speedsearch replay --commit {commit[:12]}` first")
    if paired.untrusted and not allow_untrusted:
        raise ExportError(f"{commit[:12]}: {paired.untrusted} of the paired runs are untrusted (claimed losses); "
                          "pass --allow-untrusted to export them anyway")
    fidelity = paired.candidate[0].fidelity or "full"
    day = (date or datetime.date.today()).isoformat()
    folder = Path(out_dir) / "records" / f"{day}_{name}"
    if folder.exists():
        raise ExportError(f"{folder} already exists; pick another name or remove it")

    target_loss = search_target_loss(db, target, fidelity)
    if target_loss is None:
        raise ExportError("no target loss: the search has no baseline at this fidelity")
    numbers = statistics(paired, target.objective, target_loss, budget_words(target, fidelity))
    numbers["confirmation"] = _confirmation(db, commit)
    folder.mkdir(parents=True)
    branch = db.create_branch(EXPORT_PREFIX + name, commit)
    message = db.message(commit).strip()
    title, _, rationale = message.partition("\n")
    rationale = _without_trailers(rationale.strip())
    facts = {"name": name, "date": day, "commit": commit, "branch": branch, "title": title,
             "target": target.name, "objective": target.objective, "fidelity": fidelity,
             "steps": target.fidelities[fidelity].steps if fidelity in target.fidelities else None,
             "repo": str(db.repo_path), **numbers}
    runs, baseline = paired.candidate, paired.base
    patch = db.diff(commit, against=db.base_commit)
    (folder / "candidate.patch").write_text(patch)
    logs = _copy_logs(runs, folder) + _copy_logs(baseline, folder / "baseline")
    plot = plot_loss_curves(runs, baseline, folder / PLOT_NAME, title=f"{title}: {facts['speedup_text']}",
                            target_loss=target_loss)
    facts["files"] = {"patch": "candidate.patch", "plot": PLOT_NAME if plot else None, "logs": logs}
    (folder / "statistics.json").write_text(json.dumps(_finite(facts), indent=1) + "\n")
    lineage = _lineage(db, commit)
    (folder / "README.md").write_text(_readme(facts, rationale, runs, baseline, lineage, patch, plot))
    (folder / "pr.md").write_text(_pr_body(facts, rationale, folder.name))
    return folder


# -- numbers -----------------------------------------------------------------------------------


def statistics(paired: Paired, kind: str, target_loss: float, budget: str = "") -> dict[str, Any]:
    """The speed-up over the pairs, each pair's objectives, per-side moments and the speedrun's t-test."""
    obs = paired.obs(kind, target_loss)
    sp = judge.speedup(kind, target_loss, obs, budget=budget)
    gains, _ = judge.gains(kind, obs)
    out: dict[str, Any] = {"target_loss": target_loss, "speedup_text": sp.text(), "speedup": sp.to_dict(),
                           "paired_pvalue": judge.pvalue(gains) if len(gains) >= 2 else None,
                           "lost_pairs": paired.lost, "untrusted_runs": paired.untrusted,
                           "pairs": [{"seed": c.seed, "candidate": co.value, "candidate_censored": co.censored,
                                      "baseline": bo.value, "baseline_censored": bo.censored}
                                     for c, (co, bo) in zip(paired.candidate, obs, strict=False)]}
    for side, rs in (("candidate", paired.candidate), ("baseline", paired.base)):
        out[side] = {"seeds": [r.seed for r in rs], "val_loss": [r.final.val_loss for r in rs],
                     "train_ms": [r.final.train_ms for r in rs],
                     **_moments("val_loss", [r.final.val_loss for r in rs]),
                     **_moments("train_ms", [r.final.train_ms for r in rs])}
    out["p_value"] = judge.speedrun_pvalue(out["candidate"]["val_loss"], target_loss)
    return out


def _confirmation(db: RunsDB, commit: str) -> dict[str, Any] | None:
    """The search's own verdict on the commit (its latest confirm trial), if it confirmed it at all."""
    for t in sorted(db.trials(), key=lambda t: -t.number):
        if t.commit == commit and t.fidelity == "confirm" and t.attrs.get("verdict"):
            return {"trial": t.number, "verdict": t.attrs.get("verdict"), "alpha": t.attrs.get("alpha"),
                    "guarantee": t.attrs.get("fdr"), "speedup_text": t.attrs.get("speedup_text")}
    return None


def _moments(key: str, xs: list[float]) -> dict[str, float | None]:
    return {f"mean_{key}": mean(xs) if xs else None, f"std_{key}": stdev(xs) if len(xs) >= 2 else None}


def _lineage(db: RunsDB, commit: str) -> list[tuple[str, str, str]]:
    """Each ancestor from the base, with the speed-up text of its highest measured rung."""
    rank = {"smoke": 0, "short": 1, "full": 2, "confirm": 3}
    best: dict[str, tuple[int, str]] = {}
    for t in db.trials():
        text = t.attrs.get("speedup_text")
        if t.state == "complete" and text and rank.get(t.fidelity, -1) >= best.get(t.commit, (-1, ""))[0]:
            best[t.commit] = (rank.get(t.fidelity, -1), f"{t.fidelity}: {text}")
    return [(c, db.message(c).splitlines()[0], best.get(c, (0, ""))[1]) for c in reversed(db.lineage(commit))]


def _copy_logs(runs: list[RunResult], folder: Path) -> list[str]:
    names = []
    for r in runs:
        src = Path(r.log)
        if r.log and src.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            dst = folder / f"trial-{r.provenance.get('trial')}-seed-{r.seed}.txt"
            shutil.copyfile(src, dst)
            names.append(dst.relative_to(folder.parent if folder.name == "baseline" else folder).as_posix())
    return names


# -- text --------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _verdict(facts: dict[str, Any]) -> str:
    """The speedrun's rule, kept for the record."""
    p, n = facts["p_value"], len(facts["candidate"]["val_loss"])
    rule = f"Speedrun rule, one-sided t-test of mean val loss < {facts['target_loss']:.4f}"
    if p is None:
        return f"{rule}: needs at least 2 seeds (have {n})."
    ok = "meets" if p < 0.01 else "does NOT meet"
    return f"{rule}: p = {p:.3g} over {n} seeds ({ok} the p < 0.01 rule)."


def _headline(facts: dict[str, Any]) -> str:
    c = facts.get("confirmation")
    how = (f"the search's verdict: {c['verdict']} at alpha {c['alpha']:.3g} ({c['guarantee']})"
           if c and isinstance(c.get("alpha"), int | float) else "not confirmed by the search (replay only)")
    return f"**Speed-up: {facts['speedup_text']}** ({how})."


def _summary_table(facts: dict[str, Any]) -> str:
    rows = ["| | runs | mean val loss | std | mean train time (ms) | std |", "|---|---|---|---|---|---|"]
    for side in ("candidate", "baseline"):
        s = facts[side]
        rows.append(f"| {side} | {len(s['seeds'])} | {_fmt(s['mean_val_loss'])} | {_fmt(s['std_val_loss'])} | "
                    f"{_fmt(s['mean_train_ms'], '.0f')} | {_fmt(s['std_train_ms'], '.0f')} |")
    return "\n".join(rows)


def _method(kind: str) -> str:
    what = ("the candidate's final loss minus the base's, a mean over the pairs" if kind == "loss_at_budget" else
            "the base's objective over the candidate's, a geometric mean over the pairs")
    return ("Each candidate run is paired with a base run of the same seed on the same machine, run beside it. "
            f"The speed-up is {what}, with its 95% interval; a seed that never reached the target loss is "
            "censored ('> value': its crossing lies past its last point).")


def _obs(value: float, censored: bool) -> str:
    return ("> " if censored else "") + _fmt(value, ".6g")


def _readme(facts: dict[str, Any], rationale: str, runs: list[RunResult], baseline: list[RunResult],
            lineage: list[tuple[str, str, str]], patch: str, plot: Path | None) -> str:
    seeds = ["| seed | candidate val loss | candidate ms | base val loss | base ms | objective (cand / base) |",
             "|---|---|---|---|---|---|"]
    for c, b, p in zip(runs, baseline, facts["pairs"], strict=False):
        seeds.append(f"| {c.seed} | {c.final.val_loss:.4f} | {c.final.train_ms:.0f} | {b.final.val_loss:.4f} | "
                     f"{b.final.train_ms:.0f} | {_obs(p['candidate'], p['candidate_censored'])} / "
                     f"{_obs(p['baseline'], p['baseline_censored'])} |")
    chain = "\n".join(f"{i}. `{c[:12]}` {t}" + (f" ({v})" if v else "") for i, (c, t, v) in enumerate(lineage))
    parts = [
        f"# {facts['title']}", "", rationale or "(no rationale recorded)", "",
        f"- Commit: `{facts['commit']}` (branch `{facts['branch']}` in `{facts['repo']}`)",
        f"- Target: {facts['target']}; objective {facts['objective']}; fidelity {facts['fidelity']}"
        + (f" ({facts['steps']} steps)" if facts["steps"] else ""),
        f"- Exported: {facts['date']} by speedsearch", "",
        "## Results", "", _headline(facts), "", _summary_table(facts), "", _verdict(facts), "",
        _method(facts["objective"]), "",
    ]
    if plot:
        parts += [f"![validation loss, candidate vs baseline]({PLOT_NAME})", ""]
    parts += ["### Pairs", "", *seeds, "", "## Lineage (from the base)", "", chain, "",
              "## Change (against the base trainer)", "", "```diff", patch.rstrip("\n"), "```", ""]
    return "\n".join(parts)


def _pr_body(facts: dict[str, Any], rationale: str, folder: str) -> str:
    return "\n".join([
        f"## {facts['title']}", "", rationale or "(no rationale recorded)", "",
        "### Results", "", _headline(facts), "", _summary_table(facts), "", f"- {_verdict(facts)}",
        f"- Record: `records/{folder}/` (logs, statistics.json, {PLOT_NAME}, candidate.patch)", "",
        f"Found by speedsearch (commit `{facts['commit'][:12]}`, fidelity {facts['fidelity']}).", "",
    ])


def _without_trailers(text: str) -> str:
    lines = text.splitlines()
    while lines and (re.match(r"^(Proposer|Model): ", lines[-1]) or not lines[-1].strip()):
        lines.pop()
    return "\n".join(lines).strip()


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
