"""Wire a search together: settings -> runs database, Ray pool, proposers, loop."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from agent.live import Live
from agent.loop import Search, Summary
from agent.preflight import (
    AUTH_HINT,
    check_access,
    check_node_gpus,
    first_line,
    is_auth_refusal,
    joins_started_cluster,
)
from agent.proposal import Proposer
from agent.resume import counted_trials
from agent.settings import SearchSettings
from env.pool import Pool
from runs_db.db import RunsDB
from search_space.errors import UserError
from search_space.ideas import load_ideas
from search_space.target import Target, load_target
from search_space.targets import BUILTINS


def open_search(dir: Path, settings: SearchSettings | None, changes: dict[str, Any] | None = None,
                checked: bool = False) -> tuple[RunsDB, SearchSettings]:
    """A new search (settings given) or the one saved in `dir` (settings None: --resume, where
    `changes` are the options given again, e.g. new budgets; see SearchSettings.with_changes).

    Everything a user can get wrong is checked before the folder is made: the target, the
    options, the API key, the Docker daemon, the Ray cluster's address and the database
    (`check_access`; `checked`: the caller has just done so).
    """
    if settings is None:
        return _resume(Path(dir), changes or {})
    if settings.target not in BUILTINS:  # a path: store it absolute so resume works from anywhere
        settings = SearchSettings.from_dict({**settings.to_dict(), "target": str(Path(settings.target).resolve())})
    target = load_target(settings.target)
    if target.resources.gpus == 0 and "llm" not in settings.proposers and not target.knobs and not target.ideas_file:
        raise UserError(f"--proposers {','.join(settings.proposers)}: target {target.name} has no knobs and no "
                        "ideas; use --proposers llm")
    if not checked:
        check_access(settings, Path(dir), new=True)
    db = RunsDB.create(dir, settings.to_dict(), target, storage=settings.storage or None)
    return db, settings


def _resume(dir: Path, changes: dict[str, Any]) -> tuple[RunsDB, SearchSettings]:
    if not (dir / "search.toml").exists():
        raise UserError(f"--dir {dir}: holds no search to resume (no search.toml)")
    db = RunsDB.open(dir)
    try:
        db.check_schema()  # an older search is refused with one line
        # The study's name as the database knows it (a search made before --study-name kept it only there).
        saved = SearchSettings.from_dict({**db.settings, "study_name": db.study_name})
        if changes.get("budget_trials"):  # counted from the resume: "--budget-trials 2" is two more trials
            done = counted_trials(db)  # interrupted trials are not spent: their rung runs again
            changes = {**changes, "budget_trials": done + int(changes["budget_trials"])}
        settings = saved.with_changes(changes)
        check_access(settings)
        if settings != saved:  # kept, so that a later plain --resume goes on under the same budgets
            save_settings(db, settings)
    except BaseException:
        db.close()
        raise
    return db, settings


def save_settings(db: RunsDB, settings: SearchSettings) -> None:
    """Rewrite search.toml's settings, keeping the runs database's own table; atomic."""
    from runs_db.db import META_KEY, SETTINGS_FILE, dumps_toml

    path = Path(db.dir) / SETTINGS_FILE
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(dumps_toml({**settings.to_dict(), META_KEY: db.meta}))
    os.replace(tmp, path)
    db.settings = {**db.settings, **settings.to_dict()}


def discard_new_search(db: RunsDB, existed: bool) -> bool:
    """Remove a search this process just made when it failed before recording anything (a pool
    that never started, Ctrl-C during start-up), so the folder does not block the next launch.
    `existed`: the folder was there before (only what the search made goes). True if removed."""
    if db.trials():
        return False
    folder = Path(db.dir)
    if db.meta.get("storage"):
        db.study.delete()
    db.close()
    for name in ("search.toml", "study.db", "study.db-wal", "study.db-shm", "study.db-journal", "repo",
                 "artifacts", "runs", "progress.png"):
        p = folder / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    if not existed:
        with contextlib.suppress(OSError):
            folder.rmdir()
    return True


def build_proposers(settings: SearchSettings, target: Target, db: RunsDB) -> dict[str, Proposer]:
    out: dict[str, Proposer] = {}
    if "ideas" in settings.proposers:
        from agent.proposers.ideas import IdeasProposer

        out["ideas"] = IdeasProposer(load_ideas(target.ideas_file), seed=settings.seed)
    if "knobs" in settings.proposers:
        from agent.proposers.knobs import KnobsProposer

        out["knobs"] = KnobsProposer(target.knobs, db.storage_url, f"{db.study_name}-knobs", seed=settings.seed)
    if "llm" in settings.proposers:
        from agent.proposers.llm import LLMProposer

        out["llm"] = LLMProposer(models=settings.model_weights(), seed=settings.seed)
    return out


def make_pool(settings: SearchSettings, target: Target, where: RunsDB | Path, num_gpus: int | None = None) -> Pool:
    """The Ray pool of a search whose folder is `where` (a RunsDB or the folder itself: the pool
    may start before the folder is made). Without a cluster, a local one with this machine's
    GPUs (`num_gpus` other than None: that many logical ones, as tests do)."""
    cpus = None
    own = not settings.ray_address and not joins_started_cluster()  # else the cluster's nodes say what they have
    if own and settings.workers:
        cpus = max(os.cpu_count() or 1, settings.workers * target.resources.cpus)
    if own and num_gpus is None:
        from env.gpus import visible_gpus

        num_gpus = len(visible_gpus())  # said to Ray: its own count may miss what nvidia-smi shows
    folder = where.dir if isinstance(where, RunsDB) else Path(where)
    return Pool(settings.ray_address or None, num_cpus=cpus, num_gpus=num_gpus, sandbox=settings.sandbox,
                run_root=Path(folder) / "runs")


def start_pool(settings: SearchSettings, target: Target, where: RunsDB | Path, num_gpus: int | None = None) -> Pool:
    """`make_pool`, with what can go wrong said in one line (UserError): a cluster that answers
    but will not let us in (token auth) or is not healthy, a target that needs more GPUs per run
    than any node has. Nothing of the search needs to exist yet."""
    try:
        pool = make_pool(settings, target, where, num_gpus)
    except Exception as e:  # a cluster that answered on its port but is not (or not a healthy) Ray
        if not settings.ray_address:
            raise  # the local cluster failing to start is not the user's mistake: keep the traceback
        hint = f"; {AUTH_HINT}" if is_auth_refusal(e) else ""
        raise UserError(f"--ray-address {settings.ray_address}: cannot join the Ray cluster there "
                        f"({first_line(e)}){hint}") from None
    try:
        check_node_gpus(target.resources.gpus, target.name,
                        f"the cluster at {settings.ray_address}" if settings.ray_address else "the local pool")
    except BaseException:
        pool.shutdown()
        raise
    return pool


def lost_database(e: BaseException, db: RunsDB) -> str | None:
    """When `e` (or what it was raised from or during) is the runs database failing, the one line
    that ends the search: which database, why, and that --resume goes on from what was recorded."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        module = type(e).__module__.split(".")[0]
        if module in ("sqlalchemy", "psycopg2", "psycopg", "sqlite3"):
            from runs_db.study import redact

            reason = getattr(e, "orig", None) or e
            where = redact(db.meta["storage"]) if db.meta.get("storage") else str(Path(db.dir) / "study.db")
            return (f"the runs database {where} failed ({first_line(reason)}); the search stopped, its recorded "
                    f"trials are kept: `speedsearch launch --dir {db.dir} --resume` goes on once it answers")
        e = e.__cause__ or e.__context__
    return None


