"""Export a winner: a record folder in the NanoGPT speedrun's format, a PR body, and a branch.

    <out_dir>/records/<YYYY-MM-DD>_<Name>/
        README.md           title, rationale, results, per-seed table, lineage, the diff
        pr.md               the pull request's body
        statistics.json     every number the README quotes
        candidate.patch     the change against the base trainer
        loss_curve.png      candidate against baseline
        trial-<n>-seed-<s>.txt, baseline/trial-<n>-seed-<s>.txt   the run logs

The t-test is the speedrun's rule: one-sided, mean val loss below the target, over independent
seeds. The timing ratio is candidate / baseline train time (geometric means), with a Welch 95%
confidence interval on the log scale; both sides must come from the same machine to mean much.
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

from env.stats import loss_pvalue
from env.stats import timing_ratio as stats_timing_ratio
from runs_db.db import RunsDB
from runs_db.plots import plot_loss_curves
from search_space.records import RunResult, Status
from search_space.target import FIDELITY_ORDER, Target

EXPORT_PREFIX = "export/"
PLOT_NAME = "loss_curve.png"


class ExportError(ValueError):
    """Nothing (or nothing sound) to export; the message says what is missing."""


def export(db: RunsDB, commit: str, out_dir: str | Path, name: str, target: Target,
           date: datetime.date | None = None) -> Path:
    """Write the record folder for `commit` under `out_dir`/records/ and branch `export/<name>`.

    Uses the successful runs of the commit's highest fidelity and the baseline's at the same
    fidelity. Returns the record folder; refuses to overwrite one that exists.
    """
    commit = db.resolve(commit)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "", name.replace(" ", "_")).strip("._-")
    if not name:
        raise ExportError("name: give a record name made of letters, digits, - or _")
    fidelity, runs = _candidate_runs(db, commit)
    baseline = db.baseline(fidelity)
    day = (date or datetime.date.today()).isoformat()
    folder = Path(out_dir) / "records" / f"{day}_{name}"
    if folder.exists():
        raise ExportError(f"{folder} already exists; pick another name or remove it")
    folder.mkdir(parents=True)

    target_loss = _target_loss(target, baseline)
    numbers = statistics(runs, baseline, target_loss)
    branch = db.create_branch(EXPORT_PREFIX + name, commit)
    message = db.message(commit).strip()
    title, _, rationale = message.partition("\n")
    rationale = _without_trailers(rationale.strip())
    facts = {"name": name, "date": day, "commit": commit, "branch": branch, "title": title,
             "target": target.name, "objective": target.objective, "fidelity": fidelity,
             "steps": target.fidelities[fidelity].steps if fidelity in target.fidelities else None,
             "repo": str(db.repo_path), **numbers}

    patch = db.diff(commit, against=db.base_commit)
    (folder / "candidate.patch").write_text(patch)
    logs = _copy_logs(runs, folder) + _copy_logs(baseline, folder / "baseline")
    plot = plot_loss_curves(runs, baseline, folder / PLOT_NAME, title=title, target_loss=target_loss)
    facts["files"] = {"patch": "candidate.patch", "plot": PLOT_NAME if plot else None, "logs": logs}
    (folder / "statistics.json").write_text(json.dumps(_finite(facts), indent=1) + "\n")
    lineage = _lineage(db, commit, fidelity)
    (folder / "README.md").write_text(_readme(facts, rationale, runs, baseline, lineage, patch, plot))
    (folder / "pr.md").write_text(_pr_body(facts, rationale, folder.name))
    return folder


# -- numbers -----------------------------------------------------------------------------------


def statistics(runs: list[RunResult], baseline: list[RunResult], target_loss: float | None) -> dict[str, Any]:
    """Mean/std of final loss and train time per side, the t-test p-value and the timing ratio."""
    out: dict[str, Any] = {"target_loss": target_loss}
    for side, rs in (("candidate", runs), ("baseline", baseline)):
        out[side] = {"seeds": [r.seed for r in rs], "val_loss": [r.final.val_loss for r in rs],
                     "train_ms": [r.final.train_ms for r in rs],
                     **_moments("val_loss", [r.final.val_loss for r in rs]),
                     **_moments("train_ms", [r.final.train_ms for r in rs])}
    losses = out["candidate"]["val_loss"]
    p = loss_pvalue(losses, target_loss) if target_loss is not None and len(losses) >= 2 else None
    out["p_value"] = p if p is not None and math.isfinite(p) else None
    out["timing_ratio"] = timing_ratio(out["candidate"]["train_ms"], out["baseline"]["train_ms"])
    return out


def timing_ratio(cand_ms: list[float], base_ms: list[float], level: float = 0.95) -> dict[str, Any] | None:
    """Candidate / baseline train time as a ratio of geometric means; Welch CI on log times
    (the record's runs were not interleaved pairs)."""
    cand, base = [x for x in cand_ms if x > 0], [x for x in base_ms if x > 0]
    if not cand or not base:
        return None
    r = stats_timing_ratio(cand, base, level, paired=False)
    both = len(cand) >= 2 and len(base) >= 2
    return {"estimate": r.ratio, "speedup": 1 / r.ratio, "ci_low": r.low if both else None,
            "ci_high": r.high if both else None, "level": level, "method": "Welch t on log train time"}


def _moments(key: str, xs: list[float]) -> dict[str, float | None]:
    return {f"mean_{key}": mean(xs) if xs else None, f"std_{key}": stdev(xs) if len(xs) >= 2 else None}


def _target_loss(target: Target, baseline: list[RunResult]) -> float | None:
    if isinstance(target.target_loss, (int, float)):
        return float(target.target_loss)
    return mean(r.final.val_loss for r in baseline) if baseline else None  # "baseline": its own mean


def _candidate_runs(db: RunsDB, commit: str) -> tuple[str, list[RunResult]]:
    by_fidelity: dict[str, list[RunResult]] = {}
    for t in db.trials():
        if t.commit == commit and t.state != "running":
            for r in db.runs(t.number):
                if r.status == Status.OK and r.final and math.isfinite(r.final.val_loss):
                    by_fidelity.setdefault(r.fidelity or t.fidelity, []).append(r)
    if not by_fidelity:
        raise ExportError(f"{commit[:12]}: no successful runs to export")
    rank = {f: i for i, f in enumerate(FIDELITY_ORDER)}
    fidelity = max(by_fidelity, key=lambda f: (rank.get(f, -1), len(by_fidelity[f])))
    return fidelity, by_fidelity[fidelity]


def _lineage(db: RunsDB, commit: str, fidelity: str) -> list[tuple[str, str, float | None]]:
    best: dict[str, float] = {}
    for t in db.trials():
        if t.state == "complete" and t.fidelity == fidelity and t.value is not None:
            best[t.commit] = min(t.value, best.get(t.commit, math.inf))
    return [(c, db.message(c).splitlines()[0], best.get(c)) for c in reversed(db.lineage(commit))]


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
    p = facts["p_value"]
    if facts["target_loss"] is None:
        return "No target loss (no baseline runs): the loss rule cannot be checked."
    rule = f"One-sided t-test, mean val loss < {facts['target_loss']:.4f}"
    n = len(facts["candidate"]["val_loss"])
    if p is None:
        return f"{rule}: needs at least 2 seeds with spread (have {n})."
    ok = "meets" if p < 0.01 else "does NOT meet"
    return f"{rule}: p = {p:.3g} over {n} seeds ({ok} the p < 0.01 rule)."


def _timing_line(facts: dict[str, Any]) -> str:
    tr = facts["timing_ratio"]
    if tr is None:
        return "Timing ratio: n/a (no baseline runs at this fidelity)."
    ci = (f", {int(tr['level'] * 100)}% CI [{tr['ci_low']:.3f}, {tr['ci_high']:.3f}]"
          if tr["ci_low"] is not None else " (CI needs 2+ runs per side)")
    return (f"Timing ratio (candidate / baseline train time): {tr['estimate']:.3f}{ci}; "
            f"speedup {tr['speedup']:.3f}x.")


def _summary_table(facts: dict[str, Any]) -> str:
    rows = ["| | runs | mean val loss | std | mean train time (ms) | std |", "|---|---|---|---|---|---|"]
    for side in ("candidate", "baseline"):
        s = facts[side]
        rows.append(f"| {side} | {len(s['seeds'])} | {_fmt(s['mean_val_loss'])} | {_fmt(s['std_val_loss'])} | "
                    f"{_fmt(s['mean_train_ms'], '.0f')} | {_fmt(s['std_train_ms'], '.0f')} |")
    return "\n".join(rows)


def _readme(facts: dict[str, Any], rationale: str, runs: list[RunResult], baseline: list[RunResult],
            lineage: list[tuple[str, str, float | None]], patch: str, plot: Path | None) -> str:
    seeds = ["| side | trial | seed | final val loss | train time (ms) | steps |", "|---|---|---|---|---|---|"]
    for side, rs in (("candidate", runs), ("baseline", baseline)):
        for r in rs:
            seeds.append(f"| {side} | {r.provenance.get('trial', '')} | {r.seed} | {r.final.val_loss:.4f} | "
                         f"{r.final.train_ms:.0f} | {r.final.step} |")
    chain = "\n".join(f"{i}. `{c[:12]}` {t}" + (f" (objective {v:.6g})" if v is not None else "")
                      for i, (c, t, v) in enumerate(lineage))
    parts = [
        f"# {facts['title']}", "", rationale or "(no rationale recorded)", "",
        f"- Commit: `{facts['commit']}` (branch `{facts['branch']}` in `{facts['repo']}`)",
        f"- Target: {facts['target']}; objective {facts['objective']}; fidelity {facts['fidelity']}"
        + (f" ({facts['steps']} steps)" if facts["steps"] else ""),
        f"- Exported: {facts['date']} by speedsearch", "",
        "## Results", "", _summary_table(facts), "", _verdict(facts), "", _timing_line(facts), "",
        "Timings are only comparable when the baseline ran on the same machine as the candidate.", "",
    ]
    if plot:
        parts += [f"![validation loss, candidate vs baseline]({PLOT_NAME})", ""]
    parts += ["### Per-seed runs", "", *seeds, "", "## Lineage (from the base)", "", chain, "",
              "## Change (against the base trainer)", "", "```diff", patch.rstrip("\n"), "```", ""]
    return "\n".join(parts)


def _pr_body(facts: dict[str, Any], rationale: str, folder: str) -> str:
    return "\n".join([
        f"## {facts['title']}", "", rationale or "(no rationale recorded)", "",
        "### Results", "", _summary_table(facts), "", f"- {_verdict(facts)}", f"- {_timing_line(facts)}",
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
