"""`speedsearch replay` and `speedsearch export`: a candidate's fresh-seed statistics and its record."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from agent.cli_io import app, console


def _target(spec: str):
    from agent.cli import _target as load

    return load(spec)


@app.command()
def replay(
    dir: Path = typer.Option(Path("searches/default"), "--dir", help="the search's folder"),
    commit: str = typer.Option(..., help="the candidate's commit (a prefix will do)"),
    seeds: int = typer.Option(5, help="seeds to run, each beside a run of the base"),
) -> None:
    """Run a candidate again with fresh seeds, each beside a base run: the speed-up and its interval."""
    from agent.replay import replay as run_replay
    from agent.runner import make_pool
    from agent.settings import SearchSettings
    from runs_db.db import RunsDB

    with RunsDB.open(dir) as db:
        settings = SearchSettings.from_dict(db.settings)
        t = _target(settings.target)
        pool = make_pool(settings, t, db)
        with console.status(f"replaying {commit[:10]} with {seeds} seeds beside the base"):
            r = run_replay(db, t, pool, commit, seeds)
    table = Table("seed", "candidate val_loss", "candidate ms", "base val_loss", "base ms",
                  title=f"{r.purpose} of {r.commit[:10]} (trial {r.trial}), beside the base (trial {r.base_trial})")
    for c, b in zip(r.candidate, r.base, strict=True):
        fc, fb = c.final, b.final
        table.add_row(str(c.seed), f"{fc.val_loss:.4f}" if fc else c.status.value, f"{fc.train_ms:.0f}" if fc else "-",
                      f"{fb.val_loss:.4f}" if fb else b.status.value, f"{fb.train_ms:.0f}" if fb else "-")
    out = Console()
    out.print(table)
    for line in r.lines():
        out.print(line, highlight=False, markup=False)  # "[no interval]" is words, not a style


@app.command()
def export(
    dir: Path = typer.Option(Path("searches/default"), "--dir", help="the search's folder"),
    commit: str = typer.Option(..., help="the candidate's commit (a prefix will do)"),
    name: str = typer.Option(..., help="the record's name, e.g. RotaryQKNorm"),
    out: Path = typer.Option(Path("."), help="where records/<date>_<name>/ goes"),
    allow_untrusted: bool = typer.Option(False, "--allow-untrusted",
                                         help="export even when runs are untrusted (claimed losses)"),
) -> None:
    """Write a record folder (README, logs, statistics, plot, PR body) and an export/<name> branch."""
    from agent.settings import SearchSettings
    from runs_db.db import RunsDB
    from runs_db.export import ExportError
    from runs_db.export import export as run_export

    with RunsDB.open(dir) as db:
        t = _target(SearchSettings.from_dict(db.settings).target)
        try:
            folder = run_export(db, commit, out, name, t, allow_untrusted=allow_untrusted)
        except ExportError as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
    Console().print(f"record written to {folder}")
