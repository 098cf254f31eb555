"""The words of a record folder: README, PR body, and each run's log in the speedrun's format.

Pure functions of the facts `runs_db.export` gathered. Nothing here names a local path: a record
is read on someone else's machine, so logs are scrubbed of the folders they ran in.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from search_space.records import RunResult

RULE = "=" * 100  # the speedrun's separator between the source, the environment and the log
PLOT_NAME, ABLATION_PLOT = "loss_curve.png", "ablation.png"
_TAIL = r"(?:/[^\s'\":,;)\]]*)*"
_ABS_PATH = re.compile(r"(?<![\w.])/(?:home|root|tmp|Users|var|work|mnt|data|scratch|opt|srv)(?:/[^\s'\":,;)\]]+)+")


def scrub(text: str, roots: list[str]) -> str:
    """`text` with every local path written `<path>`: any path under the given roots (longest first),
    then any absolute path under a usual top folder."""
    for root in sorted({r.rstrip("/") for r in roots if r and r.strip("/")}, key=len, reverse=True):
        text = re.sub(re.escape(root) + _TAIL, "<path>", text)
    return _ABS_PATH.sub("<path>", text)


def environment(runs: list[RunResult]) -> dict[str, str]:
    """Hardware and software the runs reported, as shown in a record (no host name, no ids)."""
    prov = next((r.provenance for r in runs if r.provenance), {})
    gpus = [", ".join(g.split(",")[1:2]).strip() for g in prov.get("gpus_on_host", []) if "," in g]
    out = {"platform": prov.get("platform", ""), "python": prov.get("python", ""), "torch": prov.get("torch", ""),
           "cuda": prov.get("cuda", ""), "cpu": prov.get("cpu", ""),
           "gpu": prov.get("gpu_model", "") or (f"{len(gpus)} x {gpus[0]}" if gpus else "none")}
    return {k: v for k, v in out.items() if v}


def run_log(sources: dict[str, str], env: dict[str, str], log_text: str, roots: list[str]) -> str:
    """One run's log as the speedrun writes it: the full source of the trainer as it ran, the
    environment, then the log itself."""
    if len(sources) == 1:
        code = next(iter(sources.values()))
    else:
        code = "\n".join(f"# ==== {path} ====\n{text}" for path, text in sorted(sources.items()))
    head = "\n".join(f"{k}: {v}" for k, v in env.items())
    return f"{code.rstrip()}\n{RULE}\n{head}\n{RULE}\n{scrub(log_text, roots).rstrip()}\n"


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or not isinstance(x, int | float) or not math.isfinite(x) else format(x, spec)


def _share(x: Any) -> str:
    return "n/a" if not isinstance(x, int | float) else f"{x:.0%}"


def _loss_rule(f: dict[str, Any]) -> str:
    p, n = f["p_value"], len(f["candidate"]["val_loss"])
    rule = f"one-sided t-test of mean final val loss < {f['target_loss']:.4f}"
    if p is None:
        return f"Speedrun rule ({rule}): needs at least 2 seeds (have {n})."
    ok = "meets" if p < 0.01 else "does NOT meet"
    return f"Speedrun rule ({rule}): p = {p:.3g} over {n} seeds ({ok} p < 0.01)."


def headline(f: dict[str, Any]) -> str:
    return (f"**Speed-up: {f['speedup_text']}**, measured by replay ({f['replay_purposes']}): fresh seeds "
            "never used to select the candidate, each run beside a base run of the same seed on the same machine.")


def summary_table(f: dict[str, Any]) -> str:
    rows = ["| | runs | mean val loss | std | mean train time (ms) | std |", "|---|---|---|---|---|---|"]
    for side in ("candidate", "baseline"):
        s = f[side]
        rows.append(f"| {side} | {len(s['seeds'])} | {fmt(s['mean_val_loss'])} | {fmt(s['std_val_loss'])} | "
                    f"{fmt(s['mean_train_ms'], '.0f')} | {fmt(s['std_train_ms'], '.0f')} |")
    return "\n".join(rows)


def _pairs_table(f: dict[str, Any]) -> list[str]:
    out = ["| seed | candidate val loss | candidate ms | base val loss | base ms |", "|---|---|---|---|---|"]
    c, b = f["candidate"], f["baseline"]
    for i, seed in enumerate(c["seeds"]):
        out.append(f"| {seed} | {fmt(c['val_loss'][i])} | {fmt(c['train_ms'][i], '.0f')} | {fmt(b['val_loss'][i])} | "
                   f"{fmt(b['train_ms'][i], '.0f')} |")
    return out


def _ablation(ab: dict[str, Any] | None) -> list[str]:
    if not ab:
        return ["## Ablations", "",
                "Not run (`speedsearch replay --ablate --commit ...` measures each change's share).", ""]
    by = {v["label"]: v for v in ab["variants"]}
    rows = ["| change | alone on the base | without it | carries |", "|---|---|---|---|"]
    for c in ab["changes"]:
        alone, without = by.get(f"alone-{c['number']}", {}), by.get(f"without-{c['number']}", {})
        rows.append(f"| {c['number']}. {c['title']} | {alone.get('speedup_text', '')} | "
                    f"{without.get('speedup_text', '')} | {_share(c.get('share'))} |")
    shares = [c.get("share") for c in ab["changes"]]
    rest = (f" Interactions carry the rest: {1 - sum(shares):.0%}." if all(isinstance(s, int | float) for s in shares)
            else "")
    return ["## Ablations", "",
            f"{ab['purpose']}: every variant on the same {ab['seeds']} fresh seeds, beside the base. "
            f"All changes together: {by['all']['speedup_text']}. A change carries what leaving it out costs, as a "
            f"share of the full gain.{rest}", "", *rows, "", f"![each change's share]({ABLATION_PLOT})", ""]


def _record(rec: dict[str, Any] | None) -> list[str]:
    if not rec:
        return []
    rows = ["| steps | seeds | mean final loss | p (mean < target) |", "|---|---|---|---|"]
    for lv in rec["levels"]:
        losses = [r["candidate"]["val_loss"] for r in lv["runs"] if r["candidate"]["val_loss"] is not None]
        mean = sum(losses) / len(losses) if losses else None
        rows.append(f"| {lv['steps']} | {len(losses)} | {fmt(mean)} | {fmt(lv['loss_pvalue'], '.3g')} |")
    best = rec.get("record")
    verdict = (f"The fewest steps that keep the mean final loss at or below {rec['target_loss']:.4f} with p < 0.01: "
               f"**{rec['steps']}** (the base runs {rec['base_steps']}). Record time there, against the base at its "
               f"own count on the same machine: **{best['speedup_text']}**." if best else
               f"The candidate misses {rec['target_loss']:.4f} at its full {rec['base_steps']} steps: no record.")
    return ["## Record", "", verdict, "", *rows, ""]


def _rules(f: dict[str, Any]) -> list[str]:
    """The track's evaluation rules the runs were held to (search_space/track_rules.py), when declared."""
    if not f.get("rules"):
        return []
    return ["## Evaluation rules", "", "Every run above was held to these by the trusted evaluator:", "",
            f["rules"], ""]


