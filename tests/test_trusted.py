"""Trusted measurement (issue 7, part 1): no recorded number rests on the candidate's word.

The hostile suite runs each attack through the real `speedsearch evaluate --target tinygpt --json`
(process sandbox, real torch, the real held-out split) and checks that the run is refused with the
detection named, while an honest run of the same fidelity is `ok` and `trusted`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from env.readout import CurveReader
from env.trusted import cross_entropy, lookahead_problem, probe_inputs, rule_checkpoint
from env.trusted_log import CheckpointKeeper, log_problems, observed_curve
from search_space.records import Point, RunResult, Status
from search_space.target import Readout, TargetError, Trust, load_target
from tests import hostile_measure as H

TINYGPT = load_target("tinygpt")


def evaluate_cli(tmp_path: Path, fidelity: str, patch: str | None = None,
                 sandbox: str = "process", target: str = "tinygpt") -> tuple[dict, str]:
    args = [sys.executable, "-m", "agent", "evaluate", "--target", target, "--fidelity", fidelity,
            "--json", "--run-root", str(tmp_path / "runs"), "--sandbox", sandbox]
    if patch is not None:
        (tmp_path / "attack.patch").write_text(patch)
        args += ["--patch", str(tmp_path / "attack.patch")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    return result, Path(result["log"]).read_text()


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """One honest run per fidelity the attacks use, evaluated once for the module."""
    root = tmp_path_factory.mktemp("honest")
    return {f: evaluate_cli(root / f, f) for f in ("smoke", "short")}


@pytest.mark.parametrize("fidelity", ["smoke", "short"])
def test_honest_run_is_ok_and_trusted(honest, fidelity):
    r, log = honest[fidelity]
    assert r["status"] == "ok" and r["trust"] == "trusted", r["reason"]
    steps = TINYGPT.steps(fidelity)
    assert [p[0] for p in r["curve"]] == sorted({*range(0, steps, 20), steps})
    assert "val_start" in log  # the frozen trainer marks where its timed region pauses
    losses = r["provenance"]["trust"]["losses"]
    # The recorded loss is the evaluator's, not the log's (they differ: held-out vs dev split).
    assert {int(k): round(v, 6) for k, v in losses.items()} == {p[0]: round(p[1], 6) for p in r["curve"]}
    assert [p[1] for p in r["claimed"]] != [p[1] for p in r["curve"]]
    assert r["provenance"]["trust"]["probe_rows"] == 8
    assert 0 < r["provenance"]["trust"]["startup_s"] < TINYGPT.trust.startup_allowance_s


def refused(result: dict, log: str, marker: str | None, detection: str) -> None:
    assert "invalid change" not in result["reason"], result["reason"]  # the patch applied
    if marker:
        assert marker in log, log[-2000:]  # the attack ran
    assert result["status"] == "invalid", (result["status"], result["reason"])
    assert result["trust"] == "untrusted"
    assert detection in result["reason"], result["reason"]


@pytest.mark.parametrize("factor", [0.5, 0.85])
def test_forged_clock(honest, tmp_path, factor):
    """Far past the 10 % tolerance (0.5x) and just past it (0.85x)."""
    r, log = evaluate_cli(tmp_path, "short", H.forged_clock(factor))
    refused(r, log, f"ATTACK: perf_counter rebound to {factor}x", "clock: the log claims")
    assert "the sandbox observed" in r["reason"] and "tolerance 10%" in r["reason"]


def test_a_clock_problem_does_not_hide_a_loss_problem(honest, tmp_path):
    """A timing problem leaves the checkpoints whole, so the losses are still measured and the reason
    names both (stop 17's CI: a late line under load tripped the clock before the loss check ran)."""
    r, log = evaluate_cli(tmp_path, "short", H.forged_clock(0.5) + H.REWRITTEN_STDOUT)
    refused(r, log, "ATTACK: stdout rewrites val_loss", "clock: the log claims")
    assert "loss: the log claims val_loss" in r["reason"], r["reason"]


def test_rewritten_stdout(honest, tmp_path):
    r, log = evaluate_cli(tmp_path, "smoke", H.REWRITTEN_STDOUT)
    refused(r, log, "ATTACK: stdout rewrites val_loss", "loss: the log claims val_loss")
    assert "the trusted evaluation measured" in r["reason"]


def test_forged_last_line_and_early_exit(honest, tmp_path):
    r, log = evaluate_cli(tmp_path, "short", H.FORGED_LAST_LINE)
    refused(r, log, "ATTACK: forged last line", "validations expected at steps 0, 20, 40, 60, 75")
    assert "no checkpoint for step 75" in r["reason"]


def test_validation_on_a_subset(honest, tmp_path):
    r, log = evaluate_cli(tmp_path, "smoke", H.SUBSET_VALIDATION)
    refused(r, log, "ATTACK: evaluate swapped", "loss: the log claims val_loss")


def test_training_on_validation_data(honest, tmp_path):
    r, log = evaluate_cli(tmp_path, "smoke", H.TRAIN_ON_VALIDATION)
    refused(r, log, "ATTACK: memorised 128 validation windows", "loss: the log claims val_loss")
    assert "ATTACK: the held-out split is not readable" in log  # it does not exist for the run


def test_single_line_log(honest, tmp_path):
    r, log = evaluate_cli(tmp_path, "smoke", H.SINGLE_LINE)
    refused(r, log, "step:5/5 val_loss:0.0100", "validations expected at steps 0, 5; the log has 5")


def test_look_ahead_attention(honest, tmp_path):
    r, log = evaluate_cli(tmp_path, "smoke", H.LOOK_AHEAD)
    refused(r, log, None, "look-ahead: logits at position")
    assert "when only tokens after position" in r["reason"]


def test_rewriting_earlier_checkpoints_changes_nothing(honest, tmp_path):
    """The host copies each checkpoint when its validation line arrives, so a run that later replaces
    them with its final model still gets the curve it really had: the honest run's, to the digit."""
    r, log = evaluate_cli(tmp_path, "short", H.REWRITTEN_CHECKPOINTS)
    assert "ATTACK: 4 earlier checkpoints replaced" in log  # steps 0, 20, 40, 60
    assert r["status"] == "ok" and r["trust"] == "trusted", r["reason"]
    base = honest["short"][0]
    assert [round(p[1], 5) for p in r["curve"]] == [round(p[1], 5) for p in base["curve"]]


# The same attacks through the Docker sandbox: the measurement does not depend on which sandbox ran
# the trainer (one test per class; the held-out split is not mounted in the container either).
DOCKER_ATTACKS = {
    "forged-clock-0.85": ("short", H.forged_clock(0.85), "ATTACK: perf_counter rebound to 0.85x",
                          "clock: the log claims"),
    "rewritten-stdout": ("smoke", H.REWRITTEN_STDOUT, "ATTACK: stdout rewrites val_loss", "loss: the log claims"),
    "forged-last-line": ("short", H.FORGED_LAST_LINE, "ATTACK: forged last line", "no checkpoint for step 75"),
    "subset-validation": ("smoke", H.SUBSET_VALIDATION, "ATTACK: evaluate swapped", "loss: the log claims"),
    "train-on-validation": ("smoke", H.TRAIN_ON_VALIDATION, "ATTACK: the held-out split is not readable",
                            "loss: the log claims"),
    "single-line": ("smoke", H.SINGLE_LINE, "step:5/5 val_loss:0.0100", "validations expected at steps 0, 5"),
    "look-ahead": ("smoke", H.LOOK_AHEAD, None, "look-ahead: logits at position"),
}


@pytest.fixture(scope="module")
def docker_tinygpt(tmp_path_factory) -> str:
    """tinygpt with a 120 s start-up allowance: in the loaded suite a container's torch import took 35 s
    of the built-in 30 (honest or not), and these tests are about the checks after step 0."""
    folder = tmp_path_factory.mktemp("tinygpt-docker") / "tinygpt"
    shutil.copytree(TINYGPT.source.parent, folder)
    toml = folder / "target.toml"
    assert "startup_allowance_s = 30\n" in toml.read_text()
    toml.write_text(toml.read_text().replace("startup_allowance_s = 30\n", "startup_allowance_s = 120\n"))
    return str(toml)


@pytest.mark.docker
def test_honest_run_is_trusted_under_docker(tmp_path, docker_tinygpt):
    r, _ = evaluate_cli(tmp_path, "smoke", sandbox="docker", target=docker_tinygpt)
    assert r["status"] == "ok" and r["trust"] == "trusted", r["reason"]
    assert r["provenance"]["sandbox"] == "docker"


@pytest.mark.docker
@pytest.mark.parametrize("attack", sorted(DOCKER_ATTACKS))
def test_measurement_attacks_under_docker(tmp_path, attack, docker_tinygpt):
    fidelity, patch, marker, detection = DOCKER_ATTACKS[attack]
    r, log = evaluate_cli(tmp_path, fidelity, patch, sandbox="docker", target=docker_tinygpt)
    assert r["provenance"]["sandbox"] == "docker"
    refused(r, log, marker, detection)


# ---- the pieces, on their own ---------------------------------------------------------------------

TRUST = Trust(model_command="x", seq_len=8, windows=4, vocab=5, every=10, loss_tolerance=0.1,
              clock_slack_ms=20)


def fed(lines: list[tuple[float, str]]) -> CurveReader:
    """A reader fed lines at given arrival times (seconds), as the sandbox would stamp them."""
    reader = CurveReader(Readout(), 20, TRUST.pause_regex)
    for t, line in lines:
        reader.feed(line, now=t)
    return reader


def honest_lines(claim_ms: float = 1000.0) -> list[tuple[float, str]]:
    return [(0.0, "step:0/20 val_start"), (0.5, "step:0/20 val_loss:5.0 train_time:0ms step_avg:0.00ms"),
            (1.5, "step:10/20 val_start"), (2.0, f"step:10/20 val_loss:4.0 train_time:{claim_ms:.0f}ms"),
            (3.0, "step:20/20 val_start"), (3.5, f"step:20/20 val_loss:3.0 train_time:{2 * claim_ms:.0f}ms")]


def test_clock_check_uses_the_pause_markers():
    problems, info = log_problems(TRUST, fed(honest_lines()), 20, started=-1.0)
    assert problems == [] and info["startup_s"] == 1.0
    problems, _ = log_problems(TRUST, fed(honest_lines(claim_ms=870)), 20, started=-1.0)
    assert problems == ["clock: the log claims 870 ms of training between steps 10 and 20, the sandbox observed "
                        "1000 ms (tolerance 10% + 20 ms); 1 more intervals disagree"]


def test_observed_curve_counts_the_pauses():
    curve = observed_curve(fed(honest_lines()), {0: 5.5, 10: 4.5, 20: 3.5})
    assert curve == [Point(0, 5.5, 0.0), Point(10, 4.5, 1500.0), Point(20, 3.5, 3000.0)]


def test_irregular_log_and_slow_start():
    lines = honest_lines()[4:]
    problems, _ = log_problems(TRUST, fed(lines), 20, started=-100.0)
    assert problems[0] == "log: validations expected at steps 0, 10, 20; the log has 20"
    assert problems[1].startswith("start-up: 103.0 s passed before step 0")


def test_the_log_is_read_on_while_a_checkpoint_is_copied(tmp_path: Path):
    """The keeper copies on its own thread: `take` returns while a copy is still under way, so the next
    line's arrival is stamped when it comes (a copy inline once stamped an honest run's pause marker
    180 ms late on a loaded machine, and the clock check called the run's log a lie)."""
    work, keep = tmp_path / "work", tmp_path / "keep"
    work.mkdir()
    trust = Trust(model_command="x", seq_len=8, windows=4, vocab=5, every=10, loss_tolerance=0.1,
                  checkpoints="ckpt_{step}.pt")
    for step in (0, 10):
        (work / f"ckpt_{step}.pt").write_bytes(bytes([step]) * 100)
    keeper = CheckpointKeeper(trust, work, keep)
    release, copying = threading.Event(), threading.Event()
    real_copy = keeper.copy

    def slow_copy(step: int) -> None:
        copying.set()
        release.wait(30)
        real_copy(step)

    keeper.copy = slow_copy
    keeper.take(0)
    keeper.take(10)  # returned although the first copy is held up
    assert copying.wait(30) and keeper.kept == {}
    release.set()
    keeper.settle()
    assert sorted(keeper.kept) == [0, 10] and (keep / "step_000010.pt").read_bytes() == bytes([10]) * 100
    keeper.take(20)  # no such file: recorded as missing, the keeper goes on
    keeper.settle()
    assert 20 in keeper.missing and sorted(keeper.kept) == [0, 10]


def test_cross_entropy_matches_the_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 5)).astype(np.float32)
    targets = rng.integers(0, 5, size=(3, 4))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = -np.mean(np.log(np.take_along_axis(p, targets[..., None], -1)))
    assert abs(cross_entropy(logits, targets) - want) < 1e-6


