"""The `speedsearch` command: a thin layer over agent/ and env/."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from agent.cli_io import app, console, emit, guard, out
from search_space.errors import UserError
from search_space.target import Target, cache_dir, load_target
from search_space.targets import BUILTINS

EXIT_PAUSED = 75  # the cluster was lost: the search is paused, not finished (`--resume` goes on)


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
    ray_address: str = typer.Option("", envvar="RAY_ADDRESS", show_envvar=False,
                                    help="run on this Ray cluster (default: $RAY_ADDRESS, else here, in-process)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Run one candidate once and report what happened. SIGINT or SIGTERM ends the run, prints its
    result and exits 130 or 143."""
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
        from agent.preflight import check_cluster

        if ray_address:
            check_cluster(ray_address)
        from env.evaluate import RunSpec, make_sandbox
        from env.gpus import local_gpu_ids

        gpu_ids: tuple[str, ...] = ()
        if not ray_address:  # on a cluster the pool picks the GPUs
            try:
                gpu_ids = local_gpu_ids(t.resources.gpus)
            except ValueError as e:
                raise UserError(f"--gpus {t.resources.gpus}: {e}") from None
        if sandbox == "docker":
            from agent.runner import check_access
            from agent.settings import SearchSettings

            check_access(SearchSettings(target=target, sandbox="docker"))
        spec = RunSpec(t, seed=seed, fidelity=fidelity, patch=patch.read_text() if patch else None, gpu_ids=gpu_ids)
        root = run_root or cache_dir() / "runs"
        where = f" on {ray_address}" if ray_address else ""
        with console.status(f"running {t.name} seed {seed} at {fidelity} ({t.steps(fidelity)} steps){where}"):
            if ray_address:
                result, caught = _evaluate_on_cluster(spec, ray_address, sandbox, root)
            else:
                result, caught = _evaluate_here(spec, make_sandbox(sandbox, t), root)
        if caught.signum and result.status.value != "ok":
            from search_space.records import Status

            result.status, result.reason = Status.FAILED, f"cancelled by {caught.name}"

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
        if caught.signum:
            raise typer.Exit(caught.exit_code)


def _evaluate_here(spec, sandbox, root: Path):
    """The run in a thread of this process; SIGINT/SIGTERM cancel it (the sandbox kills every
    process of the run) and it returns its result, marked by `evaluate`."""
    import threading

    from agent.cli_io import signals_cancel
    from env.evaluate import evaluate as run_one

    cancel = threading.Event()
    box: dict = {}

    def work() -> None:
        try:
            box["result"] = run_one(spec, sandbox, root, cancel=cancel)
        except BaseException as e:  # raised again on this thread
            box["error"] = e

    with signals_cancel(cancel) as caught:
        thread = threading.Thread(target=work, name="evaluate", daemon=True)
        thread.start()
        while thread.is_alive():  # short joins: a signal handler runs between them
            thread.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["result"], caught


def _evaluate_on_cluster(spec, address: str, sandbox: str, root: Path):
    """The run as one task on the Ray cluster at `address`; a signal stops it through the pool.
    The log comes back by value and is written under `root` here when the run was elsewhere."""
    import threading

    from agent.cli_io import signals_cancel
    from agent.preflight import AUTH_HINT, check_node_gpus, first_line, is_auth_refusal
    from env.pool import Pool

    try:
        pool = Pool(address, sandbox=sandbox, run_root=root)
    except Exception as e:
        hint = f"; {AUTH_HINT}" if is_auth_refusal(e) else ""
        raise UserError(f"--ray-address {address}: cannot join the Ray cluster there ({first_line(e)}){hint}") from None
    try:
        check_node_gpus(spec.target.resources.gpus, spec.target.name, f"the cluster at {address}")
        cancel = threading.Event()
        with signals_cancel(cancel) as caught:
            ref = pool.submit(spec)
            while not pool.wait([ref], timeout=0.2):
                if cancel.is_set():
                    pool.stop([ref])
            finished = pool.get(ref)
    finally:
        pool.shutdown()
    result = finished.result
    log = Path(result.log)
    if finished.log_text and not log.exists():
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(finished.log_text)
    return result, caught


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
    smoke: str = typer.Option("auto", help="the smoke rung before short: on | off | auto (off where the "
                              "target declares a start-up of a minute or more, which short pays again)"),
    storage: str = typer.Option("", help="Optuna storage URL (default: sqlite in the search folder)"),
    study_name: str = typer.Option("speedsearch", help="the search's study in --storage: searches sharing one "
                                   "database each need their own"),
    ray_address: str = typer.Option("", envvar="RAY_ADDRESS", show_envvar=False,
                                    help="a Ray cluster's address (default: $RAY_ADDRESS, else a local cluster)"),
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
                  "max_fidelity": max_fidelity, "smoke": smoke, "storage": storage, "study_name": study_name,
                  "ray_address": ray_address, "sandbox": sandbox,
                  "models": models, "seed": seed, "fdr": fdr, "allow_untrusted": allow_untrusted,
                  "drain_minutes": drain_minutes}
        # Refusals first, before Ray and the rest load (seconds): the options, the target, access,
        # the database, this machine's GPUs.
        fresh = None if resume else SearchSettings(**values)
        if fresh is None:
            SearchSettings(**{**values, "target": "tinygpt"})  # the options alone are valid (one line if not)
        else:
            t = _target(fresh.target)
            check_access(fresh, dir, new=True)
            from agent.preflight import check_local_gpus, joins_started_cluster

            if not fresh.ray_address and not joins_started_cluster():  # a cluster's GPUs are checked on joining
                check_local_gpus(t.resources.gpus, t.name)
        from agent.runner import discard_new_search, lost_database, open_search, run_search, start_pool

        if fresh is None:
            changes = {k: values[k] for k in _given(ctx, list(values))}
            if "target" in changes and changes["target"] not in BUILTINS:
                changes["target"] = str(Path(changes["target"]).resolve())
            db, settings = open_search(dir, None, changes)
            try:
                pool = start_pool(settings, load_target(settings.target), db)
            except BaseException:
                db.close()
                raise
        else:
            # The cluster is joined (and its GPUs checked) before the folder is made: a refusal
            # leaves nothing behind to block the next try.
            existed = dir.exists()
            pool = start_pool(fresh, t, dir)
            try:
                db, settings = open_search(dir, fresh, checked=True)
            except BaseException:
                pool.shutdown()
                raise
        with db:
            try:
                summary = run_search(db, settings, console=console, pool=pool, own_pool=True)
            except BaseException as e:
                if (line := lost_database(e, db)) is not None:
                    raise UserError(line) from None  # one line naming the database, not a traceback
                if not resume and discard_new_search(db, existed):
                    console.print(f"nothing was recorded: removed the new search in {dir}")
                raise
            interrupted = summary.stopped_by.startswith("interrupted")
            if interrupted and not resume and discard_new_search(db, existed):
                console.print(f"nothing was recorded: removed the new search in {dir}")
                raise KeyboardInterrupt
            _summary(db, summary, as_json)
        if summary.stopped_by.startswith("paused"):  # the last line says why, and the exit code that it paused
            if not as_json:
                console.print(summary.stopped_by, markup=False, soft_wrap=True)
            raise typer.Exit(EXIT_PAUSED)
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
from agent import cli_init  # noqa: E402,F401,I001
