"""The candidate view: the search told as one Optuna trial per candidate, for optuna-dashboard.

The loop's study (runs_db.study) keeps one trial per rung, as resuming needs; opened in
optuna-dashboard it mixes fidelities and has no params. The view is a second study in the same
storage, `<study>-candidates`, derived from the loop's:

- one trial per candidate of the search (the base, its re-measures and replays are not candidates);
- params: the knob values in the candidate's tree, every knob of the target with its
  distribution (widened when an edit put a value outside the range), so the dashboard's
  parameter plots compare candidates;
- intermediate values: the one speed-up (judge.Speedup's estimate) at each rung that measured
  it, step 1 short, 2 full, 3 confirm;
- value and state: COMPLETE, with the confirmed speed-up, only for a candidate the sequential test
  confirmed; FAIL when its runs broke (crash, timeout, invalid); PRUNED for every other ending
  (slower at a rung, stopped by the band, rejected by confirm, never confirmed). So the
  dashboard's best trial is the search's best confirmed candidate, and no unconfirmed or
  single-seed number competes with it.

The direction follows the objective: maximize the ratio base / candidate (time_to_target,
steps_to_target); minimize loss_at_budget's difference candidate - base.

Derived data: the first write of a process brings the view up to the loop's study (`sync`), so a
search made before the view existed, or one that crashed between the two writes, catches up on
resume. A candidate that reached `full` also gets its plot (runs_db.plots) when it ends, drawn in
a child process during a search (runs_db/plot_queue.py).
"""

from __future__ import annotations

import ast
import datetime
import json
import logging
import math
import subprocess
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from runs_db.plot_queue import FULL_LENGTH, PlotQueue, draw
from runs_db.study import TrialRecord, jsonable
from search_space.knobs import KNOBS_FILE, Knob, read_constant

if TYPE_CHECKING:
    from runs_db.db import RunsDB

log = logging.getLogger(__name__)

SUFFIX = "-candidates"
STEPS = {"short": 1, "full": 2, "confirm": 3}  # the rungs that measure a speed-up, as intermediate steps
BROKEN = ("failed", "timeout", "invalid")  # a run status that ends the candidate's view trial as FAIL
PASS = "pass"  # agent.names.Verdict.PASS (runs_db never imports agent)
MINIMIZED = ("loss_at_budget",)  # objectives whose speed-up is a difference, lower is better
CORE = ("commit", "parent", "proposer", "model", "title")


def view_name(study_name: str) -> str:
    return study_name + SUFFIX


def about(study_name: str, objective: str) -> dict[str, Any]:
    """What the view's study says of itself (a study user attr the dashboard shows)."""
    what = ("base / candidate, > 1 is faster" if objective not in MINIMIZED
            else "candidate - base final loss, < 0 is better")
    return {"of": study_name, "objective": objective, "value": f"the confirmed speed-up ({what})",
            "steps": {str(v): k for k, v in STEPS.items()},
            "states": "COMPLETE: confirmed; FAIL: its runs broke; PRUNED: any other ending; RUNNING: on the ladder"}


