"""Export: a branch in the target's own repository with the change applied and a record folder whose
numbers come only from replays (fresh seeds no rung used to select the candidate)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import subprocess
from pathlib import Path

import pytest
from scipy import stats

from runs_db import record_text
from runs_db.db import RunsDB
from runs_db.export import ExportError, export
from runs_db.pairs import replay_pairs
from search_space.records import RunResult
from search_space.target import load_target
from tests.test_runs_db import TRAIN, make_target, run_result

DAY = datetime.date(2025, 1, 31)
TARGET = 3.5
CONFIRM_SEEDS = [1_000_001, 1_000_002]  # confirm's: they selected the candidate, never in the record
SEEDS = [1_000_101, 1_000_102, 1_000_103, 1_000_104]  # the replay's fresh seeds
CAND_LOSS = [3.271, 3.274, 3.269, 3.276]
CAND_MS = [900.0, 910.0, 905.0, 895.0]
BASE_LOSS = [3.280, 3.282, 3.279, 3.281]
BASE_MS = [1000.0, 1010.0, 990.0, 1005.0]
PROV = {"worker": "node1/0", "platform": "Linux-6.1-x86_64", "python": "3.11.7", "torch": "2.5.1+cu124",
        "cuda": "12.4", "cpu": "x86_64", "gpu_model": "NVIDIA H100 80GB HBM3", "host": "secret-host"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def trusted(r: RunResult, worker: str = "node1/0", where: Path | None = None) -> RunResult:
    log = r.log + (f"data from {where}/data/shard_000.bin\n" if where else "")
    return dataclasses.replace(r, trust="trusted", provenance={**PROV, "worker": worker}, log=log)


def record(db: RunsDB, base: str, win: str, mid: str, where: Path) -> None:
    """A baseline; `mid`, then `win` selected at full by seed 0 and confirmed on 2 seeds; then a replay
    of `win` on 4 fresh seeds, plus a confirm seed repeated and a pair split across two nodes."""
    b = db.start_trial(base, None, "baseline", "baseline", "full", {"target_loss": TARGET})
    db.finish_trial(b, 1000.0, [trusted(run_result(i, 3.28, 1000)) for i in range(3)])
    n = db.start_trial(mid, None, "llm", "Raise LR", "full")
    db.finish_trial(n, 980.0, [trusted(run_result(0, 3.279, 980))])
    f = db.start_trial(win, None, "llm", "Fewer steps", "full")
    db.finish_trial(f, 700.0, [trusted(run_result(0, 3.20, 700))])  # the lucky seed that selected it
    c = db.start_trial(win, None, "llm", "Fewer steps", "confirm", {"alpha": 0.0012})
    pc = db.start_trial(base, None, "baseline", "baseline beside", "confirm", {"pairs_for": c})
    db.finish_trial(pc, 1000.0, [trusted(run_result(s, 3.28, 1000)) for s in CONFIRM_SEEDS])
    db.finish_trial(c, 800.0, [trusted(run_result(s, 3.0, 500)) for s in CONFIRM_SEEDS], {"verdict": "pass"})
    cand = [trusted(run_result(sd, loss, ms), where=where) for sd, loss, ms in zip(SEEDS, CAND_LOSS, CAND_MS,
                                                                                  strict=True)]
    bases = [trusted(run_result(sd, loss, ms)) for sd, loss, ms in zip(SEEDS, BASE_LOSS, BASE_MS, strict=True)]
    cand += [trusted(run_result(77, 3.27, 800)), trusted(run_result(CONFIRM_SEEDS[0], 3.0, 500))]
    bases += [trusted(run_result(77, 3.28, 1000), worker="node2/0"), trusted(run_result(CONFIRM_SEEDS[0], 3.28, 1000))]
    r = db.start_trial(win, None, "replay", "Fewer steps", "confirm", {"purpose": "replay-1", "steps": 10})
    pr = db.start_trial(base, None, "baseline", "baseline beside replay-1", "confirm", {"pairs_for": r})
    db.finish_trial(pr, 1000.0, bases)
    db.finish_trial(r, 900.0, cand)


def candidates(db: RunsDB, train: str) -> tuple[str, str]:
    mid, _ = db.commit_candidate(db.base_commit, {"train.py": train.replace("0.1", "0.2")}, "Raise LR",
                                 "Higher LR.", "llm")
    win, _ = db.commit_candidate(mid, {"train.py": train.replace("0.1", "0.2").replace("10", "9")},
                                 "Fewer steps", "Nine steps reach the target.\nMeasured twice.", "llm", model="m")
    return mid, win


@pytest.fixture
def search(tmp_path):
    target = make_target(tmp_path, git_repo=True)  # the base is HEAD~1 of the trainer's own repo
    with RunsDB.create(tmp_path / "s", {"plots": False}, target) as db:
        mid, win = candidates(db, TRAIN)
        record(db, db.base_commit, win, mid, tmp_path)
        yield db, target, win, mid


def files_in(repo: Path, ref: str, folder: str) -> dict[str, str]:
    names = git(repo, "ls-tree", "-r", "--name-only", ref, folder + "/").splitlines()
    return {n[len(folder) + 1:]: subprocess.run(["git", "-C", str(repo), "show", f"{ref}:{n}"], capture_output=True,
                                                check=True).stdout.decode("utf-8", "replace") for n in names}


def test_export_writes_a_branch_in_the_targets_repo(search, tmp_path):
    db, target, win, mid = search
    repo = Path(target.repo)
    head, status = git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain")
    done = export(db, win, "Fewer Steps", target, date=DAY)
    assert done.repo == repo and done.branch == "record/Fewer_Steps" and done.folder == "records/2025-01-31_Fewer_Steps"
    # on the commit the search's base came from (HEAD~1), the change applied; the checkout never moved
    assert git(repo, "rev-parse", f"{done.branch}~1") == git(repo, "rev-parse", "HEAD~1")
    assert git(repo, "show", f"{done.branch}:train.py") == TRAIN.replace("0.1", "0.2").replace("10", "9").strip()
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == status
    assert not (repo / "records").exists()

    got = files_in(repo, done.branch, done.folder)
    assert {"README.md", "pr.md", "statistics.json", "loss_curve.png"} <= set(got)
    logs = sorted(n for n in got if n.endswith(".txt"))
    assert logs == sorted([f"candidate/seed-{s}.txt" for s in SEEDS] + [f"baseline/seed-{s}.txt" for s in SEEDS])
    cand_log = got[f"candidate/seed-{SEEDS[0]}.txt"]
    assert cand_log.startswith(db.files(win, ["train.py"])["train.py"].rstrip() + "\n" + record_text.RULE)
    assert "gpu: NVIDIA H100 80GB HBM3" in cand_log and "step:10/10 val_loss:3.271" in cand_log
    assert got[f"baseline/seed-{SEEDS[0]}.txt"].startswith(TRAIN.rstrip() + "\n" + record_text.RULE)  # v1, the base

    st = json.loads(got["statistics.json"])
    # only the replay's fresh seeds: confirm's seeds, the repeated one and the split pair are out
    assert st["candidate"]["seeds"] == SEEDS and st["baseline"]["seeds"] == SEEDS and st["speedup"]["pairs"] == 4
    expected_p = stats.ttest_1samp(CAND_LOSS, TARGET, alternative="less").pvalue
    assert st["p_value"] == pytest.approx(expected_p) and st["lost_pairs"] == 2
    text = st["speedup_text"]
    assert text.startswith("time to loss 3.5: ") and st["speedup"]["low"] < st["speedup"]["estimate"]

    readme = got["README.md"]
    assert readme.startswith("# Fewer_Steps: Raise LR + Fewer steps\n")  # the title names every change
    assert "### 1. Raise LR\n\nHigher LR." in readme and "Nine steps reach the target.\nMeasured twice." in readme
    assert f"**Speed-up: {text}**, measured by replay (replay-1)" in readme
    assert "3.2710, 3.2740, 3.2690, 3.2760" in readme and f"p = {expected_p:.3g} over 4 seeds" in readme
    assert "## Hardware and software" in readme and "- torch: 2.5.1+cu124" in readme and "Proposer:" not in readme
    assert "not counted here): pass" in readme and "## Ablations" in readme and "Not run" in readme
    assert got["pr.md"].startswith("## Fewer_Steps: Raise LR + Fewer steps") and text in got["pr.md"]
    for name, body in got.items():  # no local path anywhere, no host name
        assert str(tmp_path) not in body and "/tmp/" not in body and "secret-host" not in body, name

    with pytest.raises(ExportError, match="branch record/Fewer_Steps already exists"):
        export(db, win, "Fewer Steps", target, date=DAY)
    with pytest.raises(ExportError, match="no replay runs"):  # confirm's runs selected it: not evidence
        export(db, mid, "RaiseLR", target, date=DAY)
    assert git(repo, "branch", "--list", "record/*") == "record/Fewer_Steps"


def test_replay_pairs_take_no_selecting_or_repeated_seed(search):
    db, target, win, _ = search
    p = replay_pairs(db, win, 10)
    assert [r.seed for r in p.candidate] == SEEDS and p.lost == 2
    assert not replay_pairs(db, win, 8).candidate  # another step count: record mode's, not the headline's


def test_untrusted_runs_need_the_flag(search, tmp_path):
    db, target, win, _ = search
    c = db.start_trial(win, None, "replay", "Fewer steps", "confirm", {"steps": 10})
    pb = db.start_trial(db.base_commit, None, "baseline", "beside replay", "confirm", {"pairs_for": c})
    db.finish_trial(pb, 1000.0, [run_result(5_000_001, 3.28, 1000)])  # untrusted: the default
    db.finish_trial(c, 900.0, [run_result(5_000_001, 3.27, 900)])
    with pytest.raises(ExportError, match="untrusted"):
        export(db, win, "Untrusted", target, date=DAY)
    done = export(db, win, "Untrusted", target, date=DAY, allow_untrusted=True)
    assert json.loads(files_in(done.repo, done.branch, done.folder)["statistics.json"])["untrusted_runs"] == 2


def test_a_plain_folder_becomes_a_repository_and_push_reaches_a_bare_remote(tmp_path):
    target = make_target(tmp_path)  # a plain folder
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    with RunsDB.create(tmp_path / "s", {"plots": False}, target) as db:
        mid, win = candidates(db, TRAIN)
        record(db, db.base_commit, win, mid, tmp_path)
        with pytest.raises(ExportError, match="--push .*does not answer"):
            export(db, win, "Nine", target, push=str(tmp_path / "nowhere.git"))
        assert not (Path(target.repo) / ".git").exists()  # refused before anything was made
        done = export(db, win, "Nine", target, push=str(bare))
    repo = Path(target.repo)
    assert (repo / ".git").is_dir() and git(repo, "log", "--format=%s", "main") == \
        "Base: the trainer as speedsearch found it"
    assert "__pycache__" not in git(repo, "ls-tree", "-r", "--name-only", "main")  # caches stay out
    assert git(bare, "rev-parse", "record/Nine") == done.commit == git(repo, "rev-parse", "record/Nine")
    assert done.pushed == str(bare)
    git(repo, "branch", "-D", "record/Nine")  # only the remote has it now: still a clash
    with RunsDB.open(tmp_path / "s") as db, pytest.raises(ExportError, match="already exists on"):
        export(db, win, "Nine", target, push=str(bare))
    assert git(repo, "branch", "--list", "record/*") == ""


def test_a_builtin_target_gets_a_new_repository_under_out(tmp_path):
    target = load_target("tinygpt")
    train = (Path(target.repo) / "train.py").read_text()
    out = tmp_path / "out"
    with RunsDB.create(tmp_path / "s", {"plots": False}, target) as db:
        changed = train.replace("import", "import", 1) + "\n# a harmless change\n"
        win, _ = db.commit_candidate(db.base_commit, {"train.py": changed}, "A comment", "Why not.", "llm")
        r = db.start_trial(win, None, "replay", "A comment", "confirm", {"steps": target.steps("full")})
        pr = db.start_trial(db.base_commit, None, "baseline", "beside", "confirm", {"pairs_for": r})
        db.finish_trial(pr, 1.0, [trusted(run_result(s, 3.3, 1000)) for s in SEEDS])
        db.finish_trial(r, 1.0, [trusted(run_result(s, 3.2, 900)) for s in SEEDS])
        done = export(db, win, "Comment", target, out=out)
        assert done.repo == (out / "tinygpt-records").resolve()
        assert git(done.repo, "show", "record/Comment:train.py") == changed.strip()
        with pytest.raises(ExportError, match="already exists"):
            export(db, win, "Comment", target, out=out)
    assert git(Path(target.repo).parent.parent.parent, "status", "--porcelain", "search_space/targets") == ""
