"""Export a winner into the target's own git repository: a branch with the change applied and a
record folder in the NanoGPT speedrun's format.

    branch record/<Name>, one commit on the target's base:
        the candidate's change (its diff against the search's base, applied)
        records/<YYYY-MM-DD>_<Name>/
            README.md           what changed and why, shares from the ablations, final losses, p-value,
                                timing against the base with its interval, hardware and software
            pr.md               the pull request's body
            statistics.json     every number the README quotes
            loss_curve.png      candidate against base (ablation.png when ablations ran)
            candidate/seed-<s>.txt, baseline/seed-<s>.txt   one log per run, source first

Where: `repo` when given (a git repository, or a plain folder that becomes one); else the
target's `[repo] path` when it is a git repository (a plain one becomes one); a built-in target
gets a new repository under `out`. Every check (commit, name, runs, clash, remote) comes before
anything is written; objects are written before the branch, and a repository made here is removed
again if a later step fails, so a refused export leaves nothing behind.

The numbers come only from replays (`runs_db.pairs.replay_pairs`): fresh seeds that no rung,
confirm included, used to select the candidate, at the full step count. The headline is the one
speed-up over those pairs (`judge.Speedup.text()`, as `replay` prints it).
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from runs_db import record_git, record_text
from runs_db.db import RunsDB
from runs_db.pairs import Paired, budget_words, replay_pairs, search_target_loss
from search_space import judge
from search_space.errors import UserError
from search_space.records import RunResult
from search_space.target import Target

BRANCH_PREFIX = "record/"
ABLATION_STATE, RECORD_STATE = "ablation:", "record:"  # study state keys written by agent.ablate / agent.replay
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ExportError(UserError):
    """Nothing (or nothing sound) to export, or nowhere to put it; the message says which."""


@dataclass
class Destination:
    path: Path
    kind: str  # "git": an existing repository | "plain": a folder to make one in | "new": a new folder
    base: str | None = None  # the commit the branch starts from (git only; others are made)


@dataclass
class Exported:
    repo: Path
    branch: str
    folder: str  # records/<date>_<name>, inside the branch
    commit: str
    facts: dict[str, Any]
    pushed: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"repo": str(self.repo), "branch": self.branch, "folder": self.folder, "commit": self.commit,
                "pushed": self.pushed, "speedup_text": self.facts["speedup_text"], "p_value": self.facts["p_value"],
                "record_steps": self.facts.get("record_steps")}


def export(db: RunsDB, commit: str, name: str, target: Target, *, repo: Path | None = None, out: Path | None = None,
           push: str | None = None, date: datetime.date | None = None, allow_untrusted: bool = False,
           fidelity: str = "full") -> Exported:
    """Write branch record/<name> with the change and its record folder; see the module's words."""
    commit, name, dest, folder, branch = check(db, target, commit, name, repo, out, push, date)
    steps = target.steps(fidelity)
    paired = replay_pairs(db, commit, steps)
    if not paired.candidate:
        raise ExportError(f"--commit {commit[:12]}: no replay runs to take statistics from (fresh seeds only); run "
                          f"`speedsearch replay --commit {commit[:12]}` first")
    if paired.untrusted and not allow_untrusted:
        raise ExportError(f"--commit {commit[:12]}: {paired.untrusted} of the replay runs are untrusted (claimed "
                          "losses); pass --allow-untrusted to export them anyway")
    target_loss = search_target_loss(db, target, fidelity)
    if target_loss is None:
        raise ExportError("no target loss: the search has no base runs at this fidelity")
    day = folder.split("/")[1].split("_")[0]

    facts = statistics(paired, target.objective, target_loss, budget_words(target, fidelity))
    changes = [dict(zip(("title", "rationale"), record_text.rationale(db.message(c)), strict=True))
               for c in reversed(db.lineage(commit)[:-1])]
    facts.update({"name": name, "date": day, "commit": commit, "target": target.name, "objective": target.objective,
                  "steps": steps, "title": " + ".join(c["title"] for c in changes),
                  "environment": record_text.environment(paired.candidate + paired.base),
                  "replay_purposes": ", ".join(sorted({str(t.attrs.get("purpose")) for t in db.trials()
                                                      if t.commit == commit and t.proposer == "replay"
                                                      and t.attrs.get("steps", steps) == steps})),
                  "confirmation_words": _confirmation(db, commit)})
    ablation, record = db.get_state(ABLATION_STATE + commit, None), db.get_state(RECORD_STATE + commit, None)
    facts["record_steps"] = record.get("steps") if isinstance(record, dict) else None
    facts["rules"] = target.rules.text() if target.rules else None  # the track's rules, in plain words
    patch = db.diff(commit, against=db.base_commit)
    files = _files(db, target, commit, paired, facts, changes, ablation, record, patch, folder)

    made = None
    if dest.kind != "git":
        made = dest.path / ".git" if dest.kind == "plain" else dest.path
        dest.base = _make_repo(db, dest)
    try:
        new = record_git.branch_with(dest.path, dest.base or "", patch, {f"{folder}/{k}": v for k, v in files.items()},
                                     f"Record {name}: {facts['title']}\n\n{facts['speedup_text']}\n", branch)
        if push:
            record_git.push(dest.path, push, branch)
    except BaseException:
        if record_git.has_ref(dest.path, f"refs/heads/{branch}"):
            record_git.git(dest.path, "update-ref", "-d", f"refs/heads/{branch}", check=False)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    return Exported(dest.path, branch, folder, new, facts, push)


