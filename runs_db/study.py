"""Study: the Optuna side of the runs database, one trial per candidate evaluation.

Only plain JSON goes into user attrs (no NaN, no objects) so `optuna-dashboard` opens the
storage as is. The study minimises: the objective is a time, a step count or a loss. What a
person reads in optuna-dashboard is the view beside it, one trial per candidate
(`<study>-candidates`, runs_db.dashboard); this study is what the loop resumes from.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib.util
import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from search_space.records import RunResult, Status

# Keys RunsDB owns in every trial's user attrs; anything else a caller passes is kept as given.
CORE_KEYS = ("commit", "parent", "proposer", "model", "title", "fidelity")
STATE_PREFIX = "state:"  # study user attrs holding RunsDB.get_state/set_state values
STATES = {"complete": TrialState.COMPLETE, "fail": TrialState.FAIL, "pruned": TrialState.PRUNED}
# The layout of what a search writes (trial attrs, state keys); in the study's user attrs under SCHEMA_KEY.
# 1: before it was recorded. 2: one Trial per candidate: `next`, `verdict`, `won`, `arm`, `score`,
#    `speedup_text`, confirm's paired baseline trials (`pairs_for`), the online FDR state.
SCHEMA_VERSION, SCHEMA_KEY = 2, "schema"
# Studies a search makes beside its own, named after it: the knobs sampler's (agent/runner.py) and
# the candidate view (runs_db/dashboard.py SUFFIX).
COMPANIONS = ("-knobs", "-candidates")


class StudyError(RuntimeError):
    """A study that cannot be created, found or updated; the message says which and why."""


class SchemaError(ValueError):
    """A search written by another version of speedsearch than this one can continue."""


def jsonable(value: Any) -> Any:
    """`value` as plain JSON: non-finite floats become None, tuples lists, paths and enums strings."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return str(value)


# Optuna writes one user attr in three queries, so a trial keeps few: the core keys, shown as
# columns by optuna-dashboard, plus one JSON object written at start (INFO) and one at the end (RESULT).
CORE = ("commit", "parent", "proposer", "model", "title", "fidelity")
INFO, RESULT = "info", "result"


@dataclass(frozen=True)
class TrialRecord:
    """One evaluation of one candidate at one fidelity, as the search loop sees it."""

    number: int
    commit: str
    parent: str | None
    proposer: str
    model: str | None
    title: str
    state: str  # "running" | "complete" | "fail" | "pruned" | "waiting"
    value: float | None
    fidelity: str
    attrs: dict[str, Any] = field(default_factory=dict)  # every user attr, the core keys included

    @property
    def runs(self) -> list[dict[str, Any]]:
        """The per-seed summaries: seed, status, val_loss, train_ms, steps, wall_s, reason."""
        return list(self.attrs.get("runs", []))

    @property
    def reason(self) -> str:
        return str(self.attrs.get("fail_reason") or self.attrs.get("reason") or "")

    def note_lines(self) -> list[str]:
        """This trial as lines of the commit's git note."""
        head = f"trial {self.number} [{self.fidelity}] {self.state}"
        head += f" value={self.value:.6g}" if self.value is not None else ""
        head += f" proposer={self.proposer}" + (f" model={self.model}" if self.model else "")
        lines = [head + (f": {self.reason[:200]}" if self.state != "complete" and self.reason else "")]
        for r in self.runs:
            loss, ms = r.get("val_loss"), r.get("train_ms")
            lines.append(f"  seed {r.get('seed')} {r.get('status')}"
                         + (f" val_loss={loss:.4f}" if loss is not None else "")
                         + (f" train_ms={ms:.0f}" if ms is not None else ""))
        return lines

    @classmethod
    def from_frozen(cls, t: FrozenTrial) -> TrialRecord:
        a = {**t.user_attrs.get(INFO, {}), **t.user_attrs.get(RESULT, {}),
             **{k: v for k, v in t.user_attrs.items() if k not in (INFO, RESULT)}}
        return cls(
            number=t.number,
            commit=a.get("commit", ""),
            parent=a.get("parent"),
            proposer=a.get("proposer", ""),
            model=a.get("model"),
            title=a.get("title", ""),
            state=t.state.name.lower(),
            value=t.value if t.state == TrialState.COMPLETE else None,
            fidelity=a.get("fidelity", ""),
            attrs=dict(a),
        )


