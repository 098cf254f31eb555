"""The `speedsearch` command: a thin layer over agent/ and env/."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from agent.cli_io import app, console, emit, guard, out
from search_space.errors import UserError
from search_space.target import Target, cache_dir, load_target
from search_space.targets import BUILTINS


def _target(spec: str) -> Target:
    """The target named by `--target`; a bad one raises TargetError, which `guard` prints as one line."""
    return load_target(spec)


@app.command()
def targets(as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """List the built-in targets."""
    with guard(as_json):
        rows = []
        for name in BUILTINS:
            t = load_target(name)
            rows.append({"name": name, "objective": t.objective, "full_steps": t.steps("full"),
                         "gpus": t.resources.gpus, "description": t.description})

        def render(data: dict) -> None:
            table = Table("name", "objective", "full steps", "gpus", "description")
            for r in data["targets"]:
                table.add_row(r["name"], r["objective"], str(r["full_steps"]), str(r["gpus"]), r["description"])
            out.print(table)
        emit({"targets": rows}, as_json, render)


@app.command()
def evaluate(
    target: str = typer.Option("tinygpt", help="a built-in target's name or a target.toml"),
    patch: Path | None = typer.Option(None, help="SEARCH/REPLACE blocks or a diff"),
    seed: int = typer.Option(0),
    fidelity: str = typer.Option("full", help="smoke | short | full"),
    sandbox: str = typer.Option("process", help="process | docker"),
    gpus: int | None = typer.Option(None, help="GPUs for the run, overriding the target's ({nproc} follows)"),
    run_root: Path | None = typer.Option(None, help="where run folders go (default: the cache)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Run one candidate once and report what happened."""
    with guard(as_json):
        from dataclasses import replace

        from agent.settings import SANDBOXES

        t = _target(target)
        if sandbox not in SANDBOXES:
            raise UserError(f"--sandbox {sandbox}: use {' or '.join(SANDBOXES)}")
        if fidelity not in t.fidelities:
            raise UserError(f"--fidelity {fidelity}: target {t.name} has {', '.join(t.fidelities)}")
        if gpus is not None and gpus < 0:
            raise UserError(f"--gpus {gpus}: must be 0 or more")
        if patch is not None and not patch.is_file():
            raise UserError(f"--patch {patch}: no such file")
        if seed < 0:
            raise UserError(f"--seed {seed}: must be 0 or more")
        if gpus is not None:
            t = replace(t, resources=replace(t.resources, gpus=gpus))
        from env.evaluate import RunSpec, make_sandbox
        from env.evaluate import evaluate as run_one
        from env.gpus import local_gpu_ids

        try:
            gpu_ids = local_gpu_ids(t.resources.gpus)
        except ValueError as e:
            raise UserError(f"--gpus {t.resources.gpus}: {e}") from None
        if sandbox == "docker":
            from agent.runner import check_access
            from agent.settings import SearchSettings

            check_access(SearchSettings(target=target, sandbox="docker"))
        spec = RunSpec(t, seed=seed, fidelity=fidelity, patch=patch.read_text() if patch else None, gpu_ids=gpu_ids)
        with console.status(f"running {t.name} seed {seed} at {fidelity} ({t.steps(fidelity)} steps)"):
            result = run_one(spec, make_sandbox(sandbox, t), run_root or cache_dir() / "runs")

        def render(data: dict) -> None:
            table = Table("status", "val_loss", "train time", "steps", "wall", "log", title=f"{t.name} @ {fidelity}")
            final = data["final"] or {}
            loss = final.get("val_loss")
            table.add_row(data["status"], f"{loss:.4f}" if loss is not None else "-",
                          f"{final.get('train_ms', 0) / 1000:.2f} s", str(final.get("steps", 0)),
                          f"{data['wall_s']:.1f} s", data["log"])
            out.print(table)
            if data["reason"]:
                out.print(f"reason: {data['reason']}", markup=False, highlight=False)
        emit(result.to_dict(), as_json, render)


def _split(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _given(ctx: typer.Context, names: list[str]) -> list[str]:
    """The options the user typed (or set through the environment), not left at their defaults."""
    from typer._click.core import ParameterSource

    return [n for n in names if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE,
                                                                 ParameterSource.ENVIRONMENT)]