def check(db: RunsDB, target: Target, commit: str, name: str, repo: Path | None = None, out: Path | None = None,
          push: str | None = None, date: datetime.date | None = None) -> tuple[str, str, Destination, str, str]:
    """Everything export refuses, refused before anything is written (the CLI calls it before a
    record's replays too): (commit, name, destination, record folder, branch)."""
    commit = resolve(db, commit)
    if commit == db.base_commit:
        raise ExportError(f"--commit {commit[:12]}: that is the base; export a candidate")
    name = name.strip().replace(" ", "_")
    if not _NAME.match(name):
        raise ExportError(f"--name {name!r}: use letters, digits, '-', '_' or '.' (starting with a letter or digit)")
    day = (date or datetime.date.today()).isoformat()
    folder, branch = f"records/{day}_{name}", BRANCH_PREFIX + name
    dest = destination(db, target, repo, out)
    _refuse_clash(dest, folder, branch)
    if push:
        where = dest.path if dest.kind == "git" else None
        if why := record_git.remote_reachable(where, push):
            raise ExportError(f"--push {push}: the remote does not answer ({why})")
        if record_git.remote_has(where, push, branch):
            raise ExportError(f"--name: branch {branch} already exists on {push}; pick another name")
    return commit, name, dest, folder, branch


def resolve(db: RunsDB, commit: str) -> str:
    """The full commit, or ExportError naming --commit."""
    from runs_db.history import HistoryError

    if not commit.strip():
        raise ExportError("--commit: give a candidate's commit (a prefix will do)")
    try:
        return db.resolve(commit.strip())
    except (HistoryError, ValueError):
        raise ExportError(f"--commit {commit!r}: not a commit of the search in {db.dir}") from None


def destination(db: RunsDB, target: Target, repo: Path | None, out: Path | None) -> Destination:
    """Where the branch goes (nothing is made here)."""
    if repo is not None:
        repo = Path(repo).resolve()
        if not repo.is_dir():
            raise ExportError(f"--repo {repo}: not a folder")
        return _existing(db, repo)
    if _builtin(target):
        where = (Path(out) if out else Path.cwd()).resolve() / f"{target.name}-records"
        if record_git.is_repo(where):
            return _existing(db, where)
        if where.exists():
            raise ExportError(f"--out: {where} exists and is not a git repository; pick another --out")
        return Destination(where, "new")
    return _existing(db, Path(target.repo).resolve())


def _existing(db: RunsDB, path: Path) -> Destination:
    if not record_git.is_repo(path):
        return Destination(path, "plain")
    source = db.meta.get("source_commit")
    if source and record_git.git(path, "cat-file", "-e", f"{source}^{{commit}}", check=False).returncode == 0:
        return Destination(path, "git", source)  # the commit the search's base was snapshotted from
    head = record_git.git(path, "rev-parse", "--verify", "--quiet", "HEAD", check=False)
    if head.returncode != 0:
        raise ExportError(f"--repo {path}: a git repository without a commit to start the branch from")
    return Destination(path, "git", head.stdout.strip())


def _builtin(target: Target) -> bool:
    from search_space.targets import HERE

    return target.source is not None and Path(target.source).resolve().is_relative_to(HERE.resolve())


def _refuse_clash(dest: Destination, folder: str, branch: str) -> None:
    if dest.kind == "git":
        if record_git.has_ref(dest.path, f"refs/heads/{branch}"):
            raise ExportError(f"--name: branch {branch} already exists in {dest.path.name}; pick another name")
        if record_git.path_in_tree(dest.path, dest.base or "HEAD", folder) or (dest.path / folder).exists():
            raise ExportError(f"--name: {folder} already exists in {dest.path.name}; pick another name")
    elif (dest.path / folder).exists():
        raise ExportError(f"--name: {folder} already exists in {dest.path.name}; pick another name")


