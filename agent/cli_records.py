"""`speedsearch replay` (with `--ablate`, `--approved`) and `speedsearch export`.

Every input is checked before anything is made: the search folder, the commit, the options, the
destination and its clash, the remote. Then the command takes the search's writer lock (a running
search holds it, and replays approved candidates itself), starts the pool and runs, with a live
progress bar and its ETA on stderr.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from agent.cli_io import app, console, emit, guard, out
from search_space.errors import UserError


def _search(dir: Path):
    from runs_db.db import SETTINGS_FILE, RunsDB

    if not (dir / SETTINGS_FILE).is_file():
        raise UserError(f"--dir {dir}: not a search folder (no {SETTINGS_FILE})")
    return RunsDB.open(dir)


def _target_of(db, ray_address: str = ""):
    """The search's settings (with `ray_address` in place of its own, when given) and target."""
    from agent.settings import SearchSettings
    from search_space.target import load_target

    settings = SearchSettings.from_dict({**db.settings, **({"ray_address": ray_address} if ray_address else {})})
    return settings, load_target(settings.target)


@contextmanager
def _writer(db) -> Iterator[None]:
    from runs_db.reviews import apply_queued, writer

    with writer(db.dir) as held:
        if not held:
            raise UserError(f"--dir {db.dir}: a search is running there and is its only writer (it replays approved "
                            "candidates itself); wait for it to stop")
        apply_queued(db)
        yield


@contextmanager
def _pool(settings, target, db) -> Iterator[Any]:
    from agent.runner import start_pool

    pool = start_pool(settings, target, db)
    try:
        yield pool
    finally:
        pool.shutdown()


@contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int, str], None]]:
    """A live bar with the ETA, on stderr (stdout keeps the results, or the JSON)."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[last]}"),
                   console=console, transient=False)
    task = bar.add_task(what, total=None, last="")

    def tick(done: int, total: int, last: str) -> None:
        bar.update(task, completed=done, total=total, last=last)

    with bar:
        yield tick


def _replay_table(r) -> Table:
    table = Table("seed", "candidate val_loss", "candidate ms", "base val_loss", "base ms",
                  title=f"{r.purpose} of {r.commit[:10]} (trial {r.trial}), beside the base (trial {r.base_trial})")
    for c, b in zip(r.candidate, r.base, strict=True):
        fc, fb = c.final, b.final
        table.add_row(str(c.seed), f"{fc.val_loss:.4f}" if fc else c.status.value, f"{fc.train_ms:.0f}" if fc else "-",
                      f"{fb.val_loss:.4f}" if fb else b.status.value, f"{fb.train_ms:.0f}" if fb else "-")
    return table


def _show_replays(replays: list) -> None:
    for r in replays:
        out.print(_replay_table(r))
        for line in r.lines():
            out.print(line, highlight=False, markup=False, soft_wrap=True)  # "[no interval]" is words, not a style


@app.command()
def replay(
    dir: Path = typer.Option(Path("searches/default"), "--dir", help="the search's folder"),
    commit: str = typer.Option("", help="the candidate's commit (a prefix will do)"),
    seeds: int = typer.Option(5, help="fresh seeds, each run beside a base run"),
    ablate: bool = typer.Option(False, "--ablate", help="leave-one-out and each change alone, against the base"),
    approved: bool = typer.Option(False, "--approved", help="replay every candidate approved on the review page"),
    ray_address: str = typer.Option("", envvar="RAY_ADDRESS", show_envvar=False,
                                    help="run on this Ray cluster (default: $RAY_ADDRESS, else the search's own "
                                    "--ray-address, else a local cluster)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Run a candidate again on fresh seeds, each beside a base run: the speed-up, its interval and p-value."""
    with guard(as_json):
        if approved == bool(commit):
            raise UserError("--commit: give a candidate's commit, or --approved (not both)")
        if ablate and approved:
            raise UserError("--ablate: ablate one --commit at a time, not --approved")
        if seeds < 2:
            raise UserError(f"--seeds {seeds}: need at least 2 (an interval needs two pairs)")
        if ray_address:
            from agent.preflight import check_cluster

            check_cluster(ray_address)
        with _search(dir) as db:
            settings, target = _target_of(db, ray_address)
            if approved:
                _approved(db, settings, target, seeds, as_json)
                return
            from runs_db.export import resolve

            full = resolve(db, commit)
            if full == db.base_commit:
                raise UserError(f"--commit {commit}: that is the base; replay a candidate")
            if ablate:
                _ablate(db, settings, target, full, seeds, as_json)
                return
            from agent.replay import replay as run_replay

            with _writer(db), _pool(settings, target, db) as pool, _progress(f"replay {full[:10]}") as tick:
                r = run_replay(db, target, pool, full, seeds, progress=tick)
        emit(r.to_dict(), as_json, lambda _: _show_replays([r]))