def run_search(db: RunsDB, settings: SearchSettings, console: Console | None = None, pool: Pool | None = None,
               live: Live | None = None, own_pool: bool | None = None) -> Summary:
    """Run the search to its end. A pool given is the caller's (`own_pool`: this ends it anyway)."""
    target = load_target(settings.target)
    proposers = build_proposers(settings, target, db)
    live = live or Live(enabled=console is not None, console=console, title=f"speedsearch: {target.name}")
    if console is not None:
        print_header(console, target, settings)
    own_pool = pool is None if own_pool is None else own_pool
    if pool is None:
        pool = start_pool(settings, target, db)
    try:
        return Search(db, target, settings, pool, proposers, live=live).run()
    finally:
        if own_pool:  # the workers go now, so what a cancelled run of theirs still held can be freed
            pool.shutdown()
            _free_volumes(Path(db.dir))


def _free_volumes(folder: Path, wait_s: float = 10.0) -> None:
    """Unmount the volumes that runs cancelled at the stop left in `folder`, once their (killed)
    workers are gone: nothing of a run outlives the search."""
    from env.volume import free_under

    free_under(folder, wait_s)


def print_header(console: Console, target: Target, settings: SearchSettings) -> None:
    """Said once, before the first run: what contains a run here and whether its numbers are measured."""
    if settings.sandbox == "process":
        from env.process_sandbox import containment_support

        parts = [f"{k}: {v}" for k, v in containment_support().items()]
        console.print("sandbox process | " + " | ".join(parts), highlight=False, soft_wrap=True)
    else:
        console.print(f"sandbox {settings.sandbox}", highlight=False)
    if target.trust is None:
        console.print(f"[yellow]untrusted:[/yellow] target {target.name} declares no [trust] evaluator; its "
                      "numbers are the trainer's own claims and are never confirmed"
                      + (" (--allow-untrusted is set)" if settings.allow_untrusted else ""), soft_wrap=True)
    else:
        console.print(f"trusted: losses recomputed on held-out data by {target.name}'s evaluator, times observed "
                      "by the sandbox", highlight=False, soft_wrap=True)
