"""`replay` and `export` as a user runs them: bad input gets one line naming the field or value, a
nonzero exit and nothing left behind; good input runs end to end (real Ray, real git)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runs_db.db import RunsDB
from runs_db.reviews import set_review, writer
from tests.toy import make_toy


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()


@pytest.fixture
def search(tmp_path: Path):
    """A toy search (a plain-folder target) with two candidates in a row: double the rate, then sleep less."""
    toy = make_toy(tmp_path / "toy", sleep=0.01)
    d = tmp_path / "search"
    with RunsDB.create(d, {"target": str(toy.source), "workers": 2}, toy) as db:
        train = db.files(db.base_commit, ["train.py"])["train.py"]
        c1, _ = db.commit_candidate(db.base_commit, {"train.py": train.replace("RATE = 1.0", "RATE = 2.0")},
                                    "Double the rate", "The loss falls twice as fast.", "ideas")
        c2, _ = db.commit_candidate(c1, {"train.py": train.replace("RATE = 1.0", "RATE = 2.0")
                                         .replace("SLEEP = 0.01", "SLEEP = 0.005")}, "Sleep less", "", "ideas")
        trials = len(db.trials())
    return d, toy, c1, c2, trials


def one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_input_is_one_line_and_leaves_nothing(search, tmp_path):
    d, toy, c1, c2, trials = search
    nowhere = tmp_path / "not-a-search"
    nowhere.mkdir()
    one_line_error(cli("replay", "--dir", str(nowhere), "--commit", c1), "--dir", "not a search folder")
    one_line_error(cli("export", "--dir", str(nowhere), "--commit", c1, "--name", "X"), "--dir")
    one_line_error(cli("replay", "--dir", str(tmp_path / "missing"), "--commit", c1), "--dir")
    assert list(nowhere.iterdir()) == [] and not (tmp_path / "missing").exists()
    one_line_error(cli("replay", "--dir", str(d), "--commit", "deadbeef"), "--commit 'deadbeef'", "not a commit")
    one_line_error(cli("export", "--dir", str(d), "--commit", "deadbeef", "--name", "X"), "--commit 'deadbeef'")
    one_line_error(cli("replay", "--dir", str(d), "--commit", c1, "--seeds", "1"), "--seeds 1")
    one_line_error(cli("replay", "--dir", str(d)), "--commit")
    one_line_error(cli("export", "--dir", str(d), "--commit", c1, "--name", "a/b"), "--name 'a/b'")
    one_line_error(cli("export", "--dir", str(d), "--commit", c1, "--name", "X"), "no replay runs")
    one_line_error(cli("export", "--dir", str(d), "--commit", c1, "--name", "X", "--push", str(tmp_path / "no.git")),
                   "--push")
    one_line_error(cli("export", "--dir", str(d), "--commit", c1, "--name", "X", "--repo", str(tmp_path / "nope")),
                   "--repo")
    with writer(d) as held:  # as a running search holds it: it is the folder's only writer
        assert held
        one_line_error(cli("replay", "--dir", str(d), "--approved"), "a search is running there")
        one_line_error(cli("replay", "--dir", str(d), "--commit", c1), "a search is running there")
    as_json = cli("replay", "--dir", str(d), "--commit", "deadbeef", "--json")
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["error"].startswith("--commit 'deadbeef'")
    with RunsDB.open(d) as db:
        assert len(db.trials()) == trials  # nothing recorded
    assert not (toy.repo / ".git").exists() and not (toy.repo / "records").exists()  # no repo made, no folder
    assert not (d / "runs").exists()  # no run started


def test_approved_then_ablate_then_export_with_push(search, tmp_path):
    d, toy, c1, c2, _ = search
    with RunsDB.open(d) as db:
        set_review(db, c2, "approve")
    out = cli("replay", "--dir", str(d), "--approved", "--seeds", "2", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    done = json.loads(out.stdout)["replays"]
    assert [r["commit"] for r in done] == [c2] and done[0]["purpose"] == "replay-1"
    assert done[0]["speedup_text"].startswith("time to loss") and len(done[0]["runs"]) == 2
    assert "4/4" in out.stderr  # the progress bar reached its end
    again = cli("replay", "--dir", str(d), "--approved", "--json")  # answered: nothing waits
    assert again.returncode == 0 and json.loads(again.stdout) == {"replays": []}

    out = cli("replay", "--dir", str(d), "--commit", c2[:10], "--ablate", "--seeds", "2", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    # all, each alone (each leave-one-out is the other alone), and the base: 4 arms x 2 seeds, said first
    assert out.stderr.lstrip().startswith(f"ablation of {c2[:10]}: 2 changes") and "= 8 runs" in out.stderr
    ab = json.loads(out.stdout)
    assert [c["title"] for c in ab["changes"]] == ["Double the rate", "Sleep less"]
    assert all(isinstance(c["share"], float) for c in ab["changes"]) and (d / ab["plot"]).is_file()

    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    export = ("export", "--dir", str(d), "--commit", c2[:10], "--name", "SleepyRate", "--push", str(bare),
              "--allow-untrusted", "--json")  # the toy target has no trusted evaluator
    out = cli(*export)
    assert out.returncode == 0, out.stdout + out.stderr
    got = json.loads(out.stdout)
    assert got["branch"] == "record/SleepyRate" and got["pushed"] == str(bare)
    assert git(bare, "rev-parse", "record/SleepyRate") == got["commit"]
    readme = git(bare, "show", f"record/SleepyRate:{got['folder']}/README.md")
    assert "| 1. Double the rate |" in readme and "![each change's share](ablation.png)" in readme
    assert got["speedup_text"] in readme and "measured by replay (replay-1)" in readme
    names = git(bare, "ls-tree", "-r", "--name-only", "record/SleepyRate", got["folder"]).splitlines()
    assert f"{got['folder']}/ablation.png" in names and f"{got['folder']}/loss_curve.png" in names
    assert git(bare, "show", "record/SleepyRate:train.py").count("SLEEP = 0.005") == 1

    clash = cli(*export[:-1])  # the same name again: refused before anything is written
    one_line_error(clash, "--name", "record/SleepyRate already exists")
    assert git(toy.repo, "branch", "--list", "record/*") == "record/SleepyRate"