def _approved(db, settings, target, seeds: int, as_json: bool) -> None:
    from agent.replay import replay as run_replay
    from runs_db.reviews import approved_pending

    done = []
    with _writer(db):
        pending = approved_pending(db)
        if pending:
            with _pool(settings, target, db) as pool:
                for c in pending:
                    with _progress(f"replay {c[:10]} (approved)") as tick:
                        done.append(run_replay(db, target, pool, c, seeds, progress=tick))

    def render(_: Any) -> None:
        if not done:
            out.print("no approved candidate waits for a replay")
        _show_replays(done)

    emit({"replays": [r.to_dict() for r in done]}, as_json, render)


def _ablate(db, settings, target, commit: str, seeds: int, as_json: bool) -> None:
    from agent import ablate

    with _writer(db):
        plan = ablate.plan(db, target, commit, seeds)
        console.print(plan.cost_line(), highlight=False, soft_wrap=True)  # the cost, before anything runs
        with _pool(settings, target, db) as pool, _progress(f"ablate {commit[:10]}") as tick:
            ab = ablate.run(db, target, pool, plan, progress=tick)

    def render(_: Any) -> None:
        for line in ab.lines():
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        if ab.plot:
            out.print(f"plot: {db.dir / ab.plot}", highlight=False)

    emit(ab.to_dict(), as_json, render)


@app.command()
def export(
    dir: Path = typer.Option(Path("searches/default"), "--dir", help="the search's folder"),
    commit: str = typer.Option(..., help="the candidate's commit (a prefix will do)"),
    name: str = typer.Option(..., help="the record's name, e.g. RotaryQKNorm"),
    repo: Path | None = typer.Option(None, help="the target's git repository (default: the target's [repo] path)"),
    out_dir: Path | None = typer.Option(None, "--out", help="where a built-in target's new repository goes"),
    push: str = typer.Option("", help="push the branch to this remote (a name, URL or path)"),
    record: bool = typer.Option(False, "--record", help="find the fewest steps that still reach the record target "
                                "(replays at decreasing steps), and the record time there"),
    seeds: int = typer.Option(5, help="with --record: fresh seeds per step count"),
    record_shrink: float = typer.Option(0.25, help="with --record: each step count this fraction below the last"),
    record_levels: int = typer.Option(6, help="with --record: at most this many step counts"),
    allow_untrusted: bool = typer.Option(False, "--allow-untrusted",
                                         help="export even when runs are untrusted (claimed losses)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Write branch record/<name> into the target's repository: the change and records/<date>_<name>/."""
    from runs_db.export import export as run_export

    with guard(as_json):
        with _search(dir) as db:
            _, target = _target_of(db)
            if record:
                from runs_db.export import check

                full, *_ = check(db, target, commit, name, repo, out_dir, push or None)
                if record_levels < 1:
                    raise UserError(f"--record-levels {record_levels}: give at least 1")
                _record(db, full, seeds, record_shrink, record_levels)
            done = run_export(db, commit, name, target, repo=repo, out=out_dir, push=push or None,
                              allow_untrusted=allow_untrusted)

    def render(_: Any) -> None:
        out.print(f"record {done.folder} on branch {done.branch} in {done.repo}"
                  + (f", pushed to {push}" if push else ""), highlight=False, soft_wrap=True)
        out.print(f"speed-up (replay): {done.facts['speedup_text']}", highlight=False, markup=False, soft_wrap=True)
        out.print(f"see it: git -C {done.repo} show --stat {done.branch}", highlight=False, soft_wrap=True)

    emit(done.to_dict(), as_json, render)


def _record(db, commit: str, seeds: int, shrink: float, levels: int) -> None:
    from agent.replay import record_search

    settings, target = _target_of(db)
    if seeds < 2:
        raise UserError(f"--seeds {seeds}: need at least 2")
    if not 0 < shrink < 1:
        raise UserError(f"--record-shrink {shrink}: give a fraction between 0 and 1")
    with _writer(db), _pool(settings, target, db) as pool, _progress(f"record {commit[:10]}") as tick:
        rec = record_search(db, target, pool, commit, seeds, shrink=shrink, max_levels=levels, progress=tick)
    for line in rec.lines():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