def _make_repo(db: RunsDB, dest: Destination) -> str:
    """A repository for the export: the plain folder's own files, or the search's base tree."""
    if dest.kind == "plain":
        return record_git.init_repo(dest.path, None, "Base: the trainer as speedsearch found it\n")
    files = {p: t.encode() for p, t in db.files(db.base_commit).items()}
    return record_git.init_repo(dest.path, files, f"Base: {db.meta.get('target', 'target')}\n")


def _files(db: RunsDB, target: Target, commit: str, paired: Paired, facts: dict[str, Any], changes: list,
           ablation: dict | None, record: dict | None, patch: str, folder: str) -> dict[str, bytes | str]:
    """Every file of the record folder, in memory (nothing is written before the checks pass)."""
    roots = [str(db.dir), str(Path(db.dir).resolve()), str(target.repo), str(target.root), str(Path.home())]
    files: dict[str, bytes | str] = {}
    logs = []
    for side, runs, at in (("candidate", paired.candidate, commit), ("baseline", paired.base, db.base_commit)):
        editable = [p for p in db.ls(at) if any(fnmatch.fnmatch(p, g) for g in target.editable)]
        sources = db.files(at, editable)
        for r in runs:
            name = record_text.log_name(side, r)
            files[name] = record_text.run_log(sources, record_text.environment([r]), _log_text(r), roots)
            logs.append(name)
    from runs_db.plots import plot_loss_curves  # matplotlib loads only when a record is written

    with tempfile.TemporaryDirectory() as tmp:
        plot = plot_loss_curves(paired.candidate, paired.base, Path(tmp) / record_text.PLOT_NAME,
                                title=f"{facts['name']}: {facts['speedup_text']}", target_loss=facts["target_loss"])
        if plot:
            files[record_text.PLOT_NAME] = plot.read_bytes()
    if ablation and ablation.get("plot") and (db.dir / ablation["plot"]).is_file():
        files[record_text.ABLATION_PLOT] = (db.dir / ablation["plot"]).read_bytes()
    stats = {**facts, "ablation": ablation, "record": record, "files": sorted([*files, "README.md", "pr.md"])}
    files["statistics.json"] = json.dumps(_finite(stats), indent=1) + "\n"
    files["README.md"] = record_text.readme(facts, changes, ablation, record, patch, logs)
    files["pr.md"] = record_text.pr_body(facts, changes, ablation, record, folder)
    return files


def _log_text(r: RunResult) -> str:
    path = Path(r.log) if r.log and "\n" not in r.log else None
    if path is not None and path.is_file():
        return path.read_text(errors="replace")
    return r.log or "(no log kept)"


# -- numbers -----------------------------------------------------------------------------------


def statistics(paired: Paired, kind: str, target_loss: float, budget: str = "") -> dict[str, Any]:
    """The speed-up over the pairs, per-side moments and the speedrun's t-test of the final losses."""
    obs = paired.obs(kind, target_loss)
    sp = judge.speedup(kind, target_loss, obs, budget=budget)
    gains, _ = judge.gains(kind, obs)
    out: dict[str, Any] = {"target_loss": target_loss, "speedup_text": sp.text(), "speedup": sp.to_dict(),
                           "paired_pvalue": judge.pvalue(gains) if len(gains) >= 2 else None,
                           "lost_pairs": paired.lost, "untrusted_runs": paired.untrusted,
                           "pairs": [{"seed": c.seed, "candidate": co.value, "candidate_censored": co.censored,
                                      "baseline": bo.value, "baseline_censored": bo.censored}
                                     for c, (co, bo) in zip(paired.candidate, obs, strict=False)]}
    for side, rs in (("candidate", paired.candidate), ("baseline", paired.base)):
        losses, times = [r.final.val_loss for r in rs], [r.final.train_ms for r in rs]
        out[side] = {"seeds": [r.seed for r in rs], "val_loss": losses, "train_ms": times,
                     "mean_val_loss": mean(losses) if losses else None,
                     "std_val_loss": stdev(losses) if len(losses) >= 2 else None,
                     "mean_train_ms": mean(times) if times else None,
                     "std_train_ms": stdev(times) if len(times) >= 2 else None}
    out["p_value"] = judge.speedrun_pvalue(out["candidate"]["val_loss"], target_loss)
    return out


def _confirmation(db: RunsDB, commit: str) -> str:
    """The search's own verdict, for context only: its confirm runs selected the candidate, so no
    number of theirs enters the record."""
    for t in sorted(db.trials(), key=lambda t: -t.number):
        if t.commit == commit and t.fidelity == "confirm" and t.attrs.get("verdict") and t.proposer != "replay":
            alpha = t.attrs.get("alpha")
            at = f" at alpha {alpha:.3g}" if isinstance(alpha, int | float) else ""
            return f"The search's confirmation (its own runs, not counted here): {t.attrs['verdict']}{at}."
    return "The search did not confirm it; these replay numbers are the only evidence."


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
