"""Every command with each bad input: one line naming the field or value, a nonzero exit code, no
traceback, and nothing left behind (no search folder, no branch). Run as a user runs them, in
subprocesses, so a traceback would show. Validation errors come before Ray starts: these are fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.toy import make_toy

FAST = 60  # seconds: a validation error comes back before anything heavy loads


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = FAST) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def refused(out: subprocess.CompletedProcess, *words: str) -> str:
    """Assert a user error: exit 2, one line on stderr naming `words`, no traceback; return the line."""
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text and "╭" not in text, text
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """The toy target as a git repository (so a stray branch would show), and a broken copy."""
    root = tmp_path_factory.mktemp("t")
    t = make_toy(root / "toy")
    subprocess.run(["git", "init", "-q", "-b", "main", str(t.root)], check=True)
    subprocess.run(["git", "-C", str(t.root), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(t.root), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "toy"],
                   check=True)
    return t.root


def branches(repo: Path) -> list[str]:
    return subprocess.run(["git", "-C", str(repo), "branch", "--format=%(refname:short)"], capture_output=True,
                          text=True, check=True).stdout.split()


def broken(toy: Path, tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the toy's target.toml with `old` replaced by `new` (same trainer folder)."""
    text = (toy / "target.toml").read_text()
    assert old in text
    path = toy / f"target-{abs(hash(new))}.toml"
    path.write_text(text.replace(old, new))
    return path


# -- target.toml -------------------------------------------------------------------------------


@pytest.mark.parametrize("old,new,words", [
    ("memory_mb = 512", "memory_gb = 1", ("resources.memory_gb", "did you mean memory_mb")),
    ('target_loss = "baseline"', "target_los = 2.0", ("objective.target_los", "did you mean target_loss")),
    ('name = "toy"', 'name = "toy"\ntarget_los = 2.0', ("target_los", "objective.target_loss")),
    ('command = "python', 'comand = "python', ("run.comand", "did you mean command")),
])
def test_unknown_target_keys_are_refused_with_the_nearest_name(toy: Path, tmp_path: Path, old, new, words):
    bad = broken(toy, tmp_path, old, new)
    refused(cli("evaluate", "--target", str(bad), "--run-root", str(tmp_path / "runs")), str(bad), *words)
    d = tmp_path / "search"
    refused(cli("launch", "--dir", str(d), "--target", str(bad)), *words)
    assert not d.exists() and not (tmp_path / "runs").exists()
    with_json = cli("launch", "--dir", str(d), "--target", str(bad), "--json")
    assert with_json.returncode == 2 and words[0] in json.loads(with_json.stdout)["error"]
    assert not d.exists() and branches(toy) == ["main"]


# -- launch options and what it needs from outside --------------------------------------------


@pytest.mark.parametrize("args,env,words", [
    (("--budget-trials", "-1"), {}, ("--budget-trials -1",)),
    (("--budget-minutes", "-0.5"), {}, ("--budget-minutes -0.5",)),
    (("--budget-dollars", "-3"), {}, ("--budget-dollars -3",)),
    (("--budget-gpu-hours", "-1"), {}, ("--budget-gpu-hours -1",)),
    (("--workers", "-2"), {}, ("--workers -2",)),
    (("--sandbox", "vm"), {}, ("--sandbox vm", "process or docker")),
    (("--proposers", "ideas,magic"), {}, ("--proposers", "magic")),
    (("--max-fidelity", "huge"), {}, ("--max-fidelity huge", "confirm")),
    (("--models", "claude:x"), {}, ("--models claude:x",)),
    (("--fdr", "2"), {}, ("--fdr 2",)),
    (("--seeds", "x"), {}, ("--seeds",)),
    (("--proposers", "llm"), {"ANTHROPIC_API_KEY": ""}, ("--proposers llm", "ANTHROPIC_API_KEY")),
    (("--sandbox", "docker"), {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}, ("--sandbox docker", "Docker")),
    (("--ray-address", "127.0.0.1:1"), {}, ("--ray-address 127.0.0.1:1", "unreachable")),
    (("--ray-address", "no-port"), {}, ("--ray-address no-port",)),
    ((), {"RAY_ADDRESS": "127.0.0.1:1"}, ("--ray-address 127.0.0.1:1", "unreachable")),  # Ray's own variable
    (("--storage", "postgresql://nobody@127.0.0.1:1/none"), {}, ("--storage", "127.0.0.1:1", "does not answer")),
    (("--storage", "not a url"), {}, ("--storage not a url", "not a database URL")),
    (("--study-name", "two words"), {}, ("--study-name 'two words'",)),
])
def test_launch_refuses_before_making_the_folder(toy: Path, tmp_path: Path, args, env, words):
    d = tmp_path / "new" / "search"
    refused(cli("launch", "--dir", str(d), "--target", str(toy), *args, env=env), *words)
    assert not d.exists() and not d.parent.exists() and branches(toy) == ["main"]


