"""Export: a winner's record folder (README, logs, statistics, plot, PR body) and its branch."""

from __future__ import annotations

import datetime
import json
import math

import git
import pytest
from scipy import stats

from runs_db.db import RunsDB
from runs_db.export import ExportError, export, timing_ratio
from search_space.records import Status

try:
    from tests.test_runs_db import TRAIN, make_target, run_result
except ImportError:  # tests/ itself on sys.path
    from test_runs_db import TRAIN, make_target, run_result

DAY = datetime.date(2025, 1, 31)
CAND_LOSS = [3.271, 3.274, 3.269, 3.276]
CAND_MS = [900.0, 910.0, 905.0, 895.0]
BASE_LOSS = [3.280, 3.282, 3.279]
BASE_MS = [1000.0, 1010.0, 990.0]


@pytest.fixture
def search(tmp_path, storage_url, study_name):
    """A search with a baseline (3 seeds) and a two-step candidate (4 seeds at full, 1 at smoke)."""
    target = make_target(tmp_path)
    with RunsDB.create(tmp_path / "s", {"study_name": study_name, "plots": False}, target,
                       storage=storage_url) as db:
        base = db.base_commit
        b = db.start_trial(base, None, "baseline", "baseline", "full")
        db.finish_trial(b, 1000.0, [run_result(i, loss, ms) for i, (loss, ms) in
                                    enumerate(zip(BASE_LOSS, BASE_MS, strict=True))])
        mid, _ = db.commit_candidate(base, {"train.py": TRAIN.replace("0.1", "0.2")}, "Raise LR",
                                     "Higher LR.", "llm")
        n = db.start_trial(mid, None, "llm", "Raise LR", "full")
        db.finish_trial(n, 980.0, [run_result(0, 3.279, 980)])
        win, _ = db.commit_candidate(mid, {"train.py": TRAIN.replace("0.1", "0.2").replace("10", "9")},
                                     "Fewer steps", "Nine steps reach the target.\nMeasured twice.",
                                     "llm", model="claude-test")
        s = db.start_trial(win, None, "llm", "Fewer steps", "smoke")
        db.finish_trial(s, 90.0, [run_result(0, 3.9, 90, "smoke")])
        half = [run_result(i, loss, ms) for i, (loss, ms) in enumerate(zip(CAND_LOSS, CAND_MS, strict=True))]
        f1 = db.start_trial(win, None, "llm", "Fewer steps", "full")
        db.finish_trial(f1, 905.0, half[:2] + [run_result(9, 3.5, 1, status=Status.FAILED, reason="x")])
        f2 = db.start_trial(win, None, "llm", "Fewer steps", "full")
        db.finish_trial(f2, 900.0, half[2:])
        yield db, target, win, mid


def test_export_writes_the_record_folder(search, tmp_path):
    db, target, win, mid = search
    out = export(db, win, tmp_path / "out", "Fewer Steps!", target, date=DAY)
    assert out == tmp_path / "out" / "records" / "2025-01-31_Fewer_Steps"
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"README.md", "pr.md", "statistics.json", "candidate.patch", "loss_curve.png"} <= set(names)
    assert len([n for n in names if n.startswith("trial-")]) == 4  # the OK full-fidelity seeds
    assert len([n for n in names if n.startswith("baseline/")]) == 3
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"

    st = json.loads((out / "statistics.json").read_text())
    assert st["commit"] == win and st["fidelity"] == "full" and st["target_loss"] == 3.5
    assert sorted(st["candidate"]["val_loss"]) == sorted(CAND_LOSS)
    expected_p = stats.ttest_1samp(CAND_LOSS, 3.5, alternative="less").pvalue
    assert st["p_value"] == pytest.approx(expected_p)
    assert st["candidate"]["mean_val_loss"] == pytest.approx(sum(CAND_LOSS) / 4)
    tr = st["timing_ratio"]
    geo = math.exp(sum(map(math.log, CAND_MS)) / 4 - sum(map(math.log, BASE_MS)) / 3)
    assert tr["estimate"] == pytest.approx(geo) and tr["ci_low"] < geo < tr["ci_high"] < 1.0

    readme = (out / "README.md").read_text()
    assert readme.startswith("# Fewer steps\n\nNine steps reach the target.\nMeasured twice.\n")
    assert "Proposer:" not in readme and "```diff" in readme and "+LR = 0.2" in readme
    assert "| candidate | 4 |" in readme and "| baseline | 3 |" in readme
    assert f"p = {expected_p:.3g} over 4 seeds" in readme and "Timing ratio" in readme
    assert readme.index("Raise LR") < readme.index("Fewer steps (objective 900)")  # lineage from the base
    pr = (out / "pr.md").read_text()
    assert pr.startswith("## Fewer steps") and "records/2025-01-31_Fewer_Steps/" in pr
    assert (out / "candidate.patch").read_text() == db.diff(win, against=db.base_commit)
    with git.Repo(db.repo_path) as r:
        assert r.commit("export/Fewer_Steps").hexsha == win

    with pytest.raises(ExportError, match="exists"):
        export(db, win, tmp_path / "out", "Fewer Steps!", target, date=DAY)
    with pytest.raises(ExportError, match="no successful runs"):
        export(db, db.commit_candidate(win, {"new.py": "1\n"}, "Untried", "", "llm")[0],
               tmp_path / "out", "Untried", target, date=DAY)
    # One seed: no p-value, no CI, and the README says why.
    one = export(db, mid, tmp_path / "out", "RaiseLR", target, date=DAY)
    st1 = json.loads((one / "statistics.json").read_text())
    assert st1["p_value"] is None and st1["timing_ratio"]["ci_low"] is None
    assert "needs at least 2 seeds" in (one / "README.md").read_text()


def test_timing_ratio():
    same = timing_ratio([100.0, 101.0, 99.0], [100.0, 101.0, 99.0])
    assert same["estimate"] == pytest.approx(1.0) and same["ci_low"] < 1.0 < same["ci_high"]
    flat = timing_ratio([50.0, 50.0], [100.0, 100.0])
    assert flat["estimate"] == pytest.approx(0.5) and flat["ci_low"] == flat["ci_high"] == pytest.approx(0.5)
    assert flat["speedup"] == pytest.approx(2.0)
    assert timing_ratio([], [1.0]) is None
