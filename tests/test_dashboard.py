"""The candidate view (runs_db.dashboard): what optuna-dashboard shows tells the search's story.

One view trial per candidate, its knob values as params, its rungs as intermediate values, and
COMPLETE only for confirmed candidates, so the dashboard's best trial is the search's best.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from agent.live import Live
from agent.loop import Search
from agent.recorder import attach_view, record_rung, record_start
from agent.report import status_dict
from agent.runner import build_proposers, open_search
from agent.settings import SearchSettings
from env.pool import Pool
from runs_db import dashboard
from runs_db.dashboard import STEPS, view_name
from runs_db.db import RunsDB
from search_space.judge import Speedup
from search_space.knobs import KNOBS_FILE, parse_knob, read_constant
from search_space.records import Point, RunResult, Status
from search_space.target import Target, parse_target
from tests.toy import make_toy

TRAIN = "LR = 0.1\nSTEPS = 10\nprint('training', LR, STEPS)\n"
KNOBS = [{"name": "lr", "type": "float", "low": 0.01, "high": 1.0, "log": True, "via": "constant", "key": "LR",
          "file": "train.py"},
         {"name": "steps", "type": "int", "low": 5, "high": 50, "via": "constant", "key": "STEPS", "file": "train.py"},
         {"name": "warm", "type": "categorical", "choices": ["a", "b"], "via": "env", "key": "WARM"}]


def knob_target(root: Path) -> Target:
    src = root / "trainer"
    src.mkdir(parents=True)
    (src / "train.py").write_text(TRAIN)
    raw = {"name": "knobbed", "run": {"command": "python train.py --seed {seed} --steps {steps}"},
           "files": {"editable": ["train.py", KNOBS_FILE]},
           "fidelities": {"smoke": {"steps": 2}, "short": {"steps": 5}, "full": {"steps": 10}},
           "objective": {"kind": "time_to_target", "target_loss": 3.5}, "knobs": KNOBS}
    return parse_target(raw, src)


def run(seed: int, final_loss: float, train_ms: float, fidelity: str, status: Status = Status.OK) -> RunResult:
    curve = [Point(s, final_loss + 2.0 * (10 - s) / 10, train_ms * s / 10) for s in range(0, 11, 2)]
    return RunResult(status=status, reason="boom" if status != Status.OK else "",
                     curve=curve if status == Status.OK else curve[:2], total_steps=10, wall_s=1.0, seed=seed,
                     fidelity=fidelity, log=f"seed {seed}\n")


def speedup(estimate: float, pairs: int = 1) -> Speedup:
    return Speedup("time_to_target", 3.5, estimate, estimate * 0.9 if pairs > 1 else math.nan,
                   estimate * 1.1 if pairs > 1 else math.nan, pairs)


class Loop:
    """Writes what agent.loop writes, through the same recorder functions, on this thread."""

    def __init__(self, db: RunsDB):
        self.db, self.n = db, 0

    def base(self, fidelity: str) -> None:
        n = self._start(self.db.base_commit, "baseline", "baseline", fidelity)
        self.db.finish_trial(n, 1000.0, [run(0, 3.4, 1000, fidelity), run(1, 3.42, 1010, fidelity)],
                             {"target_loss": 3.5}, "complete")

    def rung(self, commit: str, who: str, title: str, fidelity: str, sp: Speedup | None = None,
             verdict: str = "", status: Status = Status.OK) -> int:
        n = self._start(commit, who, title, fidelity)
        attrs = {"speedup": sp.estimate if sp else 0.0, "speedup_text": sp.text() if sp else "",
                 "speedup_detail": sp.to_dict() if sp else None, "status": status.value,
                 "reason": "boom" if status != Status.OK else "", "next": "" if verdict else "next"}
        if verdict:
            attrs.update(verdict=verdict, won=verdict == "pass")
        runs_at = "full" if fidelity == "confirm" else fidelity
        runs = [run(s, 3.3, 1000 / (sp.estimate if sp else 1.0), runs_at, status)
                for s in ((10, 11) if fidelity == "confirm" else (0,))]
        value = 1000 / sp.estimate if sp else (math.inf if status == Status.OK else None)
        record_rung(self.db, n, value, runs, attrs, "complete" if status == Status.OK else "fail")
        return n

    def _start(self, commit: str, who: str, title: str, fidelity: str) -> int:
        n, self.n = self.n, self.n + 1
        record_start(self.db, n, commit, "", who, title, fidelity, {"rung": fidelity}, None)
        return n


def view_trials(db: RunsDB) -> dict[str, optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=view_name(db.study_name), storage=db.storage_url)
    trials = study.get_trials(deepcopy=False)
    by = {t.user_attrs["commit"]: t for t in trials}
    assert len(by) == len(trials), "a candidate has two view trials"
    return by


def story(db: RunsDB) -> dict[str, tuple]:
    """What the view says, comparable across two builds of it."""
    return {c: (t.state, t.value, t.params, dict(t.intermediate_values), t.user_attrs.get("verdict"))
            for c, t in view_trials(db).items()}


def test_view_tells_each_candidate_once(tmp_path: Path, storage_url, study_name):
    target = knob_target(tmp_path)
    with RunsDB.create(tmp_path / "s", {"study_name": study_name, "plots": False}, target,
                       storage=storage_url) as db:
        attach_view(db, target)
        loop, base = Loop(db), db.base_commit
        commit = lambda text, title, extra=None: db.commit_candidate(  # noqa: E731
            base, {"train.py": text, **(extra or {})}, title, "", "knobs")[0]
        a = commit(TRAIN.replace("0.1", "0.5"), "A: confirmed 1.30x", {KNOBS_FILE: json.dumps({"warm": "b"})})
        b = commit(TRAIN.replace("0.1", "5.0"), "B: fastest at short, never confirmed")
        c = commit(TRAIN.replace("print", "raise SystemExit; print"), "C: crashes at smoke")
        d = commit(TRAIN.replace("= 10", "= 40"), "D: confirmed 1.10x")
        e = commit(TRAIN.replace("0.1", "0.2"), "E: still climbing")
        loop.base("short")
        loop.base("full")
        for x, title in ((a, "A"), (b, "B"), (c, "C"), (d, "D"), (e, "E")):
            loop.rung(x, "knobs", title, "smoke", status=Status.FAILED if x == c else Status.OK,
                      verdict="stopped" if x == c else "")
        loop.rung(a, "knobs", "A", "short", speedup(1.5))
        loop.rung(b, "knobs", "B", "short", speedup(1.8))
        loop.rung(e, "knobs", "E", "short", speedup(1.2))
        loop.rung(a, "knobs", "A", "full", speedup(1.35))
        loop.rung(b, "knobs", "B", "full", speedup(1.6), verdict="unconfirmed")
        loop.rung(d, "knobs", "D", "short", speedup(1.1))
        loop.rung(d, "knobs", "D", "full", speedup(1.12))
        loop.rung(a, "knobs", "A", "confirm", speedup(1.30, pairs=6), verdict="pass")
        loop.rung(d, "knobs", "D", "confirm", speedup(1.10, pairs=8), verdict="pass")

        got = view_trials(db)
        assert set(got) == {a, b, c, d, e}  # the base and its re-measures are no candidates
        ta, tb, tc, td, te = (got[x] for x in (a, b, c, d, e))
        # params: the knob values in each tree (the base's where a candidate kept them)
        assert ta.params == {"lr": 0.5, "steps": 10, "warm": "b"}
        assert tb.params == {"lr": 5.0, "steps": 10}  # outside the range: kept, the range widened
        assert tb.distributions["lr"] == FloatDistribution(0.01, 5.0, log=True)
        assert td.params == {"lr": 0.1, "steps": 40}
        # intermediate values: the one speed-up at each measured rung
        assert ta.intermediate_values == {STEPS["short"]: 1.5, STEPS["full"]: 1.35, STEPS["confirm"]: 1.30}
        assert tb.intermediate_values == {1: 1.8, 2: 1.6} and tc.intermediate_values == {}
        # states: only the confirmed complete; B's better screening numbers never compete
        assert (ta.state, ta.value, td.state, td.value) == (TrialState.COMPLETE, 1.30, TrialState.COMPLETE, 1.10)
        assert (tb.state, tc.state, te.state) == (TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
        assert te.intermediate_values == {1: 1.2}
        assert tc.user_attrs["reason"] == "boom" and ta.user_attrs["verdict"] == "pass"
        best = optuna.load_study(study_name=view_name(db.study_name), storage=db.storage_url).best_trial
        assert best.user_attrs["commit"] == a == status_dict(db)["best"]["commit"]
        assert ta.user_attrs["speedup"] == speedup(1.30, pairs=6).text()
        assert view_name(db.study_name) in db.study.user_attrs["candidates"]  # the loop's study points at it
        # a plot per candidate that reached full, none for the others: drawn by a child process,
        # recorded when it is done, all of them by the search's end
        assert dashboard.finish(db) == 0
        got = view_trials(db)
        ta, tb, tc, td, te = (got[x] for x in (a, b, c, d, e))
        for x in (a, b, d):
            png = db.artifacts.candidate_plot_path(x)
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert got[x].user_attrs["plot"] == str(png.relative_to(db.dir))
        assert not db.artifacts.candidate_plot_path(c).exists() and "plot" not in tc.user_attrs
        before = story(db)

        # A crash between the two writes: the study moved on, the view did not. The next
        # process's first write catches up.
        db.finish_trial(loop._start(e, "knobs", "E", "full"), 1000 / 1.4, [run(0, 3.3, 700, "full")],
                        {"speedup_detail": speedup(1.4).to_dict(), "status": "ok", "verdict": "unconfirmed"})
        assert view_trials(db)[e].state == TrialState.RUNNING
    with RunsDB.open(tmp_path / "s") as db:
        attach_view(db, target)
        assert dashboard.view_of(db).sync() == 1
        after = view_trials(db)[e]
        assert (after.state, after.intermediate_values) == (TrialState.PRUNED, {1: 1.2, 2: 1.4})
        # A search made before the view existed: the view is built whole from the study, the same.
        optuna.delete_study(study_name=view_name(db.study_name), storage=db.storage_url)
    with RunsDB.open(tmp_path / "s") as db:
        attach_view(db, target)
        record_start(db, len(db.trials()), db.base_commit, "", "baseline", "baseline", "full", {}, None)
        assert dashboard.view_of(db).dirty  # a baseline's write leaves the view alone
        dashboard.view_of(db).sync()
        rebuilt = story(db)
    assert {k: v for k, v in rebuilt.items() if k != e} == {k: v for k, v in before.items() if k != e}
    assert rebuilt[e][:2] == (TrialState.PRUNED, None)


def test_knob_values_and_params():
    lr, steps, warm = (parse_knob(k, f"knobs[{i}]") for i, k in enumerate(KNOBS))
    files = {"train.py": "LR = 3e-2  # tuned\nSTEPS = 2 * 5\n", KNOBS_FILE: json.dumps({"warm": "c"})}
    values = dashboard.knob_values(files, (lr, steps, warm))
    assert values == {lr: 0.03, warm: "c"}  # STEPS is an expression, not a value
    assert dashboard.as_param(lr, 0.03) == (0.03, lr.distribution())
    assert dashboard.as_param(warm, "c") is None and dashboard.as_param(lr, -1.0) is None
    assert dashboard.as_param(steps, 60)[1].high == 60 and dashboard.as_param(steps, 2.5) is None
    assert read_constant(files["train.py"], "LR") == "3e-2"


# -- a real search, then the real optuna-dashboard server --------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_search_view_served_by_optuna_dashboard(ray_cluster, tmp_path: Path):
    toy = make_toy(tmp_path / "toy", gpus=1, sleep=0.02, full=20, short=10)
    settings = SearchSettings(target=str(toy.source), proposers=("ideas", "knobs"), seeds=2,
                              allow_untrusted=True, budget_trials=30, workers=4)  # 30 rungs reach confirm
    db, settings = open_search(tmp_path / "search", settings)
    with db:
        summary = Search(db, toy, settings, Pool(run_root=tmp_path / "runs"), build_proposers(settings, toy, db),
                         Live(enabled=False)).run()
    assert summary.confirmed, summary  # the toy's real improvements get confirmed
    with RunsDB.open(tmp_path / "search") as db:
        trials, view = db.trials(), view_trials(db)
        cands = {t.commit for t in trials if t.proposer in ("ideas", "knobs") and t.commit != db.base_commit}
        assert set(view) == cands  # one view trial per candidate, none for the base
        for commit, vt in view.items():
            rate = float(read_constant(db.files(commit, ["train.py"])["train.py"], "RATE"))
            assert vt.params == {"rate": rate}, (vt.params, rate)
            expect = {STEPS[t.fidelity]: t.attrs["speedup_detail"]["estimate"] for t in trials
                      if t.commit == commit and t.fidelity in STEPS and t.attrs.get("speedup_detail")}
            assert vt.intermediate_values == expect
            ended = [t for t in trials if t.commit == commit and t.attrs.get("verdict")]
            if ended and ended[-1].attrs["verdict"] == "pass":
                assert vt.state == TrialState.COMPLETE
            else:
                assert vt.state != TrialState.COMPLETE
            if ended and any(t.fidelity == "full" for t in trials if t.commit == commit):
                assert db.artifacts.candidate_plot_path(commit).is_file()
        best = max((vt for vt in view.values() if vt.state == TrialState.COMPLETE), key=lambda t: t.value)
        assert best.user_attrs["commit"] == summary.best_commit == status_dict(db)["best"]["commit"]
        assert best.value == pytest.approx(summary.best_speedup)
        assert any(len(vt.intermediate_values) >= 2 for vt in view.values())
        url, name = db.storage_url, view_name(db.study_name)

    port = free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")  # the command a user runs, of this Python
    assert exe.is_file(), f"{exe}: optuna-dashboard is not installed (pip install optuna-dashboard)"
    server = subprocess.Popen([str(exe), url, "--port", str(port), "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        studies = None
        deadline = time.monotonic() + 60
        while studies is None:
            try:
                studies = fetch(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"optuna-dashboard did not serve: {server.stdout.read()[-2000:]}") from None
                time.sleep(0.3)
        sid = {s["study_name"]: s["study_id"] for s in studies}[name]
        detail = fetch(f"http://127.0.0.1:{port}/api/studies/{sid}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    served = {}
    for t in detail["trials"]:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        served[attrs["commit"]] = t
    assert set(served) == set(view)
    for commit, t in served.items():
        assert {p["name"]: float(p["param_external_value"]) for p in t["params"]} == view[commit].params
        assert {v["step"]: v["value"] for v in t["intermediate_values"]} == view[commit].intermediate_values
    assert detail["directions"] == ["maximize"] and detail["has_intermediate_values"]
    assert [t["number"] for t in detail["best_trials"]] == [best.number]
