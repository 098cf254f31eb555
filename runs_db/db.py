"""RunsDB: the one door to what happened in a search (Optuna study + git history + artifacts).

A search lives in one folder D:

    D/search.toml   the launch settings, plus a [runs_db] table (storage, study name, base)
    D/study.db      the Optuna study (SQLite), unless settings name another storage URL
    D/repo/         git: the target's base tree is the root commit, candidates are commits
    D/artifacts/    per trial: run logs, run JSON, loss-curve plots
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import psutil
from optuna.distributions import BaseDistribution

from runs_db.artifacts import Artifacts
from runs_db.history import Candidate, History, snapshot
from runs_db.study import (
    SCHEMA_KEY,
    SCHEMA_VERSION,
    STATES,
    SchemaError,
    Study,
    StudyError,
    TrialRecord,
    driver_url,
    summarise_runs,
)
from search_space.records import RunResult, Status
from search_space.target import Target

log = logging.getLogger(__name__)

SETTINGS_FILE, STUDY_FILE, REPO_DIR, ARTIFACTS_DIR = "search.toml", "study.db", "repo", "artifacts"
META_KEY = "runs_db"  # the table of search.toml that RunsDB owns
DEFAULT_STUDY = "speedsearch"
BASELINE = "baseline"  # the proposer name of the base's own runs


_SHA = re.compile(r"[0-9a-f]{40}")


class SearchExistsError(FileExistsError):
    """The folder already holds a search: resume it with RunsDB.open, or pick another folder."""


class RunsDB:
    """Use RunsDB.create(...) for a new search, RunsDB.open(dir) to resume one; close() when done."""

    def __init__(self, dir: Path, settings: dict[str, Any], meta: dict[str, Any], study: Study,
                 history: History):
        self.dir, self.settings, self.meta = Path(dir), settings, meta
        self.study, self.history = study, history
        self.artifacts = Artifacts(self.dir / ARTIFACTS_DIR)
        self._owner = {"host": socket.gethostname(), "pid": os.getpid(), "session": uuid.uuid4().hex,
                       "since": time.time()}
        self._closed = False
        self._by_commit: dict[str, list[int]] | None = None  # commit -> its trial numbers (for notes)
        self._finished: dict[int, TrialRecord] = {}
        # Drawing costs about half a second a trial; `plots = false` in the settings skips it.
        self.auto_plot = bool(settings.get("plots", True))

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def create(cls, dir: str | Path, settings: dict[str, Any], target: Target,
               storage: str | None = None) -> RunsDB:
        """A new search in `dir`: snapshot the target's base tree as the root commit, make the study.

        `storage` is an RDB URL (postgresql://...) shared with others; default a SQLite file in
        `dir`. Raises SearchExistsError when `dir` already holds a search.
        """
        d = Path(dir).resolve()
        for name in (SETTINGS_FILE, STUDY_FILE, REPO_DIR):
            if (d / name).exists():
                raise SearchExistsError(f"{d} already holds a search ({name} exists); resume it instead")
        settings = {k: v for k, v in settings.items() if k != META_KEY}
        name = str(settings.get("study_name") or DEFAULT_STUDY)
        files, source_commit = snapshot(target.repo, target.base_ref)
        if not files:
            raise ValueError(f"target {target.name}: {target.repo} has no files to snapshot")
        d.mkdir(parents=True, exist_ok=True)
        created: list[Path] = []
        study = history = None
        try:
            created.append(d / STUDY_FILE)
            study = Study(storage or _sqlite_url(d), name, create=True)
            created.append(d / REPO_DIR)
            origin = f"{target.repo}@{target.base_ref}" + (f" ({source_commit})" if source_commit else "")
            history = History.create(d / REPO_DIR, files, f"Base: {target.name}\n\nSnapshot of {origin}.\n")
            meta = {"study_name": name, "base_commit": history.base_commit, "target": target.name,
                    "target_repo": str(target.repo), "base_ref": target.base_ref,
                    "source_commit": source_commit, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if storage:
                meta["storage"] = storage
            study.set_user_attr("speedsearch", {k: v for k, v in meta.items() if k != "storage"})
            study.set_user_attr(SCHEMA_KEY, SCHEMA_VERSION)
            (d / ARTIFACTS_DIR).mkdir(exist_ok=True)
            # Written last: a folder with search.toml is a complete search.
            (d / SETTINGS_FILE).write_text(dumps_toml({**settings, META_KEY: meta}))
        except BaseException:
            if study is not None:
                if storage:
                    study.delete()
                study.close()
            if history is not None:
                history.close()
            for p in created:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            raise
        return cls(d, settings, meta, study, history)

    @classmethod
    def open(cls, dir: str | Path) -> RunsDB:
        """Resume the search in `dir`; everything needed is in its search.toml."""
        d = Path(dir).resolve()
        path = d / SETTINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no {SETTINGS_FILE}; not a search folder (RunsDB.create makes one)")
        raw = tomllib.loads(path.read_text())
        meta = raw.pop(META_KEY, {})
        study = Study(meta.get("storage") or _sqlite_url(d), meta.get("study_name", DEFAULT_STUDY))
        try:
            history = History(d / REPO_DIR)
        except BaseException:
            study.close()
            raise
        return cls(d, raw, meta, study, history)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.history.close()
            self.study.close()

    def __enter__(self) -> RunsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def storage_url(self) -> str:
        """The study's storage URL, with an installed PostgreSQL driver named: usable as is by
        optuna.create_study and optuna-dashboard."""
        return driver_url(self.study.url)

    @property
    def study_name(self) -> str:
        return self.study.name

    @property
    def schema(self) -> int:
        return self.study.schema

    def check_schema(self) -> None:
        """Raise SchemaError (one line) unless this version can continue the search. Reading it
        (status, show, replay) works for every version; only continuing it is refused."""
        if self.schema == SCHEMA_VERSION:
            return
        made = "an older" if self.schema < SCHEMA_VERSION else "a newer"
        raise SchemaError(f"{self.dir} was made by {made} speedsearch (runs-database schema {self.schema}, this one "
                          f"writes {SCHEMA_VERSION}): it cannot be resumed; `speedsearch status` still reads it, "
                          "start a new search folder to search again")

    @property
    def base_commit(self) -> str:
        return self.meta.get("base_commit") or self.history.base_commit

    @property
    def repo_path(self) -> Path:
        return self.dir / REPO_DIR

    # -- candidates (git) --------------------------------------------------------------------

    def files(self, commit: str, paths: list[str] | None = None) -> dict[str, str]:
        return self.history.files(commit, paths)

    def ls(self, commit: str) -> list[str]:
        return self.history.ls(commit)

    def diff(self, commit: str, against: str | None = None) -> str:
        return self.history.diff(commit, against)

    def message(self, commit: str) -> str:
        return self.history.message(commit)

    def lineage(self, commit: str) -> list[str]:
        return self.history.lineage(commit)

    def flush(self) -> None:
        """Wait for the git notes being written in the background (close() does too)."""
        self.history.flush_notes()

    def note(self, commit: str) -> str:
        return self.history.note(commit)

    def resolve(self, rev: str) -> str:
        return self.history.resolve(rev)

    def commit_candidate(self, parent: str, changes: dict[str, str | None], title: str, rationale: str,
                         proposer: str, model: str | None = None, *,
                         history: History | None = None) -> tuple[str, bool]:
        """Commit `changes` (path -> text, None deletes) on `parent`: (commit, created_new).

        The same resulting tree as an existing candidate returns that candidate, created_new False.
        `history`: another History of this repo to write with, a committer thread's own, since
        GitPython's Repo is not shared across threads.
        """
        title = " ".join(title.split()) or "untitled change"
        trailers = f"Proposer: {proposer}" + (f"\nModel: {model}" if model else "")
        body = rationale.strip()
        message = f"{title}\n\n{body}\n\n{trailers}\n" if body else f"{title}\n\n{trailers}\n"
        commit, created = (history or self.history).commit(parent, changes, message, title)
        if not created:
            log.info("%r: same tree as candidate %s; reusing it", title, commit[:12])
        return commit, created

    def candidates(self) -> list[Candidate]:
        """Every candidate but the base, oldest first: (commit, parent, title, proposer)."""
        return self.history.candidate_list()

    def create_branch(self, name: str, commit: str) -> str:
        return self.history.create_branch(name, commit)

    # -- trials (Optuna) ---------------------------------------------------------------------

    def start_trial(self, commit: str, parent: str | None, proposer: str, title: str, fidelity: str,
                    attrs: dict[str, Any] | None = None, *, model: str | None = None,
                    params: dict[str, Any] | None = None,
                    distributions: dict[str, BaseDistribution] | None = None) -> int:
        """A RUNNING trial for `commit` at `fidelity`; returns its number.

        `parent` None means the commit's git parent. `params`/`distributions` record knob values.
        """
        # Full shas skip git: the search loop records trials from a writer thread, and git stays on its own.
        commit = commit if _SHA.fullmatch(commit) else self.history.resolve(commit)
        if parent:
            parent = parent if _SHA.fullmatch(parent) else self.history.resolve(parent)
        else:
            # self.base_commit reads search.toml: the recorder's thread must not touch GitPython
            parent = None if commit == self.base_commit else self.history.parent(commit)
        core = {"commit": commit, "parent": parent, "proposer": proposer, "model": model,
                "title": title, "fidelity": fidelity, "controller": self._owner}
        number = self.study.ask({**(attrs or {}), **core}, params, distributions)
        known = self._trials_of(commit)  # built from the study on first use: may hold `number` already
        if number not in known:
            known.append(number)
        return number

    def finish_trial(self, number: int, value: float | None, results: list[RunResult],
                     attrs: dict[str, Any] | None = None, state: str | None = None) -> None:
        """Record how trial `number` ended.

        state: "complete" (needs a value), "fail" or "pruned"; default complete when a value is
        given, fail otherwise. NaN (Optuna refuses it) turns into FAIL with the reason in the
        `fail_reason` attr; +-inf is kept (Optuna and the dashboard take it). A failure's reason
        is attrs["fail_reason"] or attrs["reason"] or the first failed run's. Unsaved runs are
        saved; per-seed summaries go in the `runs` attr; the commit's git note and (unless
        settings say `plots = false`) the trial's loss plot are refreshed.
        """
        if self.study.trial(number).state.is_finished():
            raise StudyError(f"trial {number}: already finished")
        attrs = dict(attrs or {})
        state = state or ("complete" if value is not None else "fail")
        if state not in STATES:
            raise ValueError(f"trial {number}: state {state!r} is not one of {', '.join(STATES)}")
        if state == "complete" and value is None:
            raise ValueError(f"trial {number}: state complete needs a value")
        if value is not None and math.isnan(value):
            attrs.setdefault("fail_reason", "objective is not a number (nan)")
            attrs["objective"], value, state = "nan", None, "fail"
        elif value is not None:
            attrs["objective"] = value if math.isfinite(value) else str(value)
        for r in results:
            if not self.artifacts.has_run(number, r):
                self.artifacts.save_run(number, r)
        attrs.update(summarise_runs(results))
        if state == "fail" and not attrs.get("fail_reason"):
            bad = [r for r in results if r.status != Status.OK]
            attrs["fail_reason"] = attrs.get("reason") or (bad[0].reason if bad else "") or "failed"
        self.study.set_attrs(number, attrs)
        self.study.tell(number, value, state)
        record = self.trial(number)
        self._finished[number] = record
        self._refresh_note(record.commit)
        if self.auto_plot:
            self.plot(number)

    def mark_failed(self, number: int, reason: str) -> bool:
        """End a trial that will never finish (e.g. its controller died) as FAIL; `reason` goes in
        both the `fail_reason` and `reason` attrs. False (and nothing changes) when the trial
        had already finished, so cleanup paths may call it blindly."""
        if self.study.trial(number).state.is_finished():
            return False
        self.study.set_attrs(number, {"fail_reason": reason, "reason": reason})
        self.study.tell(number, None, "fail")
        record = self._finished[number] = self.trial(number)
        self._refresh_note(record.commit)
        return True

    def trial(self, number: int) -> TrialRecord:
        return TrialRecord.from_frozen(self.study.trial(number))

    def trials(self) -> list[TrialRecord]:
        return [TrialRecord.from_frozen(t) for t in self.study.trials()]

    def completed(self, commit: str, fidelity: str) -> TrialRecord | None:
        """The latest COMPLETE trial of `commit` at `fidelity`, to reuse instead of rerunning."""
        commit = self.history.resolve(commit)
        done = [t for t in self.trials() if t.state == "complete" and t.commit == commit
                and t.fidelity == fidelity]
        return done[-1] if done else None

    def stale_running(self, other_hosts: bool = False) -> list[TrialRecord]:
        """RUNNING trials whose controller is gone: started by a process of this host that no
        longer runs (or by this process before it reopened the search). Trials started on
        other hosts count only with `other_hosts=True`: their liveness cannot be seen from here."""
        out = []
        for t in self.trials():
            if t.state != "running":
                continue
            owner = t.attrs.get("controller") or {}
            if owner.get("session") == self._owner["session"]:
                continue
            if owner.get("host") != self._owner["host"]:
                if other_hosts or not owner:
                    out.append(t)
            elif not _alive(owner.get("pid"), owner.get("since")) or owner.get("pid") == os.getpid():
                out.append(t)
        return out

    # -- runs (artifacts) --------------------------------------------------------------------

    def save_run(self, trial_number: int, result: RunResult, log_text: str | None = None) -> Path:
        """Copy the run's log into D/artifacts/trial-<n>/ and write its JSON; returns the JSON path.

        The log is `log_text` when given, else `result.log` (a log file's path, or the text)."""
        return self.artifacts.save_run(trial_number, result, log_text)

    def runs(self, trial_number: int) -> list[RunResult]:
        return self.artifacts.runs(trial_number)

    def baseline(self, fidelity: str, ok_only: bool = True) -> list[RunResult]:
        """The saved runs at `fidelity` (the runs' own fidelity) of every trial whose proposer is
        "baseline", OK ones only unless ok_only=False; running trials count, so interleaved
        seeds are there at once."""
        out = []
        for t in self.trials():
            if t.proposer == BASELINE:
                out += [r for r in self.runs(t.number) if (r.fidelity or t.fidelity) == fidelity
                        and (r.status == Status.OK or not ok_only)]
        return out

    def plot_path(self, trial_number: int, fidelity: str) -> Path:
        return self.artifacts.plot_path(trial_number, fidelity)

    def plot(self, trial_number: int) -> Path | None:
        """Draw the trial's loss curves against the baseline's (PNG in its artifacts folder).

        Returns the path, or None when there is nothing to draw or drawing failed (logged):
        a plot must never cost a result.
        """
        t = self.trial(trial_number)
        try:
            from runs_db.plots import plot_loss_curves  # matplotlib loads only when drawing

            mine = self.runs(t.number)  # a rung (e.g. confirm) may run at another fidelity's steps
            fidelity = next((r.fidelity for r in mine if r.fidelity), t.fidelity)
            base = [] if t.proposer == BASELINE else self.baseline(fidelity)
            return plot_loss_curves(mine, base, self.plot_path(t.number, t.fidelity),
                                    title=f"trial {t.number} [{t.fidelity}]: {t.title}")
        except Exception as e:
            log.warning("trial %s: loss plot failed: %s", t.number, e)
            return None

    # -- small persistent state --------------------------------------------------------------

    def get_state(self, key: str, default: Any = None) -> Any:
        return self.study.get_state(key, default)

    def set_state(self, key: str, value: Any) -> None:
        """Persist a small JSON value (non-finite floats become null) in the study's user attrs."""
        self.study.set_state(key, value)

    # -- helpers -----------------------------------------------------------------------------

    def _trials_of(self, commit: str) -> list[int]:
        if self._by_commit is None:
            self._by_commit = {}
            for t in self.trials():
                self._by_commit.setdefault(t.commit, []).append(t.number)
        return self._by_commit.setdefault(commit, [])

    def refresh_notes(self) -> None:
        """Write every commit's note again from its trials (a crash may have lost the last ones)."""
        self._trials_of(self.base_commit)  # builds the commit -> trials index
        for commit in list(self._by_commit or {}):
            self._refresh_note(commit)

    def _refresh_note(self, commit: str) -> None:
        """Rewrite the commit's note from its trials (written by a background thread)."""
        lines = []
        for number in self._trials_of(commit):
            t = self._finished.get(number) or self.trial(number)  # finished trials never change
            if t.state != "running":
                lines += t.note_lines() if lines else [f"speedsearch: {t.title}", *t.note_lines()]
        if lines:
            self.history.set_note(commit, "\n".join(lines) + "\n", wait=False)


def _sqlite_url(d: Path) -> str:
    return f"sqlite:///{d / STUDY_FILE}"


def _alive(pid: Any, since: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        proc = psutil.Process(pid)
        # A newer process under a recycled pid is not the controller that started the trial.
        return proc.create_time() <= float(since or math.inf) + 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


# -- search.toml: a small TOML writer (tomllib reads; the standard library has no writer) -----

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def dumps_toml(data: dict[str, Any]) -> str:
    """`data` as TOML. None values are left out (TOML has no null); paths and enums are strings."""
    lines: list[str] = []
    _table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(data: dict[str, Any], path: list[str], lines: list[str]) -> None:
    subtables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if path:
        lines += ["", "[" + ".".join(_key(p) for p in path) + "]"]
    for k, v in data.items():
        if v is not None and k not in subtables:
            lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in subtables.items():
        _table(v, [*path, str(k)], lines)


def _key(k: Any) -> str:
    k = str(k)
    return k if _BARE_KEY.match(k) else json.dumps(k, ensure_ascii=False)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + "}"
    if isinstance(v, (list, tuple)):
        if any(x is None for x in v):
            raise ValueError(f"TOML arrays cannot hold None: {v!r}")
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if hasattr(v, "value") and not isinstance(v, str):  # enums
        return _value(v.value)
    # JSON's string escapes are all valid in TOML basic strings.
    return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML bans a raw DEL


__all__ = ["BASELINE", "Candidate", "RunsDB", "SchemaError", "SearchExistsError", "StudyError", "TrialRecord"]