class CandidateView:
    """The view of one search. `start` (a candidate's rung starts) and `rung_ended` (a rung's
    study trial finished) are idempotent: a resumed search may repeat them."""

    def __init__(self, db: RunsDB, knobs: Iterable[Knob], objective: str, proposers: Iterable[str]):
        self.db, self.knobs, self.objective = db, tuple(knobs), objective
        self.proposers = frozenset(str(p) for p in proposers)
        self.name = view_name(db.study_name)
        self.storage = db.study.storage  # the loop's own: no second connection pool to close
        self._study_id: int | None = None
        self._trials: dict[str, tuple[int, bool]] = {}  # commit -> (view trial id, finished)
        self.dirty = True  # sync before the next write (set again when a write failed)
        self.plots: PlotQueue | None = None  # drawn here, or by a child process (runs_db/plot_queue.py)

    @property
    def direction(self) -> StudyDirection:
        return StudyDirection.MINIMIZE if self.objective in MINIMIZED else StudyDirection.MAXIMIZE

    def study_id(self) -> int:
        if self._study_id is None:
            try:
                self._study_id = self.storage.create_new_study([self.direction], self.name)
                self.storage.set_study_user_attr(self._study_id, "speedsearch",
                                                 about(self.db.study_name, self.objective))
                # The loop's study points at it: that is the one to read in optuna-dashboard.
                self.db.study.set_user_attr("candidates", f"study {self.name}: one trial per candidate")
            except optuna.exceptions.DuplicatedStudyError:
                self._study_id = self.storage.get_study_id_from_name(self.name)
        return self._study_id

    # -- what the loop tells it ------------------------------------------------------------

    def start(self, commit: str, parent: str | None, proposer: str, title: str, model: str | None) -> None:
        if proposer not in self.proposers or commit == self.db.base_commit:
            return
        self._ready()
        if commit not in self._trials:
            self._create(commit, {"commit": commit, "parent": parent or None, "proposer": proposer,
                                  "model": model, "title": title}, {}, None)

    def rung_ended(self, rec: TrialRecord, trials: list[TrialRecord] | None = None) -> None:
        if rec.proposer not in self.proposers or rec.commit == self.db.base_commit:
            return
        self._ready()
        if rec.commit not in self._trials:  # its start was never seen here: rebuild it whole
            self.sync()
            return
        tid, finished = self._trials[rec.commit]
        if finished:
            return
        if (value := measured(rec)) is not None:
            self.storage.set_trial_intermediate_value(tid, STEPS[rec.fidelity], value)
        if (end := ending(rec)) is not None:
            state, value = end
            for key, v in self._end_attrs(rec, trials).items():
                self.storage.set_trial_user_attr(tid, key, v)
            self.storage.set_trial_state_values(tid, state, None if value is None else [value])
            self._trials[rec.commit] = (tid, True)

    # -- catching up -----------------------------------------------------------------------

    def sync(self) -> int:
        """Bring the view up to the loop's study: a trial for every candidate it lacks, the
        missing rungs and ending of those still running. Returns how many trials it wrote."""
        sid = self.study_id()
        have: dict[str, FrozenTrial] = {}
        for t in self.storage.get_all_trials(sid, deepcopy=False):
            if t.user_attrs.get("commit"):
                have[t.user_attrs["commit"]] = t
        self._trials = {c: (t._trial_id, t.state.is_finished()) for c, t in have.items()}
        base = self.db.base_commit
        by_commit: dict[str, list[TrialRecord]] = {}
        trials = self.db.trials()
        for rec in trials:
            if rec.proposer in self.proposers and rec.commit and rec.commit != base:
                by_commit.setdefault(rec.commit, []).append(rec)
        wrote = 0
        for commit, recs in by_commit.items():
            recs.sort(key=lambda r: r.number)
            old = have.get(commit)
            if old is None:
                first, last = recs[0], recs[-1]
                steps = {STEPS[r.fidelity]: v for r in recs if (v := measured(r)) is not None}
                self._create(commit, {k: first.attrs.get(k) for k in CORE}, steps, last, trials)
                wrote += 1
            elif not old.state.is_finished():
                self.dirty = False
                for rec in recs:
                    self.rung_ended(rec, trials)
                wrote += 1
        self.dirty = False
        return wrote

    def _ready(self) -> None:
        if self.dirty:
            self.sync()

    # -- writing ---------------------------------------------------------------------------

    def _create(self, commit: str, core: dict[str, Any], steps: dict[int, float], last: TrialRecord | None,
                trials: list[TrialRecord] | None = None) -> None:
        """One view trial in one transaction: RUNNING, or already ended when `last` holds a verdict."""
        params, dists, outside = self._params(commit)
        attrs = {k: jsonable(core.get(k)) for k in CORE}
        if outside:
            attrs["knobs_outside"] = outside
        end = ending(last) if last is not None else None
        state, value = end if end is not None else (TrialState.RUNNING, None)
        if end is not None:
            attrs.update(self._end_attrs(last, trials))
        now = datetime.datetime.now()
        template = FrozenTrial(number=-1, state=state, value=value, datetime_start=now,
                               datetime_complete=now if end is not None else None, params=params,
                               distributions=dists, user_attrs=attrs, system_attrs={},
                               intermediate_values=steps, trial_id=-1)
        tid = self.storage.create_new_trial(self.study_id(), template_trial=template)
        self._trials[commit] = (tid, end is not None)

    def _end_attrs(self, rec: TrialRecord, trials: list[TrialRecord] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"verdict": rec.attrs.get("verdict"), "rung": rec.fidelity, "trial": rec.number}
        if rec.attrs.get("speedup_text"):
            out["speedup"] = rec.attrs["speedup_text"]
        if rec.attrs.get("verdict") != PASS and rec.reason:
            out["reason"] = rec.reason[:300]
        if rec.fidelity in FULL_LENGTH:  # it reached full: its runs against the base's band
            if self.plots is None:
                if plot := draw(self.db, rec.commit, self.proposers, trials):
                    out["plot"] = plot
            else:  # where the child process draws it (an ended trial's attrs cannot change after)
                self.plots.submit(rec.commit)
                out["plot"] = str(self.db.artifacts.candidate_plot_path(rec.commit).relative_to(self.db.dir))
        return out

    def _params(self, commit: str) -> tuple[dict[str, Any], dict[str, BaseDistribution], dict[str, str]]:
        if not self.knobs:
            return {}, {}, {}
        paths = {k.file for k in self.knobs if k.via == "constant"} | {KNOBS_FILE}
        try:
            files = tree_files(self.db.repo_path, commit, paths)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("candidate %s: knob values not read: %s", commit[:12], e)
            return {}, {}, {}
        params, dists, outside = {}, {}, {}
        for knob, value in knob_values(files, self.knobs).items():
            got = as_param(knob, value)
            if got is None:
                outside[knob.name] = str(value)[:100]
            else:
                params[knob.name], dists[knob.name] = got
        return params, dists, outside


