"""Wire a search together: settings -> runs database, Ray pool, proposers, loop."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console

from agent.live import Live
from agent.loop import Search, Summary
from agent.proposal import Proposer
from agent.settings import SearchSettings
from env.pool import Pool
from runs_db.db import RunsDB
from search_space.ideas import load_ideas
from search_space.target import Target, load_target
from search_space.targets import BUILTINS


def open_search(dir: Path, settings: SearchSettings | None) -> tuple[RunsDB, SearchSettings]:
    """A new search (settings given) or the one saved in `dir` (settings None: --resume)."""
    if settings is None:
        if not (Path(dir) / "search.toml").exists():
            raise FileNotFoundError(f"{dir} holds no search to resume (no search.toml)")
        db = RunsDB.open(dir)
        try:
            db.check_schema()  # an older search is refused with one line (a ValueError the CLI prints)
        except ValueError:
            db.close()
            raise
        return db, SearchSettings.from_dict(db.settings)
    if settings.target not in BUILTINS:  # a path: store it absolute so resume works from anywhere
        settings = SearchSettings.from_dict({**settings.to_dict(), "target": str(Path(settings.target).resolve())})
    target = load_target(settings.target)
    if target.resources.gpus == 0 and "llm" not in settings.proposers and not target.knobs and not target.ideas_file:
        raise ValueError(f"target {target.name} has no knobs and no ideas: use --proposers llm")
    db = RunsDB.create(dir, settings.to_dict(), target, storage=settings.storage or None)
    return db, settings


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


def make_pool(settings: SearchSettings, target: Target, db: RunsDB, num_gpus: int | None = None) -> Pool:
    cpus = None
    if not settings.ray_address and settings.workers:
        cpus = max(os.cpu_count() or 1, settings.workers * target.resources.cpus)
    return Pool(settings.ray_address or None, num_cpus=cpus, num_gpus=num_gpus, sandbox=settings.sandbox,
                run_root=Path(db.dir) / "runs")


def run_search(db: RunsDB, settings: SearchSettings, console: Console | None = None, pool: Pool | None = None,
               live: Live | None = None) -> Summary:
    target = load_target(settings.target)
    proposers = build_proposers(settings, target, db)
    live = live or Live(enabled=console is not None, console=console, title=f"speedsearch: {target.name}")
    if console is not None:
        print_header(console, target, settings)
    own_pool = pool is None
    pool = pool or make_pool(settings, target, db)
    try:
        return Search(db, target, settings, pool, proposers, live=live).run()
    finally:
        if own_pool:  # the workers go now, so what a cancelled run of theirs still held can be freed
            pool.shutdown()
            _free_volumes(Path(db.dir))


def _free_volumes(folder: Path, wait_s: float = 10.0) -> None:
    """Unmount the volumes that runs cancelled at the stop left in `folder`, once their (killed)
    workers are gone: nothing of a run outlives the search."""
    from env.volume import mounted_under, reap_orphans

    deadline = time.monotonic() + wait_s
    while os.geteuid() == 0 and mounted_under(folder) and time.monotonic() < deadline:
        reap_orphans()
        time.sleep(0.1)


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