class Study:
    """One Optuna study in an RDB storage (a SQLite file or a PostgreSQL database)."""

    def __init__(self, storage_url: str, name: str, *, create: bool = False):
        self.url, self.name = storage_url, name
        if create and storage_url.startswith("sqlite:///"):
            _new_sqlite_file(Path(storage_url[len("sqlite:///"):]))
        # A server that is gone answers within seconds, not at the TCP timeout; a connection
        # that dropped while idle is replaced rather than failing the next write.
        engine_kwargs = ({"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
                         if storage_url.startswith("postgres") else None)
        try:
            self.storage = optuna.storages.RDBStorage(driver_url(storage_url), engine_kwargs=engine_kwargs)
            if storage_url.startswith("sqlite"):
                _fast_sqlite(self.storage.engine)
        except Exception as e:  # sqlalchemy and driver errors: say which storage, in one line
            reason = getattr(e, "orig", None) or e
            first = (str(reason).strip().splitlines() or [type(reason).__name__])[0]
            raise StudyError(f"storage {redact(storage_url)}: cannot open: {first}") from e
        try:
            if create:
                self.study = optuna.create_study(storage=self.storage, study_name=name, direction="minimize")
            else:
                self.study = optuna.load_study(study_name=name, storage=self.storage)
        except optuna.exceptions.DuplicatedStudyError:
            self.close()
            raise StudyError(f"study {name!r} already exists in {redact(storage_url)}; "
                             "give this search another --study-name, or resume that search") from None
        except KeyError:
            self.close()
            raise StudyError(f"study {name!r} not found in {redact(storage_url)}") from None
        self._id = self.study._study_id
        self._results: set[int] = set()  # trials given a RESULT attr by this process

    def close(self) -> None:
        self.storage.remove_session()
        self.storage.engine.dispose()

    def delete(self) -> None:
        """This study and the ones made beside it (the knobs sampler's, the candidate view), so a
        discarded search leaves its name free in a shared database."""
        optuna.delete_study(study_name=self.name, storage=self.storage)
        for suffix in COMPANIONS:
            try:
                optuna.delete_study(study_name=self.name + suffix, storage=self.storage)
            except KeyError:  # never made
                pass

    # -- trials ------------------------------------------------------------------------------

    def ask(self, attrs: dict[str, Any], params: dict[str, Any] | None = None,
            distributions: dict[str, BaseDistribution] | None = None) -> int:
        """A new RUNNING trial with `attrs` as user attrs; `params` (knob values) are recorded
        against `distributions` so the dashboard and samplers see them. One transaction: the
        trial is created from a template, with no sampler involved."""
        params = params or {}
        missing = [name for name in params if not distributions or name not in distributions]
        if missing:
            raise StudyError(f"param {missing[0]!r}: no distribution given")
        template = FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.datetime.now(),
            datetime_complete=None, params=params,
            distributions={name: distributions[name] for name in params} if distributions else {},
            user_attrs={**{k: jsonable(attrs.get(k)) for k in CORE},
                        INFO: jsonable({k: v for k, v in attrs.items() if k not in CORE})}, system_attrs={},
            intermediate_values={}, trial_id=-1)
        return self.storage.get_trial_number_from_id(self.storage.create_new_trial(self._id, template_trial=template))

    def set_attrs(self, number: int, attrs: dict[str, Any]) -> None:
        """A trial's result attrs, written once, as it ends (merged with earlier ones if any)."""
        tid = self._trial_id(number)
        old = self.storage.get_trial_user_attrs(tid).get(RESULT, {}) if self._has_result(tid) else {}
        self._set_attrs(tid, {RESULT: {**old, **attrs}})

    def _has_result(self, tid: int) -> bool:
        return tid in self._results

    def _mark_result(self, tid: int) -> None:
        self._results.add(tid)

    def tell(self, number: int, value: float | None, state: str) -> None:
        if state not in STATES:
            raise StudyError(f"state {state!r}: use one of {', '.join(STATES)}")
        values = [value] if state == "complete" else None
        try:
            if not self.storage.set_trial_state_values(self._trial_id(number), STATES[state], values):
                raise RuntimeError("the storage refused the state change")
        except (ValueError, RuntimeError) as e:  # e.g. the trial is already finished
            raise StudyError(f"trial {number}: cannot finish as {state}: {e}") from e

    def trial(self, number: int) -> FrozenTrial:
        return self.storage.get_trial(self._trial_id(number))

    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    # -- study-level state -------------------------------------------------------------------

    def get_state(self, key: str, default: Any = None) -> Any:
        attrs = self.storage.get_study_user_attrs(self._id)
        return attrs.get(STATE_PREFIX + key, default)

    def set_state(self, key: str, value: Any) -> None:
        clean = jsonable(value)
        json.dumps(clean)
        self.storage.set_study_user_attr(self._id, STATE_PREFIX + key, clean)

    def set_user_attr(self, key: str, value: Any) -> None:
        self.storage.set_study_user_attr(self._id, key, jsonable(value))

    @property
    def user_attrs(self) -> dict[str, Any]:
        return self.storage.get_study_user_attrs(self._id)

    @property
    def schema(self) -> int:
        """The schema version the search was written with (1 when it predates versions)."""
        v = self.user_attrs.get(SCHEMA_KEY, 1)
        return v if isinstance(v, int) else 1

    # -- helpers -----------------------------------------------------------------------------

    def _trial_id(self, number: int) -> int:
        try:
            return self.storage.get_trial_id_from_study_id_trial_number(self._id, number)
        except KeyError:
            raise StudyError(f"trial {number}: not in study {self.name!r}") from None

    def _set_attrs(self, tid: int, attrs: dict[str, Any]) -> None:
        """All attrs in one transaction (Optuna's public API commits once per attr, ~3 ms each)."""
        clean = {str(k): jsonable(v) for k, v in attrs.items()}
        try:
            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session

            batch = self.storage._set_trial_attr_without_commit
        except (ImportError, AttributeError):  # another Optuna: fall back to the public API
            for key, value in clean.items():
                self.storage.set_trial_user_attr(tid, key, value)
            return
        with _create_scoped_session(self.storage.scoped_session, True) as session:
            for key, value in clean.items():
                batch(session, models.TrialUserAttributeModel, tid, key, value)
        if RESULT in clean:
            self._mark_result(tid)