def readme(f: dict[str, Any], changes: list[dict[str, str]], ab: dict[str, Any] | None, rec: dict[str, Any] | None,
           patch: str, logs: list[str]) -> str:
    env = "\n".join(f"- {k}: {v}" for k, v in f["environment"].items())
    what = []
    for i, c in enumerate(changes, 1):
        what += [f"### {i}. {c['title']}", "", c["rationale"] or "(no rationale recorded)", ""]
    losses = ", ".join(fmt(x) for x in f["candidate"]["val_loss"])
    parts = [f"# {f['name']}: {f['title']}", "",
             f"Target: {f['target']}; objective {f['objective']} at {f['steps']} steps. Exported {f['date']} by "
             "speedsearch.", "",
             "## What changed and why", "", *what,
             "## Results", "", headline(f), "", f"- Final val losses (candidate): {losses}",
             f"- {_loss_rule(f)}", f"- Timing against the base, same machine: {f['speedup_text']} (95% interval; "
             f"paired one-sided p = {fmt(f['paired_pvalue'], '.3g')})", f"- {f['confirmation_words']}", "",
             summary_table(f), "", f"![validation loss, candidate vs base]({PLOT_NAME})", "",
             "### Pairs", "", *_pairs_table(f), "",
             *_ablation(ab), *_record(rec), *_rules(f),
             "## Hardware and software", "", env, "",
             "## Logs", "", "One per run, each starting with the full source of the trainer as it ran:", "",
             *[f"- [{name}]({name})" for name in logs], "",
             "## Change (against the base trainer)", "", "```diff", patch.rstrip("\n"), "```", ""]
    return "\n".join(parts)


def pr_body(f: dict[str, Any], changes: list[dict[str, str]], ab: dict[str, Any] | None, rec: dict[str, Any] | None,
            folder: str) -> str:
    shares = {c["number"]: c.get("share") for c in (ab or {}).get("changes", [])}
    items = [f"- {c['title']}" + (f" (carries {_share(shares.get(i))} of the gain)" if i in shares else "")
             for i, c in enumerate(changes, 1)]
    out = [f"## {f['name']}: {f['title']}", "", *items, "", headline(f), "", summary_table(f), "", f"- {_loss_rule(f)}"]
    if rec and rec.get("record"):
        out.append(f"- Record: {rec['steps']} steps (base {rec['base_steps']}), record time "
                   f"{rec['record']['speedup_text']}")
    out += [f"- Environment: {', '.join(f'{k} {v}' for k, v in f['environment'].items())}",
            f"- Record folder: `{folder}` (README, logs, plots, statistics.json)", ""]
    return "\n".join(out)


def rationale(message: str) -> tuple[str, str]:
    """A commit message's title and body, without speedsearch's trailers."""
    title, _, body = message.strip().partition("\n")
    lines = body.strip().splitlines()
    while lines and (re.match(r"^(Proposer|Model): ", lines[-1]) or not lines[-1].strip()):
        lines.pop()
    return title.strip(), "\n".join(lines).strip()


def log_name(side: str, r: RunResult) -> str:
    return f"{side}/seed-{r.seed}.txt"


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