def test_probe_changes_only_tokens_after_each_rows_cut():
    rng = np.random.default_rng(1)
    windows = rng.integers(0, 256, size=(16, 33))
    x, cuts = probe_inputs(windows, 8, rng)
    assert len(cuts) == 8 and len(set(cuts.values())) > 1  # cuts vary across rows
    for r in range(16):
        cut = cuts.get(r, 31)
        assert (x[r, :cut + 1] == windows[r, :cut + 1]).all()
        if r in cuts:
            assert (x[r, cut + 1:] != windows[r, cut + 1:32]).any()
    logits = rng.normal(size=(16, 32, 5))
    leaked = logits.copy()
    r, cut = next(iter(cuts.items()))
    leaked[r, cut] += 0.5
    assert lookahead_problem(logits, logits.copy(), cuts, 1e-3)[0] is None
    why, d = lookahead_problem(logits, leaked, cuts, 1e-3)
    assert why.startswith(f"look-ahead: logits at position {cut} changed by 0.5") and d == pytest.approx(0.5)


def test_trust_section_is_parsed_and_checked(tmp_path):
    t = TINYGPT.trust
    assert t is not None and t.every == 20 and t.clock_tolerance == 0.10 and TINYGPT.data_mount == "run"
    for name in ("tinygpt-gpu", "tinygpt-ddp"):
        assert load_target(name).trust is not None
    base = (TINYGPT.source.read_text())
    for bad, why in [("every = 20", "every = 0"), ("vocab = 256", "vocab = 256\nbogus = 1"),
                     ('checkpoints = "ckpt/step_{step:06d}.pt"', 'checkpoints = "../x_{step}.pt"'),
                     ("--out {out}", "--out {elsewhere}")]:
        (tmp_path / "target.toml").write_text(base.replace(bad, why))
        for f in ("train.py", "ideas.toml"):
            (tmp_path / f).write_text((TINYGPT.root / f).read_text())
        with pytest.raises(TargetError, match=r"trust\."):
            load_target(tmp_path)


def test_old_records_read_as_untrusted():
    old = {"status": "ok", "curve": [[0, 4.0, 0.0]], "total_steps": 10}
    r = RunResult.from_dict(old)
    assert r.trust == "untrusted" and r.claimed == [] and not r.trusted
    r2 = RunResult(Status.OK, curve=[Point(0, 4.0, 0.0)], claimed=[Point(0, 3.9, 0.0)], trust="trusted")
    assert RunResult.from_dict(json.loads(json.dumps(r2.to_dict()))) == r2


def test_the_rules_are_probed_at_a_checkpoint_the_model_cannot_know():
    """A time to target counts wherever the curve crosses: always probing the last checkpoint would let
    a model keep to the rules there only. A loss at a budget is probed where it is read."""
    steps = [0, 20, 40, 60, 75]
    rng = np.random.default_rng(0)
    drawn = {rule_checkpoint(steps, None, rng) for _ in range(200)}
    assert drawn == set(steps)
    assert {rule_checkpoint(steps, 40, rng) for _ in range(20)} == {40}
    assert rule_checkpoint([], None, rng) is None
