"""The `speedsearch` command: a thin layer over agent/ and env/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from agent.cli_io import app, console
from search_space.target import TargetError, cache_dir, load_target
from search_space.targets import BUILTINS

FIDELITIES = ("smoke", "short", "full")


def _target(spec: str):
    try:
        return load_target(spec)
    except TargetError as e:
        console.print(f"[red]target error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def targets() -> None:
    """List the built-in targets."""
    table = Table("name", "objective", "full steps", "gpus", "description")
    for name in BUILTINS:
        t = load_target(name)
        table.add_row(name, t.objective, str(t.steps("full")), str(t.resources.gpus), t.description)
    Console().print(table)


@app.command()
def evaluate(
    target: str = typer.Option("tinygpt", help="a built-in target's name or a target.toml"),
    patch: Path | None = typer.Option(None, exists=True, dir_okay=False, help="SEARCH/REPLACE blocks or a diff"),
    seed: int = typer.Option(0),
    fidelity: str = typer.Option("full", help="smoke | short | full"),
    sandbox: str = typer.Option("process", help="process | docker"),
    gpus: int | None = typer.Option(None, help="GPUs for the run, overriding the target's ({nproc} follows)"),
    run_root: Path | None = typer.Option(None, help="where run folders go (default: the cache)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Run one candidate once and report what happened."""
    from dataclasses import replace

    from env.evaluate import RunSpec, make_sandbox
    from env.evaluate import evaluate as run_one
    from env.gpus import local_gpu_ids

    t = _target(target)
    if gpus is not None:
        t = replace(t, resources=replace(t.resources, gpus=gpus))
    try:
        gpu_ids = local_gpu_ids(t.resources.gpus)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if fidelity not in t.fidelities:
        console.print(f"[red]--fidelity {fidelity}:[/red] target {t.name} has {', '.join(t.fidelities)}")
        raise typer.Exit(2)
    if sandbox not in ("process", "docker"):
        console.print(f"[red]--sandbox {sandbox}:[/red] use process or docker")
        raise typer.Exit(2)
    spec = RunSpec(t, seed=seed, fidelity=fidelity, patch=patch.read_text() if patch else None, gpu_ids=gpu_ids)
    with console.status(f"running {t.name} seed {seed} at {fidelity} ({t.steps(fidelity)} steps)"):
        result = run_one(spec, make_sandbox(sandbox, t), run_root or cache_dir() / "runs")
    out = result.to_dict()
    if as_json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return
    table = Table("status", "val_loss", "train_ms", "steps", "wall_s", "log", title=f"{t.name} @ {fidelity}")
    final = out["final"] or {}
    table.add_row(out["status"], f"{final.get('val_loss', float('nan')):.4f}", f"{final.get('train_ms', 0):.0f}",
                  str(final.get("steps", 0)), f"{out['wall_s']:.1f}", out["log"])
    Console().print(table)
    if result.reason:
        Console().print(f"reason: {result.reason}")


def main() -> None:  # pragma: no cover
    app()


def _split(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


@app.command()
def launch(
    dir: Path = typer.Option(Path("searches/default"), "--dir", help="the search's folder"),
    target: str = typer.Option("tinygpt", help="a built-in target's name or a target.toml"),
    proposers: str = typer.Option("ideas,knobs", help="comma-separated: ideas, knobs, llm"),
    workers: int = typer.Option(0, help="runs at once (0: as many as the cluster fits)"),
    budget_trials: int = typer.Option(0, help="stop after this many candidate trials (0: no limit)"),
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
    resume: bool = typer.Option(False, help="continue the search in --dir with its saved settings"),
) -> None:
    """Run an autonomous search: propose, evaluate on the Ray pool, record, learn, repeat."""
    from agent.runner import open_search, run_search
    from agent.settings import SearchSettings

    try:
        settings = None if resume else SearchSettings(
            target=target, proposers=_split(proposers), workers=workers, budget_trials=budget_trials,
            budget_minutes=budget_minutes, budget_gpu_hours=budget_gpu_hours, budget_dollars=budget_dollars,
            seeds=seeds, max_fidelity=max_fidelity, storage=storage, ray_address=ray_address, sandbox=sandbox,
            models=models, seed=seed, fdr=fdr, allow_untrusted=allow_untrusted,
            drain_minutes=drain_minutes)
        db, settings = open_search(dir, settings)
    except (ValueError, TargetError, FileExistsError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    with db:
        summary = run_search(db, settings, console=console)
    from agent.report import print_summary

    print_summary(db, summary, Console())


@app.command()
def status(
    dir: Path = typer.Option(Path("searches/default"), "--dir", help="the search's folder"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """What a search has found so far."""
    from agent.report import print_status, status_dict
    from runs_db.db import RunsDB

    if not (dir / "search.toml").exists():
        console.print(f"[red]error:[/red] {dir} holds no search (no search.toml)")
        raise typer.Exit(2)
    with RunsDB.open(dir) as db:
        data = status_dict(db)
    if as_json:
        json.dump(data, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print_status(data, Console())


# Commands kept in their own modules register on the same app when imported.
from agent import cli_records  # noqa: E402,F401
