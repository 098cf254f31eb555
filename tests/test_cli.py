"""The `speedsearch` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.toy import make_toy, mode_patch


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout)


def test_evaluate_json(tmp_path: Path):
    toy = make_toy(tmp_path / "toy", sleep=0.01)
    out = cli("evaluate", "--target", str(toy.source), "--seed", "3", "--fidelity", "short", "--json",
              "--run-root", str(tmp_path / "runs"))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["status"] == "ok" and data["reason"] == ""
    assert data["final"]["steps"] == 10 and data["final"]["val_loss"] > 0 and data["final"]["train_ms"] >= 0
    assert data["curve"][0][0] == 0 and len(data["curve"][0]) == 3
    assert data["wall_s"] > 0 and Path(data["log"]).exists() and data["seed"] == 3


def test_evaluate_bad_patch_exits_zero_with_status(tmp_path: Path):
    toy = make_toy(tmp_path / "toy")
    patch = tmp_path / "p.txt"
    patch.write_text(mode_patch("crash"))
    out = cli("evaluate", "--target", str(toy.source), "--patch", str(patch), "--json",
              "--run-root", str(tmp_path / "runs"))
    assert out.returncode == 0
    data = json.loads(out.stdout)
    assert data["status"] == "failed" and "boom" in data["reason"]


def test_usage_errors_exit_nonzero(tmp_path: Path):
    assert cli("evaluate", "--target", "no-such-target").returncode == 2
    toy = make_toy(tmp_path / "toy")
    assert cli("evaluate", "--target", str(toy.source), "--fidelity", "huge").returncode == 2
    assert cli("evaluate", "--target", str(toy.source), "--sandbox", "vm").returncode == 2
    assert cli("status", "--dir", str(tmp_path / "nothing")).returncode == 2
    assert cli("launch", "--dir", str(tmp_path / "x"), "--target", str(toy.source),
               "--proposers", "magic").returncode == 2


def test_targets_lists_builtins():
    out = cli("targets")
    assert out.returncode == 0 and "tinygpt" in out.stdout and "tinygpt-gpu" in out.stdout
    data = json.loads(cli("targets", "--json").stdout)
    names = {t["name"]: t for t in data["targets"]}
    assert {"tinygpt", "tinygpt-gpu", "tinygpt-ddp"} <= set(names) and names["tinygpt"]["full_steps"] > 0


def launch_toy(tmp_path: Path, *args: str) -> tuple[Path, subprocess.CompletedProcess]:
    """A search on the toy target with 2 seeds and 2 workers; returns its folder and the launch."""
    toy = make_toy(tmp_path / "toy", sleep=0.01)
    d = tmp_path / "search"
    out = cli("launch", "--dir", str(d), "--target", str(toy.source), "--seeds", "2", "--workers", "2", *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return d, out


def test_launch_then_status_json(tmp_path: Path):
    d, out = launch_toy(tmp_path, "--budget-trials", "6", "--max-fidelity", "short", "--json")
    launched = json.loads(out.stdout)  # --json: stdout is one object, the live display went to stderr
    assert launched["summary"]["stopped_by"] == "trials" and launched["summary"]["trials"] == 6
    assert launched["status"]["dir"] == str(d.resolve())
    status = cli("status", "--dir", str(d), "--json")
    data = json.loads(status.stdout)
    for key in ("study", "storage", "baseline", "best", "trials"):
        assert key in data
    assert data["storage"].startswith("sqlite:///") and set(data["baseline"]) == {"short"}
    t = data["trials"][0]
    for key in ("number", "commit", "parent", "proposer", "title", "state", "value", "fidelity"):
        assert key in t
    assert len([t for t in data["trials"] if t["proposer"] != "baseline"]) == 6


def test_replay_and_export(tmp_path: Path):
    d, _ = launch_toy(tmp_path, "--proposers", "ideas", "--max-fidelity", "full")
    data = json.loads(cli("status", "--dir", str(d), "--json").stdout)
    shown = data["best"] or data["leading"]  # no confirm rung here: the leading candidate, never "best"
    assert shown is not None, data["trials"]
    commit = shown["commit"]
    out = cli("replay", "--dir", str(d), "--commit", commit[:10], "--seeds", "3")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "replay-1 of" in out.stdout and "vs base, 3 pairs" in out.stdout and "speedrun rule" in out.stdout
    data = json.loads(cli("status", "--dir", str(d), "--json").stdout)
    replays = [t for t in data["trials"]
               if t["proposer"] == "replay" or t["title"].startswith("baseline beside replay")]
    assert len(replays) == 2 and all(t["state"] == "complete" for t in replays)
    export = ("export", "--dir", str(d), "--commit", commit[:10], "--name", "DoubleRate", "--out", str(tmp_path / "x"),
              "--allow-untrusted")  # the toy target has no trusted evaluator
    out = cli(*export)
    assert out.returncode == 0, out.stdout + out.stderr
    # the toy target is a plain folder: export made it a git repository, the record is on a branch
    folder = subprocess.run(["git", "-C", str(tmp_path / "toy"), "ls-tree", "-r", "--name-only", "record/DoubleRate",
                             "records/"], capture_output=True, text=True).stdout
    assert "_DoubleRate/README.md" in folder and "_DoubleRate/pr.md" in folder
    again = cli(*export)  # the record exists already: refused, nothing overwritten
    assert again.returncode == 2 and "error" in again.stderr


def test_a_stop_at_the_minutes_budget_leaves_no_run_behind(tmp_path: Path):
    """Runs in flight when the minutes budget ends are cancelled: their sandboxes' volumes are
    unmounted and none of their processes survives the search."""
    import psutil

    from env.volume import mounted_under

    toy = make_toy(tmp_path / "toy", sleep=0.5)  # 20 steps of 0.5 s: runs are always in flight
    d = tmp_path / "search"
    out = cli("launch", "--dir", str(d), "--target", str(toy.source), "--seeds", "2", "--workers", "2",
              "--budget-minutes", "0.3", "--drain-minutes", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stopped: minutes" in out.stdout
    assert (d / "runs").is_dir() and any((d / "runs").iterdir()), "no run was started"
    assert mounted_under(d) == []
    left = []
    for p in psutil.process_iter():
        try:
            if p.cwd().startswith(str(d)):
                left.append((p.pid, p.cmdline()))
        except (psutil.Error, OSError):
            pass
    assert left == []
