"""`speedsearch show <trial|commit>`: one candidate for review in the terminal (or as JSON).

The data comes from agent/show.py; this module draws it: the lineage with each step's own gain,
the verdict's statistics, the seeds table, the loss curves (a PNG and a terminal sparkline)
against the base, and the diffs against the base and the parent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from agent.cli_io import app, emit, guard, out
from search_space.errors import UserError
from search_space.guard import GuardCheck
from search_space.records import RunResult

BARS = "▁▂▃▄▅▆▇█"
DIFFS = ("both", "base", "parent", "none")


def sparkline(values: list[float], low: float, high: float) -> str:
    span = high - low if high > low else 1.0
    return "".join(BARS[min(len(BARS) - 1, max(0, int((v - low) / span * (len(BARS) - 1) + 0.5)))]
                   if math.isfinite(v) else " " for v in values)


def curves(candidate: list[RunResult], base: list[RunResult], width: int = 60) -> dict[str, Any] | None:
    """Mean validation loss per step of the candidate's runs and of the base's, on one scale, and
    where the candidate's mean lies against the base's band (mean +- 2 standard deviations)."""
    def by_step(runs: list[RunResult]) -> dict[int, list[float]]:
        acc: dict[int, list[float]] = {}
        for r in runs:
            for p in r.curve:
                if math.isfinite(p.val_loss):
                    acc.setdefault(p.step, []).append(p.val_loss)
        return acc

    c, b = by_step(candidate), by_step(base)
    steps = sorted(set(c) & set(b))
    if len(steps) < 2:
        return None
    if len(steps) > width:
        steps = [steps[round(i * (len(steps) - 1) / (width - 1))] for i in range(width)]
    cm = [sum(c[s]) / len(c[s]) for s in steps]
    bm = [sum(b[s]) / len(b[s]) for s in steps]
    bs = [_sd(b[s]) for s in steps]
    # The first points dwarf the rest: the scale starts a tenth of the way in, as the PNG's does.
    skip = len(steps) // 10
    low, high = min(cm[skip:] + bm[skip:]), max(cm[skip:] + bm[skip:])
    marks = "".join("▼" if x < m - 2 * s else "▲" if x > m + 2 * s else "·" for x, m, s in zip(cm, bm, bs,
                                                                                             strict=True))
    return {"steps": steps, "candidate": cm, "base_mean": bm, "base_sd": bs,
            "candidate_line": sparkline(cm, low, high), "base_line": sparkline(bm, low, high), "band": marks,
            "low": low, "high": high}


def _sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _ms(ms: float | None) -> str:
    return "-" if ms is None else (f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms")


def _objective(kind: str, value: float | None, censored: bool = False) -> str:
    if value is None:
        return "-"
    if kind == "time_to_target":
        text = _ms(value)
    elif kind == "steps_to_target":
        text = f"{value:.0f} steps"
    else:
        text = f"loss {value:.4f}"
    return (">" + text) if censored else text


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def render(d: dict[str, Any], diff: str) -> None:
    from agent.report import short_title

    say = lambda text, **kw: out.print(text, markup=False, highlight=False, soft_wrap=True, **kw)  # noqa: E731
    say(f"candidate {d['commit'][:12]}: {d['title']}")
    say(f"proposer {d['proposer']}{' (' + d['model'] + ')' if d.get('model') else ''}; trials "
        f"{', '.join(map(str, d['trials'])) or 'none yet'}; highest rung {d['rung'] or '-'}; verdict "
        f"{d['verdict'] or '-'}")
    if d["speedup_text"]:
        say(f"speed-up: {d['speedup_text']}  ({d['speedup_runs']})")
    c = d.get("cost") or {}
    if c:
        llm = (f"LLM {c['llm_input_tokens']:.0f} tokens in, {c['llm_output_tokens']:.0f} out, ${c['llm_dollars']:.2f}; "
               if c["llm_input_tokens"] else "")
        say(f"cost: {llm}{c['worker_seconds']:.0f} worker-seconds ({c['gpu_seconds']:.0f} GPU-seconds) recorded on "
            "its trials")
    for f in d.get("failures", []):
        say(f"trial {f['trial']} at {f['rung']}: {f['state']}" + (f": {f['reason']}" if f["reason"] else ""))
    body = d["message"].split("\n", 1)[1] if "\n" in d["message"] else ""
    body = "\n".join(ln for ln in body.splitlines() if not ln.startswith(("Proposer: ", "Model: "))).strip()
    if body:
        say("\n" + body)

    n = len(d["lineage"])
    say(f"\nlineage from the base: {n} change{'s' if n != 1 else ''}, oldest first")
    for i, s in enumerate(d["lineage"], 1):
        gain = s["over_parent"] or {}
        factor = gain.get("factor")
        parent = "the base" if i == 1 else f"step {i - 1}"
        if factor is None:
            own = gain.get("text") or "never measured"
        elif d["objective_kind"] == "loss_at_budget":
            own = f"{factor:+.4f} loss vs its parent ({parent})"
        else:
            own = f"{factor:.2f}x over its parent ({parent})"
        say(f"  {i}. {s['commit'][:10]} {short_title(s['title'])}  [{s['proposer'] or '-'}, {s['rung'] or '-'}"
            f"{', ' + s['verdict'] if s['verdict'] else ''}]")
        say(f"     speed-up: {s['speedup_text'] or 'never measured'}  ({s['runs']})")
        say(f"     its own gain: {own}" + (f"  ({gain['runs']})" if i > 1 and gain.get("runs") else ""))

    for st in d["statistics"]:
        say(f"\nstatistics of {st['runs']}:")
        say(f"  {st['speedup_text']}; verdict: {st['verdict'] or '-'}")
        level = (f"; this look's level {st['look_level']:.3g} of the candidate's alpha {st['alpha']:.3g} "
                 f"({st['fdr']})") if st.get("look_level") else ""
        say(f"  paired one-sided t-test of the gain over {st['pairs']} pairs: p = {_p(st['pvalue'])}{level}")
        if st["mean_final_loss"] is not None:
            say(f"  speedrun rule: mean final loss {st['mean_final_loss']:.4f} < {st['target_loss']:.4f}: "
                f"p = {_p(st['speedrun_pvalue'])}")
        for g in st.get("guards") or []:
            say(f"  {GuardCheck.from_dict(g).text()}")
        if st["lost"] or st["untrusted"]:
            say(f"  {st['lost']} seed(s) without a usable pair; {st['untrusted']} untrusted run(s)")
    if not d["statistics"]:
        say("\nno paired runs yet (confirm or replay): the numbers above are single-seed screening, not a verdict")

    seeds = Table(title="\nseeds", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, show_edge=False,
                  padding=(0, 1, 0, 0))
    for col in ("trial", "rung", "seed", "loss", "to target", "base loss", "base to tgt", "pair"):
        seeds.add_column(col, no_wrap=True)
    kind = d["objective_kind"]
    for r in d["seeds"]:
        b = r["base"] or {}
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        if r["status"] != "ok":
            loss = r["status"]
        pair = "-"
        if r["pair_gain"] is not None:
            pair = f"{r['pair_gain']:+.4f}" if kind == "loss_at_budget" else f"{r['pair_gain']:.2f}x"
        seeds.add_row(str(r["trial"]), r["rung"], str(r["seed"]), loss,
                      _objective(kind, r["objective"], r.get("censored", False)),
                      f"{b['val_loss']:.4f}" if b.get("val_loss") is not None else "-",
                      _objective(kind, b.get("objective")), pair)
    out.print(seeds)
    for r in d["seeds"]:  # guard scores (search_space/guard.py), measured on the host for every run
        for name, v in (r.get("guards") or {}).items():
            base = ((r.get("base") or {}).get("guards") or {}).get(name)
            say(f"  trial {r['trial']} seed {r['seed']}: guard {name} {v:.4f}"
                + (f" (base {base:.4f})" if base is not None else ""))
    if kind != "loss_at_budget":
        say("loss: final validation loss; to target: time (or steps) to the loss its trial was judged at ('>': "
            "never reached it); pair: base / candidate for that seed")

    spark = d.get("sparkline")
    if spark:
        say(f"\nvalidation loss by step ({spark['runs']}), scale {spark['low']:.3f} to {spark['high']:.3f}:")
        say(f"  base      {spark['base_line']}")
        say(f"  candidate {spark['candidate_line']}")
        say(f"  vs band   {spark['band']}   (▼ below the base's mean-2sd, · inside, ▲ above)")
    if d.get("plot"):
        say(f"loss curves against the base's band: {d['plot']}")

    for which in ("base", "parent"):
        if diff not in (which, "both") or (which == "parent" and (d["parent_is_base"] or not d["diff_parent"])):
            continue
        text = d[f"diff_{which}"]
        say(f"\ndiff against the {which}" + (" (also its parent)" if which == "base" and d["parent_is_base"]
                                             else "") + ":")
        for line in text.splitlines():
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else \
                "cyan" if line.startswith("@@") else None
            out.print(Text(line, style=style or ""), soft_wrap=True)


@app.command()
def show(
    ref: str = typer.Argument(..., help="a candidate's commit (a prefix will do) or one of its trial numbers"),
    dir: Path = typer.Option(Path("searches/default"), "--dir", help="the search's folder"),
    diff: str = typer.Option("both", help="which diffs to print: both | base | parent | none"),
    plot: Path | None = typer.Option(None, help="where the PNG goes (default: the search's artifacts/show/)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """One candidate: lineage and each step's gain, diffs, seeds, verdict statistics, loss curves."""
    with guard(as_json):
        from agent.report import short_title
        from agent.show import curve_runs, show_data
        from runs_db.db import RunsDB

        if diff not in DIFFS:
            raise UserError(f"--diff {diff}: use one of {', '.join(DIFFS)}")
        if not (dir / "search.toml").is_file():
            raise UserError(f"--dir {dir}: holds no search (no search.toml)")
        with RunsDB.open(dir) as db:
            data = show_data(db, ref)
            cand, base, runs = curve_runs(db, data)
            spark = curves(cand, base)
            data["sparkline"] = {**spark, "runs": runs} if spark else None
            data["plot"] = None
            if cand:
                from runs_db.plots import plot_loss_curves

                path = plot or db.dir / "artifacts" / "show" / f"{data['commit'][:12]}.png"
                title = f"{data['commit'][:10]} {short_title(data['title'])}"[:58] + "\n" + runs[:61]
                data["plot"] = plot_loss_curves(cand, base, path, title=title, target_loss=data["target_loss"])
        emit(data, as_json, lambda d: render(d, diff))