def test_replay_refuses_an_unreachable_cluster(tmp_path: Path):
    refused(cli("replay", "--dir", str(tmp_path / "s"), "--commit", "abc", "--ray-address", "127.0.0.1:1"),
            "--ray-address 127.0.0.1:1", "unreachable")
    refused(cli("replay", "--dir", str(tmp_path / "s"), "--commit", "abc", env={"RAY_ADDRESS": "127.0.0.1:1"}),
            "--ray-address 127.0.0.1:1", "unreachable")


def test_launch_into_an_existing_search_and_resume_of_nothing(toy: Path, tmp_path: Path):
    d = tmp_path / "s"
    refused(cli("launch", "--dir", str(d), "--resume"), str(d), "no search")
    assert not d.exists()
    d.mkdir()
    (d / "search.toml").write_text("")
    refused(cli("launch", "--dir", str(d), "--target", str(toy)), "already holds a search")
    assert sorted(p.name for p in d.iterdir()) == ["search.toml"]  # nothing of the user's removed or added


# -- evaluate, status, show, targets ------------------------------------------------------------


@pytest.mark.parametrize("args,words", [
    (("--target", "no-such-target"), ("no-such-target",)),
    (("--fidelity", "huge"), ("--fidelity huge",)),
    (("--sandbox", "vm"), ("--sandbox vm",)),
    (("--patch", "/nonexistent.patch"), ("--patch /nonexistent.patch",)),
    (("--gpus", "-1"), ("--gpus -1",)),
    (("--seed", "x"), ("--seed",)),
    (("--ray-address", "127.0.0.1:1"), ("--ray-address 127.0.0.1:1", "unreachable")),
])
def test_evaluate_refuses(toy: Path, tmp_path: Path, args, words):
    target = () if args[0] == "--target" else ("--target", str(toy))
    refused(cli("evaluate", *target, *args, "--run-root", str(tmp_path / "runs")), *words)
    assert not (tmp_path / "runs").exists()
    out = cli("evaluate", *target, *args, "--run-root", str(tmp_path / "runs"), "--json")
    assert out.returncode == 2 and json.loads(out.stdout)["exit_code"] == 2 and out.stderr == ""


