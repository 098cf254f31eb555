"""RunsDB: the study, the git history and the artifacts of a search, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from io import BytesIO
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import git
import optuna
import psutil
import pytest

from runs_db.db import RunsDB, SearchExistsError, dumps_toml
from runs_db.history import HistoryError
from runs_db.study import StudyError, driver_url
from search_space.records import Point, RunResult, Status
from search_space.target import Target, parse_target

TRAIN = "import sys\nLR = 0.1\nSTEPS = 10\nprint('training', LR)\n"


def make_target(root: Path, git_repo: bool = False) -> Target:
    """A two-file trainer in `root`/trainer (a plain folder, or a git repo with a dirty tree)."""
    src = root / "trainer"
    src.mkdir(parents=True)
    (src / "train.py").write_text(TRAIN)
    (src / "run.sh").write_text("#!/bin/sh\npython train.py\n")
    (src / "run.sh").chmod(0o755)
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\x00\x01")
    if git_repo:
        with git.Repo.init(src) as r:
            r.index.add(["train.py", "run.sh"])
            r.index.commit("trainer v1")
            (src / "train.py").write_text(TRAIN.replace("0.1", "0.5"))
            r.index.add(["train.py"])
            r.index.commit("trainer v2")
        (src / "scratch.txt").write_text("untracked")  # not part of the base
    raw = {"name": "toy", "run": {"command": "python train.py --seed {seed} --steps {steps}"},
           "repo": {"base_ref": "HEAD~1" if git_repo else "HEAD"},
           "files": {"editable": ["train.py"]}, "fidelities": {"full": {"steps": 10}, "smoke": {"steps": 2}},
           "objective": {"kind": "time_to_target", "target_loss": 3.5}}
    return parse_target(raw, src)


def run_result(seed: int, final_loss: float, train_ms: float, fidelity: str = "full",
               status: Status = Status.OK, log: str | None = None, reason: str = "") -> RunResult:
    curve = [Point(s, final_loss + 2.0 * (10 - s) / 10, train_ms * s / 10) for s in range(0, 11, 2)]
    return RunResult(status=status, reason=reason, curve=curve if status == Status.OK else curve[:2],
                     total_steps=10, wall_s=1.5, seed=seed, fidelity=fidelity,
                     log=log if log is not None else f"seed {seed}\nstep:10/10 val_loss:{final_loss}\n")


@pytest.fixture
def db(tmp_path, storage_url, study_name):
    target = make_target(tmp_path)
    with RunsDB.create(tmp_path / "search", {"study_name": study_name, "workers": 2, "plots": False},
                       target, storage=storage_url) as d:
        yield d


def test_create_open_resume(tmp_path, storage_url, study_name):
    target = make_target(tmp_path)
    settings = {"study_name": study_name, "target": "toy", "budget": {"gpu_hours": 1.5, "seeds": [0, 1]},
                "model": None, "note": 'quote " and \\ and é'}
    d = tmp_path / "search"
    with RunsDB.create(d, settings, target, storage=storage_url) as db:
        base = db.base_commit
        n0 = db.start_trial(base, None, "baseline", "baseline", "full")
        db.finish_trial(n0, 10.0, [run_result(0, 3.4, 1000)])
    assert (d / "search.toml").is_file() and (d / "repo" / ".git").is_dir() and (d / "artifacts").is_dir()
    assert (d / "study.db").is_file() == (storage_url is None)
    with pytest.raises(SearchExistsError):
        RunsDB.create(d, settings, target, storage=storage_url)
    with RunsDB.open(d) as db:
        assert db.settings == {k: v for k, v in settings.items() if v is not None}
        assert db.base_commit == base and db.study_name == study_name
        assert db.repo_path == d / "repo" and db.lineage(base) == [base]
        assert [t.number for t in db.trials()] == [n0]
        assert db.start_trial(base, None, "baseline", "baseline", "full") == n0 + 1
    with pytest.raises(FileNotFoundError):
        RunsDB.open(tmp_path / "nothing")


def test_create_refuses_a_study_name_in_use(tmp_path, storage_url, study_name):
    target = make_target(tmp_path)
    with RunsDB.create(tmp_path / "a", {"study_name": study_name}, target, storage=storage_url) as a:
        shared = storage_url or a.storage_url
    with pytest.raises(StudyError, match="already exists"):
        RunsDB.create(tmp_path / "b", {"study_name": study_name}, target, storage=shared)
    assert not (tmp_path / "b" / "search.toml").exists() and not (tmp_path / "b" / "repo").exists()


def test_base_is_the_snapshot_of_the_target(tmp_path):
    target = make_target(tmp_path, git_repo=True)
    with RunsDB.create(tmp_path / "s", {}, target) as db:
        assert db.ls(db.base_commit) == ["run.sh", "train.py"]  # tracked files only, at base_ref
        assert db.files(db.base_commit)["train.py"] == TRAIN  # HEAD~1, not the newer HEAD
        with git.Repo(db.repo_path) as r:
            assert r.head.reference.name == "base" and not r.is_dirty(untracked_files=True)
            assert r.commit("base").tree["run.sh"].mode == 0o100755
    plain = make_target(tmp_path / "p")
    with RunsDB.create(tmp_path / "s2", {}, plain) as db:
        assert db.ls(db.base_commit) == ["run.sh", "train.py"]  # caches skipped


def test_commits_parentage_messages_and_diffs(db):
    base = db.base_commit
    c1, new1 = db.commit_candidate(base, {"train.py": TRAIN.replace("0.1", "0.2")}, "Raise LR",
                                   "A higher LR converges faster.", "llm", model="claude-x")
    assert new1 and db.history.parent(c1) == base
    c2, new2 = db.commit_candidate(c1, {"extra.py": "X = 1\n", "run.sh": None}, "Add extra", "", "ideas")
    assert new2 and db.history.parent(c2) == c1 and db.lineage(c2) == [c2, c1, base]
    assert db.ls(c2) == ["extra.py", "train.py"]
    assert db.candidates() == [(c1, base, "Raise LR", "llm"), (c2, c1, "Add extra", "ideas")]
    msg = db.message(c1)
    assert msg.startswith("Raise LR\n\nA higher LR converges faster.\n") and "Proposer: llm" in msg
    assert "Model: claude-x" in msg
    d1 = db.diff(c1)
    assert "-LR = 0.1" in d1 and "+LR = 0.2" in d1 and d1.endswith("\n")
    assert "+X = 1" in db.diff(c2) and "LR = 0.2" not in db.diff(c2)
    assert "+LR = 0.2" in db.diff(c2, against=base)
    assert db.files(c1, ["train.py"]) == {"train.py": TRAIN.replace("0.1", "0.2")}
    with pytest.raises(HistoryError):
        db.files(c1, ["missing.py"])
    for bad in ("../escape.py", "/abs.py", ".git/config"):
        with pytest.raises(HistoryError):
            db.commit_candidate(base, {bad: "x"}, "bad", "", "llm")
    with git.Repo(db.repo_path) as r:
        branches = [h.name for h in r.heads]
        assert r.commit("base").hexsha == base and r.head.commit.hexsha == base  # checkout never moves
        assert r.commit(c2).tree["train.py"].mode == 0o100644
    assert len([b for b in branches if b.startswith("cand/")]) == 2
    assert any(b.startswith("cand/1-raise-lr-") for b in branches)


def test_identical_trees_are_one_candidate(db):
    base = db.base_commit
    change = {"train.py": TRAIN.replace("0.1", "0.3")}
    c1, new = db.commit_candidate(base, change, "LR 0.3", "", "llm")
    again, new_again = db.commit_candidate(base, change, "LR 0.3 again", "", "ideas")
    assert new and (again, new_again) == (c1, False)
    # Undoing the change lands on the base's tree: that is the base, not a new candidate.
    assert db.commit_candidate(c1, {"train.py": TRAIN}, "Undo", "", "llm") == (base, False)
    assert db.commit_candidate(base, {}, "Nothing", "", "llm") == (base, False)
    # The same tree reached through another path is still the one candidate.
    mid, _ = db.commit_candidate(base, {"train.py": TRAIN.replace("0.1", "0.7")}, "LR 0.7", "", "llm")
    assert db.commit_candidate(mid, change, "LR 0.3 via 0.7", "", "llm") == (c1, False)
    with git.Repo(db.repo_path) as r:
        assert len([h for h in r.heads if h.name.startswith("cand/")]) == 2


def test_trials_round_trip(db):
    base = db.base_commit
    c, _ = db.commit_candidate(base, {"train.py": TRAIN.replace("0.1", "0.2")}, "Raise LR", "why", "llm")
    dist = optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)
    n = db.start_trial(c, None, "knobs", "Raise LR", "full", {"llm_tokens": 120, "dollars": 0.01},
                       model="m1", params={"lr": 0.2}, distributions={"lr": dist})
    running = db.trial(n)
    assert running.state == "running" and running.parent == base and running.model == "m1"
    db.finish_trial(n, 812.5, [run_result(1, 3.30, 800), run_result(0, 3.31, 825)],
                    {"gpu_seconds": 12.0, "junk": float("inf"), "tuple": (1, 2)})
    t = db.trial(n)
    assert (t.commit, t.parent, t.proposer, t.title, t.fidelity, t.state, t.value) == (
        c, base, "knobs", "Raise LR", "full", "complete", 812.5)
    assert t.attrs["llm_tokens"] == 120 and t.attrs["gpu_seconds"] == 12.0
    assert t.attrs["junk"] is None and t.attrs["tuple"] == [1, 2] and t.attrs["seeds"] == [0, 1]
    assert [r["seed"] for r in t.runs] == [0, 1] and t.runs[0]["val_loss"] == pytest.approx(3.31)
    assert t.runs[0]["train_ms"] == pytest.approx(825) and t.runs[0]["status"] == "ok"
    assert db.study.trial(n).params == {"lr": 0.2}
    json.dumps(t.attrs, allow_nan=False)  # plain JSON, as the dashboard needs
    assert db.completed(c, "full").number == n and db.completed(c, "smoke") is None

    nan = db.start_trial(c, base, "llm", "Raise LR", "smoke")
    db.finish_trial(nan, float("nan"), [run_result(0, 3.3, 100, "smoke")])
    assert db.trial(nan).state == "fail" and "not a number" in db.trial(nan).reason
    inf = db.start_trial(c, base, "llm", "Raise LR", "smoke")  # ran, but reached no target: kept
    db.finish_trial(inf, math.inf, [run_result(0, 3.3, 100, "smoke")])
    assert db.trial(inf).state == "complete" and db.trial(inf).value == math.inf
    failed = db.start_trial(c, base, "llm", "Raise LR", "smoke")
    db.finish_trial(failed, None, [run_result(0, 3.3, 100, "smoke", Status.FAILED, reason="CUDA OOM")])
    assert db.trial(failed).state == "fail" and db.trial(failed).reason == "CUDA OOM"
    pruned = db.start_trial(c, base, "llm", "Raise LR", "full")
    db.finish_trial(pruned, None, [run_result(0, 3.9, 100, status=Status.PRUNED)], state="pruned")
    assert db.trial(pruned).state == "pruned" and db.trial(pruned).value is None
    with pytest.raises(StudyError):
        db.finish_trial(pruned, 1.0, [])  # already finished
    with pytest.raises(ValueError):
        db.finish_trial(db.start_trial(c, base, "llm", "x", "full"), None, [], state="complete")
    with pytest.raises(ValueError, match="not one of"):
        db.finish_trial(db.trials()[-1].number, 1.0, [], state="done")
    assert [t.state for t in db.trials()] == ["complete", "fail", "complete", "fail", "pruned", "running"]


def test_notes_tell_the_story(db):
    base = db.base_commit
    b = db.start_trial(base, None, "baseline", "baseline", "full")
    db.finish_trial(b, 1000.0, [run_result(0, 3.40, 1000), run_result(1, 3.41, 1010)])
    c, _ = db.commit_candidate(base, {"train.py": TRAIN.replace("0.1", "0.2")}, "Raise LR", "why", "llm")
    n = db.start_trial(c, base, "llm", "Raise LR", "full")
    db.finish_trial(n, 900.0, [run_result(0, 3.38, 900)])
    m = db.start_trial(c, base, "llm", "Raise LR", "smoke")
    db.mark_failed(m, "controller died")
    db.flush()  # notes are written in the background
    out = subprocess.run(["git", "-C", str(db.repo_path), "log", "--notes=speedsearch", "--branches"],
                         capture_output=True, text=True, check=True).stdout
    assert f"trial {n} [full] complete value=900" in out and "val_loss=3.3800 train_ms=900" in out
    assert f"trial {m} [smoke] fail proposer=llm: controller died" in out
    assert f"trial {b} [full] complete value=1000" in out and "seed 1 ok val_loss=3.4100" in out
    assert "trial" in db.note(c) and db.note(base).count("seed") == 2


def test_stale_running_trials(tmp_path, storage_url, study_name):
    target = make_target(tmp_path)
    d = tmp_path / "s"
    with RunsDB.create(d, {"study_name": study_name}, target, storage=storage_url) as db:
        mine = db.start_trial(db.base_commit, None, "baseline", "baseline", "full")
        done = db.start_trial(db.base_commit, None, "baseline", "baseline", "full")
        db.finish_trial(done, 1.0, [run_result(0, 3.4, 1)])
        assert db.stale_running() == []  # this controller's own trial is not stale
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            owner = db._owner
            gone = db.start_trial(db.base_commit, None, "llm", "x", "full")
            db.study.set_attrs(gone, {"controller": {**owner, "pid": dead.pid, "session": "old"}})
            other = db.start_trial(db.base_commit, None, "llm", "y", "full")
            db.study.set_attrs(other, {"controller": {**owner, "pid": live.pid, "session": "other"}})
            remote = db.start_trial(db.base_commit, None, "llm", "z", "full")
            db.study.set_attrs(remote, {"controller": {**owner, "host": "elsewhere", "session": "r"}})
            assert [t.number for t in db.stale_running()] == [gone]
            assert [t.number for t in db.stale_running(other_hosts=True)] == [gone, remote]
        finally:
            live.kill()
            live.wait()
    with RunsDB.open(d) as db:  # reopened by the same process: its old session is gone
        stale = [t.number for t in db.stale_running()]
        assert mine in stale and other in stale and gone in stale and remote not in stale
        for n in stale:
            db.mark_failed(n, "controller gone")
        assert db.stale_running() == [] and db.trial(mine).state == "fail"
        assert db.trial(mine).reason == "controller gone" == db.trial(mine).attrs["reason"]


def test_state_persists(tmp_path, storage_url, study_name):
    target = make_target(tmp_path)
    d = tmp_path / "s"
    with RunsDB.create(d, {"study_name": study_name}, target, storage=storage_url) as db:
        assert db.get_state("bandit", {"arms": []}) == {"arms": []}
        db.set_state("bandit", {"arms": {"llm": [3, 1.5]}, "bad": float("nan"), "t": (1, 2)})
        db.set_state("step", 7)
    with RunsDB.open(d) as db:
        assert db.get_state("bandit") == {"arms": {"llm": [3, 1.5]}, "bad": None, "t": [1, 2]}
        assert db.get_state("step") == 7 and db.get_state("missing") is None


def test_artifacts_and_baseline(db, tmp_path):
    db.auto_plot = True
    log_file = tmp_path / "run.log"
    log_file.write_text("step:10/10 val_loss:3.4 train_time:1000ms\n")
    b = db.start_trial(db.base_commit, None, "baseline", "baseline", "full")
    path = db.save_run(b, run_result(0, 3.40, 1000, log=str(log_file)))
    assert path == db.dir / "artifacts" / f"trial-{b}" / "seed-0-full.json"
    assert path.with_suffix(".log").read_text() == log_file.read_text()
    saved = json.loads(path.read_text())
    assert saved["status"] == "ok" and saved["final"]["val_loss"] == 3.40 and saved["log"] == "seed-0-full.log"
    db.finish_trial(b, 1000.0, [run_result(0, 3.40, 1000, log=str(log_file)), run_result(1, 3.42, 990)])
    runs = db.runs(b)
    assert [r.seed for r in runs] == [0, 1] and runs[1].log.endswith("seed-1-full.log")
    assert Path(runs[1].log).read_text().startswith("seed 1\n") and runs[0].final.train_ms == 1000
    assert [r.seed for r in db.baseline("full")] == [0, 1] and db.baseline("smoke") == []
    c, _ = db.commit_candidate(db.base_commit, {"train.py": "x = 1\n"}, "Tiny", "", "llm")
    n = db.start_trial(c, None, "llm", "Tiny", "full")
    db.finish_trial(n, 900.0, [run_result(0, 3.39, 900), run_result(1, 3.40, 880, status=Status.FAILED)])
    plot = db.plot_path(n, "full")
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(db.runs(n)) == 2 and len(db.baseline("full")) == 2
    # A rung named otherwise (confirm) whose runs are at the full fidelity is drawn against it.
    conf = db.start_trial(c, None, "llm", "Tiny", "confirm")
    db.save_run(conf, run_result(5, 3.38, 870), log_text="the log\n")
    assert (db.artifacts.trial_dir(conf) / "seed-5-full.log").read_text() == "the log\n"
    db.finish_trial(conf, 870.0, db.runs(conf))
    assert db.plot_path(conf, "confirm").is_file() and len(db.baseline("full")) == 2


def test_no_git_processes_left_after_close(tmp_path):
    target = make_target(tmp_path)

    def git_children() -> set[int]:
        return {p.pid for p in psutil.Process().children(recursive=True) if "git" in p.name()}

    before = git_children()  # other tests' leftovers are not this test's business
    db = RunsDB.create(tmp_path / "s", {}, target)
    c, _ = db.commit_candidate(db.base_commit, {"train.py": "y = 2\n"}, "Y", "", "llm")
    db.files(c)
    db.files(db.base_commit, ["train.py"])
    helpers = git_children() - before
    assert any("cat-file" in " ".join(psutil.Process(p).cmdline()) for p in helpers)  # the check sees them
    db.close()
    db.close()  # twice is fine
    assert git_children() - before == set()
    with RunsDB.open(tmp_path / "s") as again:
        again.files(c)
    assert git_children() - before == set()


def test_optuna_dashboard_opens_the_storage(db):
    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    b = db.start_trial(db.base_commit, None, "baseline", "baseline", "full")
    db.finish_trial(b, 1000.0, [run_result(0, 3.4, 1000)], {"nan": float("nan")})
    db.start_trial(db.base_commit, None, "llm", "running one", "full")
    app = optuna_dashboard.wsgi(db.storage_url)

    def get(path: str) -> dict:
        environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": BytesIO()}
        setup_testing_defaults(environ)
        status: list[str] = []
        body = b"".join(app(environ, lambda s, h, exc=None: status.append(s)))
        assert status[0].startswith("200"), (status, body[:500])
        return json.loads(body)

    studies = {s["study_name"]: s for s in get("/api/studies")["study_summaries"]}
    assert db.study_name in studies
    detail = get(f"/api/studies/{studies[db.study_name]['study_id']}")
    assert [t["number"] for t in detail["trials"]] == [0, 1]
    attrs = {a["key"]: a["value"] for a in detail["trials"][0]["user_attrs"]}
    assert attrs["proposer"] == "baseline" and attrs["commit"] == db.base_commit


def test_search_toml_round_trip():
    data = {"a": 1, "b": 2.5, "c": True, "d": "x\ny \"q\" \t é \x7f", "e": [1, 2, 3], "f": None,
            "g": {"h": [[1, "a"], [2.0]], "i": {"j": "k", "l": float("inf")}, "m": [{"n": 1}]},
            "weird key": "v", "empty": {}}
    back = tomllib.loads(dumps_toml(data))
    expected = {k: v for k, v in data.items() if v is not None}
    assert back == expected
    assert math.isnan(tomllib.loads(dumps_toml({"x": float("nan")}))["x"])


def test_postgres_url_gets_an_installed_driver():
    url = driver_url("postgresql://u:p@h:5432/db")
    assert url.endswith("://u:p@h:5432/db") and url.startswith("postgresql")
    assert driver_url("sqlite:///x.db") == "sqlite:///x.db"


def test_storage_url_is_usable_as_is(db):
    other = optuna.create_study(storage=db.storage_url, study_name=db.study_name + "-knobs")
    assert other.study_name.endswith("-knobs")
    other._storage.remove_session()


def test_missing_postgres_says_to_install_it(monkeypatch):
    try:
        from tests import pg
    except ImportError:  # tests/ itself on sys.path
        import pg
    monkeypatch.setattr(pg, "find_bin", lambda: None)
    with pytest.raises(pg.PgUnavailable, match="install postgresql"):
        pg.PgServer()


def test_plot_draws_the_base_as_a_band(tmp_path):
    """The base is one band (mean, min to max) made of the steps at least half its runs logged."""
    from runs_db.curves import baseline_band
    from runs_db.plots import plot_loss_curves

    base = [run_result(0, 3.40, 1000), run_result(1, 3.50, 1200), run_result(2, 3.45, 1100, status=Status.PRUNED)]
    band = baseline_band(base)
    assert [b[0] for b in band] == [0, 2, 4, 6, 8, 10]  # the pruned run's 2 points do not end it early
    step, secs, mean, low, high = band[-1]
    assert (low, high) == (3.40, 3.50) and mean == pytest.approx(3.45) and secs == pytest.approx(1.1)
    assert band[0][2] == pytest.approx((5.40 + 5.50 + 5.45) / 3)  # step 0: all three runs
    png = plot_loss_curves([run_result(5, 3.3, 900)], base, tmp_path / "p.png", title="t", target_loss=3.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_loss_curves([], [], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