@app.command()
def launch(
    ctx: typer.Context,
    dir: Path = typer.Option(Path("searches/default"), "--dir", help="the search's folder"),
    target: str = typer.Option("tinygpt", help="a built-in target's name or a target.toml"),
    proposers: str = typer.Option("ideas,knobs", help="comma-separated: ideas, knobs, llm"),
    workers: int = typer.Option(0, help="runs at once (0: as many as the cluster fits)"),
    budget_trials: int = typer.Option(0, help="stop after this many candidate trials (0: no limit; with "
                                      "--resume, this many more)"),
    budget_minutes: float = typer.Option(0.0, help="stop after this many minutes (0: no limit)"),
    budget_gpu_hours: float = typer.Option(0.0, help="stop after this many GPU-hours (0: no limit)"),
    budget_dollars: float = typer.Option(0.0, help="stop after this many LLM dollars (0: no limit)"),
    seeds: int = typer.Option(3, help="baseline seeds per fidelity and first confirm batch"),
    max_fidelity: str = typer.Option("confirm", help="smoke | short | full | confirm"),
    storage: str = typer.Option("", help="Optuna storage URL (default: sqlite in the search folder)"),
    ray_address: str = typer.Option("", help="a Ray cluster's address (default: a local cluster)"),
    sandbox: str = typer.Option("process", help="process | docker"),
    models: str = typer.Option("claude-sonnet-4-6", help="LLM model, or model:weight,model:weight"),
    seed: int = typer.Option(0, help="the policy's random seed"),
    drain_minutes: float = typer.Option(4.0, help="after --budget-minutes, let confirmations under way finish "
                                        "for up to this many minutes"),
    fdr: float = typer.Option(0.05, help="false discovery rate the confirmations are held to (LORD++)"),
    allow_untrusted: bool = typer.Option(False, "--allow-untrusted",
                                         help="confirm candidates of a target without a trusted evaluator"),
    resume: bool = typer.Option(False, help="continue the search in --dir; budgets and --workers given "
                                "again replace the saved ones (budgets count from the resume)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
) -> None:
    """Run an autonomous search: propose, evaluate on the Ray pool, record, learn, repeat."""
    with guard(as_json):
        from agent.preflight import check_access
        from agent.settings import SearchSettings

        values = {"target": target, "proposers": _split(proposers), "workers": workers,
                  "budget_trials": budget_trials, "budget_minutes": budget_minutes,
                  "budget_gpu_hours": budget_gpu_hours, "budget_dollars": budget_dollars, "seeds": seeds,
                  "max_fidelity": max_fidelity, "storage": storage, "ray_address": ray_address, "sandbox": sandbox,
                  "models": models, "seed": seed, "fdr": fdr, "allow_untrusted": allow_untrusted,
                  "drain_minutes": drain_minutes}
        # Refusals first, before Ray and the rest load (seconds): the options, the target, access.
        fresh = None if resume else SearchSettings(**values)
        if fresh is None:
            SearchSettings(**{**values, "target": "tinygpt"})  # the options alone are valid (one line if not)
        else:
            _target(fresh.target)
            check_access(fresh)
        from agent.runner import discard_new_search, open_search, run_search

        if fresh is None:
            changes = {k: values[k] for k in _given(ctx, list(values))}
            if "target" in changes and changes["target"] not in BUILTINS:
                changes["target"] = str(Path(changes["target"]).resolve())
            db, settings = open_search(dir, None, changes)
        else:
            existed = dir.exists()
            db, settings = open_search(dir, fresh)
        with db:
            try:
                summary = run_search(db, settings, console=console)
            except BaseException:
                if not resume and discard_new_search(db, existed):
                    console.print(f"nothing was recorded: removed the new search in {dir}")
                raise
            interrupted = summary.stopped_by.startswith("interrupted")
            if interrupted and not resume and discard_new_search(db, existed):
                console.print(f"nothing was recorded: removed the new search in {dir}")
                raise KeyboardInterrupt
            _summary(db, summary, as_json)
        if interrupted:  # the summary is out (the one JSON object with --json); Ctrl-C still exits 130
            console.print("interrupted")
            raise typer.Exit(130)


def _summary(db, summary, as_json: bool) -> None:
    from agent.report import print_summary, status_dict

    if as_json:
        emit({"summary": summary, "status": status_dict(db)}, True, print)
    else:
        print_summary(db, summary, out)


@app.command()
def status(
    dir: Path = typer.Option(Path("searches/default"), "--dir", help="the search's folder"),
    all_rows: bool = typer.Option(False, "--all", help="every trial, not only the best candidates"),
    sort: str = typer.Option("best", help="best | speedup | trial | rung | proposer"),
    rung: str = typer.Option("", help="only trials at this rung: smoke | short | full | confirm"),
    proposer: str = typer.Option("", help="only trials of this proposer: ideas | knobs | llm | baseline | replay"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """What a search has found so far."""
    with guard(as_json):
        from agent.report import SORTS, print_status, select_rows, status_dict
        from agent.settings import LADDER
        from runs_db.db import RunsDB

        if sort not in SORTS:
            raise UserError(f"--sort {sort}: use one of {', '.join(SORTS)}")
        if rung and rung not in LADDER:
            raise UserError(f"--rung {rung}: use one of {', '.join(LADDER)}")
        known = ("ideas", "knobs", "llm", "baseline", "replay")
        if proposer and proposer not in known:
            raise UserError(f"--proposer {proposer}: use one of {', '.join(known)}")
        if not (dir / "search.toml").is_file():
            raise UserError(f"--dir {dir}: holds no search (no search.toml)")
        with RunsDB.open(dir) as db:
            data = status_dict(db)
        data["table"] = select_rows(data, all_rows=all_rows, sort=sort, rung=rung, proposer=proposer)
        data["filters"] = {"all": all_rows, "sort": sort, "rung": rung or None, "proposer": proposer or None}
        emit(data, as_json, lambda d: print_status(d, out))


def main() -> None:  # pragma: no cover
    app()


# Commands kept in their own modules register on the same app when imported.
from agent import cli_records  # noqa: E402,F401,I001
from agent import cli_show  # noqa: E402,F401,I001
from agent import cli_review  # noqa: E402,F401,I001