def summarise_runs(results: list[RunResult]) -> dict[str, Any]:
    """Per-seed results, small enough for user attrs: final loss and time, status, reason."""
    runs = []
    for r in sorted(results, key=lambda r: r.seed):
        f = r.final
        runs.append({"seed": r.seed, "status": r.status.value, "fidelity": r.fidelity,
                     "val_loss": f.val_loss if f else None, "train_ms": f.train_ms if f else None,
                     "steps": f.step if f else None, "wall_s": r.wall_s, "reason": r.reason[:300]})
    ok = [x for x in runs if x["status"] == Status.OK.value and x["val_loss"] is not None]
    out: dict[str, Any] = {"runs": runs, "seeds": [x["seed"] for x in runs], "n_ok": len(ok)}
    if ok:
        out["mean_val_loss"] = sum(x["val_loss"] for x in ok) / len(ok)
        out["mean_train_ms"] = sum(x["train_ms"] for x in ok) / len(ok)
    return out


def _new_sqlite_file(path: Path) -> None:
    """A new database file starts in WAL mode, so creating Optuna's tables costs no fsyncs."""
    if path.exists() or not path.parent.is_dir():
        return
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def _fast_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """Write-ahead log, synced at checkpoints: a commit per user attr would otherwise cost an
    fsync each (~10 ms). An application crash loses nothing; a power cut may lose the last
    commits, never the file."""

    def on_connect(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    sqlalchemy.event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections opened before the listener reconnect with it


def driver_url(url: str) -> str:
    """`url` with a PostgreSQL driver that is installed: SQLAlchemy 2.1 reads a bare
    postgresql:// as psycopg 3, while psycopg2-binary is what most installs have."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}"


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
    return url
