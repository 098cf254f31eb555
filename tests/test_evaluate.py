"""evaluate(): every bad input becomes a status with a reason; nothing crashes the caller."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from env.evaluate import RunSpec, evaluate, make_sandbox
from env.stats import Band
from search_space.records import Point, RunResult, Status
from tests.toy import make_toy, mode_patch


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy") / "toy", timeout_s=4, sleep=0.02)


@pytest.fixture(scope="module")
def sandbox():
    return make_sandbox("process")


def run(toy, sandbox, tmp_path, patch=None, **kw) -> RunResult:
    return evaluate(RunSpec(toy, seed=0, fidelity="full", patch=patch, **kw), sandbox, tmp_path)


def test_ok_run_reads_the_curve(toy, sandbox, tmp_path):
    r = run(toy, sandbox, tmp_path)
    assert r.status == Status.OK, r.reason
    assert [p.step for p in r.curve] == [0, 4, 8, 12, 16, 20]
    assert r.curve[-1].val_loss < r.curve[0].val_loss
    d = r.to_dict()
    assert d["final"]["steps"] == 20 and d["status"] == "ok" and Path(d["log"]).exists()
    assert d["provenance"]["host"] and "torch" in d["provenance"]


def test_patch_that_does_not_apply(toy, sandbox, tmp_path):
    patch = "train.py\n<<<<<<< SEARCH\nRATE = 9.0\n=======\nRATE = 2.0\n>>>>>>> REPLACE\n"
    r = run(toy, sandbox, tmp_path, patch)
    assert r.status == Status.INVALID and "SEARCH text not found" in r.reason


def test_unified_diff_patch(toy, sandbox, tmp_path):
    diff = ("--- a/train.py\n+++ b/train.py\n@@ -9,3 +9,3 @@\n # EVOLVE-BLOCK-START\n-RATE = 1.0\n+RATE = 2.0\n"
            " SLEEP = 0.02\n")
    r = run(toy, sandbox, tmp_path, diff)
    assert r.status == Status.OK, r.reason
    assert r.curve[-1].val_loss < 1.5  # RATE 2 ends near 1 + 3 exp(-2); the base near 2.1


@pytest.mark.parametrize("patch, why", [
    ("target.toml\n<<<<<<< SEARCH\nname = \"toy\"\n=======\nname = \"x\"\n>>>>>>> REPLACE\n", "frozen"),
    ("--- a/../evil.py\n+++ b/../evil.py\n@@ -0,0 +1 @@\n+x\n", "escape the workspace"),
    ("--- a/.git/config\n+++ b/.git/config\n@@ -0,0 +1 @@\n+x\n", "git's own files"),
    ("diff --git a/train.py b/train.py\nnew mode 120000\n", "symbolic links"),
    ("train.py\n<<<<<<< SEARCH\nimport argparse\n=======\nimport argparse, os\n>>>>>>> REPLACE\n", "EVOLVE-BLOCK"),
])
def test_forbidden_patches_are_invalid(toy, sandbox, tmp_path, patch, why):
    r = run(toy, sandbox, tmp_path, patch)
    assert r.status == Status.INVALID and why in r.reason


def test_trainer_that_raises(toy, sandbox, tmp_path):
    r = run(toy, sandbox, tmp_path, mode_patch("crash"))
    assert r.status == Status.FAILED and "boom: the trainer raised" in r.reason


def test_nan_loss_fails(toy, sandbox, tmp_path):
    r = run(toy, sandbox, tmp_path, mode_patch("nan"))
    assert r.status == Status.FAILED and "nan" in r.reason


def test_untrusted_target_records_the_observed_clock(tmp_path, sandbox):
    """A target without [trust] is accepted and marked untrusted; its recorded times are what the
    sandbox observed, so a trainer that claims 1 ms per validation gains nothing."""
    toy = make_toy(tmp_path / "slow", sleep=0.05)
    r = run(toy, sandbox, tmp_path, mode_patch("lie"))
    assert r.status == Status.OK and r.trust == "untrusted" and not r.trusted
    assert [p.train_ms for p in r.claimed] == [0.0] + [1.0] * 5
    assert [p.val_loss for p in r.curve] == [p.val_loss for p in r.claimed]
    assert r.curve[-1].train_ms >= 20 * 50  # twenty 50 ms sleeps lie between step 0 and step 20


@pytest.mark.parametrize("mode", ["hang", "hang-child"])
def test_hang_times_out_and_leaves_no_process(toy, sandbox, tmp_path, mode):
    r = run(toy, sandbox, tmp_path, mode_patch(mode))
    assert r.status == Status.TIMEOUT
    # This test's processes only (another test may run a silent trainer at the same time): the
    # hang-child carries its run's folder in its argv.
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and str(tmp_path) in " ".join(p.info["cmdline"])]
    assert not leftovers, leftovers


def test_memory_limit_fails_naming_it(toy, sandbox, tmp_path):
    r = run(toy, sandbox, tmp_path, mode_patch("oom"))
    assert r.status == Status.FAILED and "512" in r.reason and "memory" in r.reason


def test_band_prunes_a_worse_curve(toy, sandbox, tmp_path):
    steps = (0, 4, 8, 12, 16, 20)
    band = Band(steps, (4.0, 1.1, 1.05, 1.02, 1.01, 1.0), (0.01,) * 6, (0.0,) * 6)
    r = run(toy, sandbox, tmp_path, band=band)
    assert r.status == Status.PRUNED and "above the baseline band" in r.reason
    assert r.curve[-1].step < 20


def test_secrets_never_reach_the_candidate(toy, sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-secret-value")
    patch = ('train.py\n<<<<<<< SEARCH\nMODE = "ok"\n=======\nMODE = "ok"\nimport os\n'
             'print("KEY=" + os.environ.get("ANTHROPIC_API_KEY", "none"))\n>>>>>>> REPLACE\n')
    r = run(toy, sandbox, tmp_path, patch)
    assert r.status == Status.OK
    assert "KEY=none" in Path(r.log).read_text()


def test_result_round_trip():
    r = RunResult(Status.OK, curve=[Point(0, 4.0, 0.0), Point(10, 3.0, 5.0)], total_steps=10, seed=3)
    assert RunResult.from_dict(r.to_dict()) == r
    assert os.path.basename(r.log) == ""