# -- one candidate's numbers, from its study trials -----------------------------------------

def measured(rec: TrialRecord) -> float | None:
    """The speed-up a rung's trial measured (None: smoke, or nothing measured)."""
    d = rec.attrs.get("speedup_detail")
    if rec.fidelity not in STEPS or not isinstance(d, dict):
        return None
    est = d.get("estimate")
    return float(est) if isinstance(est, int | float) and math.isfinite(est) else None


def ending(rec: TrialRecord) -> tuple[TrialState, float | None] | None:
    """How the candidate's view trial ends, once its last rung holds the verdict; else None."""
    verdict = rec.attrs.get("verdict")
    if not verdict:
        return None
    if verdict == PASS and (value := measured(rec)) is not None:
        return TrialState.COMPLETE, value
    status = str(rec.attrs.get("status") or "ok")
    return (TrialState.FAIL if status in BROKEN else TrialState.PRUNED), None


# -- knob values in a tree -----------------------------------------------------------------

def tree_files(repo: Path, commit: str, paths: Iterable[str]) -> dict[str, str]:
    """`paths` of `commit` (those that exist), through a `git cat-file` process of its own: the
    view writes from the recorder's thread, and the loop's GitPython handle is not thread-safe."""
    paths = sorted(set(paths))
    query = "".join(f"{commit}:{p}\n" for p in paths).encode()
    out = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch"], input=query, capture_output=True,
                         check=True, timeout=60).stdout
    files: dict[str, str] = {}
    pos = 0
    for p in paths:
        nl = out.index(b"\n", pos)
        head, pos = out[pos:nl].split(), nl + 1
        if len(head) == 3 and head[1] == b"blob":
            size = int(head[2])
            files[p] = out[pos:pos + size].decode("utf-8", errors="replace")
            pos += size + 1
    return files


def knob_values(files: dict[str, str], knobs: Iterable[Knob]) -> dict[Knob, Any]:
    """Each knob's value in a tree: a constant's literal in its file, an env or flag knob's entry
    in KNOBS_FILE. Left out: a constant that is not a plain literal, an env or flag knob the
    tree does not set (its default lives in the trainer)."""
    try:
        routed = json.loads(files.get(KNOBS_FILE) or "{}")
    except ValueError:
        routed = {}
    out: dict[Knob, Any] = {}
    for knob in knobs:
        if knob.via == "constant":
            raw = read_constant(files.get(knob.file, ""), knob.target_key)
            try:
                out[knob] = ast.literal_eval(raw) if raw is not None else None
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
            if out[knob] is None:
                del out[knob]
        elif isinstance(routed, dict) and knob.name in routed:
            out[knob] = routed[knob.name]
    return out


def as_param(knob: Knob, value: Any) -> tuple[Any, BaseDistribution] | None:
    """`value` with a distribution that holds it: the knob's own, or the same widened to reach a
    value an edit put outside the range (same step and scale, so the dashboard merges the two).
    None when it cannot be one (a string for a float knob, a choice not offered)."""
    dist = knob.distribution()
    if isinstance(dist, CategoricalDistribution):
        return (value, dist) if value in dist.choices else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if isinstance(dist, IntDistribution):
        if value != int(value):
            return None
        value = int(value)
    else:
        value = float(value)
    assert isinstance(dist, IntDistribution | FloatDistribution)
    if dist.low <= value <= dist.high:
        return value, dist
    if dist.log and value <= 0:
        return None
    low, high = min(dist.low, value), max(dist.high, value)
    if isinstance(dist, IntDistribution):
        return value, IntDistribution(int(low), int(high), log=dist.log, step=dist.step)
    return value, FloatDistribution(low, high, log=dist.log, step=dist.step)


# -- which searches write a view -----------------------------------------------------------

_VIEWS: weakref.WeakKeyDictionary[Any, CandidateView] = weakref.WeakKeyDictionary()


def attach(db: RunsDB, knobs: Iterable[Knob], objective: str, proposers: Iterable[str]) -> CandidateView:
    """Make `db`'s writes through agent.recorder keep its view; nothing is written until then."""
    view = _VIEWS[db] = CandidateView(db, knobs, objective, proposers)
    view.plots = PlotQueue(db.dir, view.proposers)  # a search: its plots are drawn off its threads
    return view


def finish(db: RunsDB, timeout: float = 300.0) -> int:
    """The search's end: wait for the plots still being drawn; how many were given up."""
    view = _VIEWS.get(db)
    return view.plots.drain(timeout) if view is not None and view.plots is not None else 0


def view_of(db: RunsDB) -> CandidateView | None:
    return _VIEWS.get(db)