@pytest.fixture(scope="module")
def search(toy: Path, tmp_path_factory) -> Path:
    """A small finished search (smoke rung only: seconds)."""
    d = tmp_path_factory.mktemp("s") / "search"
    out = cli("launch", "--dir", str(d), "--target", str(toy), "--proposers", "ideas,knobs", "--seeds", "2",
              "--workers", "2", "--max-fidelity", "smoke", "--budget-trials", "2", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return d


def candidates(d: Path) -> int:
    data = json.loads(cli("status", "--dir", str(d), "--json", "--all").stdout)
    return sum(1 for t in data["trials"] if t["proposer"] not in ("baseline", "replay"))


def test_status_and_show_refuse(search: Path, tmp_path: Path):
    refused(cli("status", "--dir", str(tmp_path / "nothing")), "--dir", "no search")
    refused(cli("status", "--dir", str(search), "--sort", "size"), "--sort size")
    refused(cli("status", "--dir", str(search), "--rung", "huge"), "--rung huge")
    refused(cli("status", "--dir", str(search), "--proposer", "oracle"), "--proposer oracle")
    refused(cli("show", "deadbeef", "--dir", str(tmp_path / "nothing")), "--dir", "no search")
    refused(cli("show", "deadbeef", "--dir", str(search)), "'deadbeef'", "not a commit")
    refused(cli("show", "999", "--dir", str(search)), "999", "neither a trial number")
    refused(cli("show", "base", "--dir", str(search)), "the base itself")
    refused(cli("show", "1", "--dir", str(search), "--diff", "sideways"), "--diff sideways")
    out = cli("show", "deadbeef", "--dir", str(search), "--json")
    assert out.returncode == 2 and "deadbeef" in json.loads(out.stdout)["error"]
    refused(cli("targets", "--bogus"), "--bogus")
    assert not (tmp_path / "nothing").exists()


def test_resume_takes_new_budgets_and_refuses_other_changes(search: Path, toy: Path):
    before = candidates(search)
    assert before == 2
    refused(cli("launch", "--dir", str(search), "--resume", "--seeds", "5"), "--seeds", "cannot change on --resume")
    refused(cli("launch", "--dir", str(search), "--resume", "--sandbox", "docker"), "--sandbox")
    refused(cli("launch", "--dir", str(search), "--resume", "--budget-trials", "-2"), "--budget-trials -2")
    assert candidates(search) == before
    out = cli("launch", "--dir", str(search), "--resume", "--budget-trials", "2", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stopped: trials" in out.stdout
    assert candidates(search) == before + 2  # "--budget-trials 2" on a resume: two more
    assert "budget_trials = 4" in (search / "search.toml").read_text()  # a later plain --resume keeps it


def test_ctrl_c_exits_130(toy: Path, tmp_path: Path):
    """SIGINT during a search: the summary is printed, the exit code is 130, and the search can
    be resumed (it was not removed: runs had been recorded)."""
    slow = make_toy(tmp_path / "slow", sleep=0.3)
    d = tmp_path / "search"
    proc = subprocess.Popen([sys.executable, "-m", "agent", "launch", "--dir", str(d), "--target", str(slow.root),
                             "--seeds", "2", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not any((d / "artifacts").glob("trial-*/seed-*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)  # a first run recorded: the search is well under way
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        # stopping the runs, the last plots and its local Ray: minutes when both cores are busy
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert "stopped: interrupted" in stdout and (d / "search.toml").is_file()
    import psutil

    left = []
    for p in psutil.process_iter():
        try:
            if p.cwd().startswith(str(d)):
                left.append(p.cmdline())
        except (psutil.Error, OSError):
            pass
    assert left == []  # no run of the search outlives it


def test_a_search_that_fails_before_recording_anything_is_removed(toy: Path, tmp_path: Path):
    """What validation cannot see (a cluster that answers but fails, Ctrl-C while Ray starts)
    ends before the first trial: the new folder goes, so the next launch is not blocked. A
    folder the user made beforehand stays, emptied of what the search put there."""
    from agent.runner import discard_new_search, open_search
    from agent.settings import SearchSettings

    settings = SearchSettings(target=str(toy), proposers=("ideas",))
    db, _ = open_search(tmp_path / "new", settings)
    assert discard_new_search(db, existed=False) and not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    db, _ = open_search(mine, settings)
    assert (mine / "search.toml").is_file()
    assert discard_new_search(db, existed=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    db, _ = open_search(tmp_path / "used", settings)
    with db:
        db.start_trial(db.base_commit, None, "baseline", "baseline", "short")
        assert not discard_new_search(db, existed=False)  # something was recorded: kept, to resume
    assert (tmp_path / "used" / "search.toml").is_file()
