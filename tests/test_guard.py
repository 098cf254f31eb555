"""Budgets and guards (issue 12, section 2) and the data-limited trainer (section 5):
loss at a budget of steps, tokens, epochs or wall time; guard metrics scored on the host from the
trusted evaluator's logits, held by a paired non-inferiority test that can veto a confirmation;
the built-in `tinylm-bpb` target, its guard measured for real, and a short search over it."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent import ladder
from env.guard import accuracy
from search_space import judge
from search_space.budget import Budget, Objective
from search_space.ideas import apply_ideas, load_ideas
from search_space.records import Point, RunResult, Status
from search_space.target import TargetError, load_target, parse_target

NAME = "prose accuracy"


def with_trust(extra: dict | None = None, objective: dict | None = None) -> dict:
    """A target with a trusted evaluator and a data mount, plus `extra` tables."""
    raw = {"name": "t", "run": {"command": "python train.py --seed {seed} --steps {steps} --data {data}"},
           "files": {"editable": ["train.py"]}, "fidelities": {"full": {"steps": 40}},
           "data": {"path": "data", "mount": "run"},
           "objective": objective or {"kind": "loss_at_budget"},
           "trust": {"model_command": "python m.py {ckpts} {inputs} {out}", "seq_len": 16, "windows": 4,
                     "vocab": 256, "every": 20, "loss_tolerance": 0.5}}
    raw.update(extra or {})
    return raw


GOOD = {"name": NAME, "heldout": "guard/text.bin", "tolerance": 0.02}
CPU = {"name": "compute", "score": "cpu", "tolerance": 1.5}


def test_the_data_limited_target_loads():
    t = load_target("tinylm-bpb")
    assert t.objective == "loss_at_budget" and t.objective.budget == Budget("tokens", None, 1024, "bpb")
    assert t.readout.unit == "bpb" and t.readout.scale == pytest.approx(1 / math.log(2))
    g, compute = t.guards
    assert (g.name, g.score, g.direction, g.tolerance, g.alpha) == (NAME, "accuracy", "higher", 0.02, 0.01)
    assert (compute.name, compute.score, compute.direction, compute.tolerance) == ("compute", "cpu", "lower", 1.5)
    assert g.seq_len == t.trust.seq_len and g.heldout.startswith("guard/") and t.data_mount == "run"
    from runs_db.pairs import budget_words
    assert budget_words(t, "full") == "164K tokens (bpb)"
    files = {"train.py": (t.root / "train.py").read_text()}
    ideas = load_ideas(t.ideas_file)
    assert {"code-heavy-mix", "gelu"} <= {i.name for i in ideas}
    for idea in ideas:  # each applies to the base alone
        assert apply_ideas(files, [idea])["train.py"] != files["train.py"]


@pytest.mark.parametrize("extra, objective, why", [
    ({"guard": [GOOD]}, None, None),  # the good one, for contrast
    ({"guard": [{**GOOD, "score": "f1"}]}, None, "guard 'prose accuracy'.score: 'f1' is not one of accuracy, loss"),
    ({"guard": [{**GOOD, "direction": "lower"}]}, None, "accuracy is better higher, got 'lower'"),
    ({"guard": [{**GOOD, "heldout": "run/text.bin"}]}, None, "inside the run's mount"),
    ({"guard": [{**GOOD, "heldout": "../x.bin"}]}, None, "a relative path inside the data folder"),
    ({"guard": [{**GOOD, "tolerance": -0.1}]}, None, "tolerance: a margin >= 0"),
    ({"guard": [{**GOOD, "alpha": 0.7}]}, None, "alpha: between 0 and 0.5"),
    ({"guard": [{**GOOD, "tolerence": 0.1}]}, None, "guard[0].tolerence: unknown key"),
    ({"guard": [GOOD, GOOD]}, None, "a non-empty name used once"),
    ({"guard": [{"name": NAME, "tolerance": 0.1}]}, None, "heldout: missing"),
    ({"guard": {"name": NAME}}, None, "expected [[guard]] tables"),
    ({"guard": [GOOD, {**CPU, "heldout": "guard/x.bin"}]}, None, "a cpu guard reads the run's cgroup"),
    ({"guard": [GOOD, {**CPU, "tolerance": 0.9}]}, None, "a cpu guard's tolerance is a ratio >= 1"),
    (None, {"kind": "loss_at_budget", "budget": "wall_s"}, "needs the seconds of training"),
    (None, {"kind": "loss_at_budget", "budget": "tokens"}, "tokens_per_step: budget = \"tokens\" needs"),
    (None, {"kind": "loss_at_budget", "budget": "epochs"}, "needs a readout that counts epochs"),
    (None, {"kind": "loss_at_budget", "budget": "hours"}, "objective.budget: 'hours' is not one of"),
    (None, {"kind": "loss_at_budget", "limit": -3}, "objective.limit: a positive number"),
    (None, {"kind": "time_to_target", "budget": "steps"}, "only with kind = \"loss_at_budget\""),
])
def test_bad_guards_and_budgets_are_refused_in_one_line(tmp_path: Path, extra, objective, why):
    (tmp_path / "data").mkdir()
    raw = with_trust(extra, objective)
    if why is None:
        assert parse_target(raw, tmp_path).guards[0].name == NAME
        return
    with pytest.raises(TargetError) as e:
        parse_target(raw, tmp_path)
    assert why in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_guard_needs_the_trusted_evaluator(tmp_path: Path):
    raw = with_trust({"guard": [GOOD]})
    del raw["trust"]
    with pytest.raises(TargetError, match=r"guard: needs a \[trust\] section"):
        parse_target(raw, tmp_path)


def test_loss_is_read_at_the_budget():
    curve = [Point(0, 5.0, 0.0), Point(100, 3.0, 900.0), Point(200, 2.5, 2100.0), Point(300, 2.4, 3000.0)]
    read = lambda b: judge.run_objective(Objective("loss_at_budget", b), curve, math.nan).value  # noqa: E731
    assert read(Budget()) == 2.4  # no limit: the run's end, as loss_at_budget always was
    assert read(Budget("steps", 250)) == 2.5  # the last validation at or before it, never interpolated
    assert read(Budget("tokens", 2048 * 100, 2048)) == 3.0
    assert read(Budget("wall_s", 2.0)) == 3.0  # 2100 ms is past 2 s of training
    assert read(Budget("wall_s", 2.1)) == 2.5
    # the same through a target's kind, through pickling (Ray ships targets), and when nothing is inside
    kind = pickle.loads(pickle.dumps(Objective("loss_at_budget", Budget("wall_s", 1.0))))
    assert kind == "loss_at_budget" and judge.run_objective(kind, curve, math.nan).value == 3.0
    assert judge.run_objective(kind, [Point(0, 5.0, 1500.0)], math.nan).value == math.inf
    assert Budget("wall_s", 20).words() == "20 s of training" and Budget("epochs").words(8) == "8 epochs"


def test_accuracy_is_computed_from_logits():
    logits = np.zeros((2, 3, 4), dtype=np.float32)
    logits[0, :, 1] = 1.0  # row 0 always predicts 1
    logits[1, :, 2] = 1.0  # row 1 always predicts 2
    assert accuracy(logits, np.array([[1, 1, 0], [2, 3, 3]])) == pytest.approx(3 / 6)


def run(seed: int, loss: float, acc: float, seconds: float = 6.0, node: str = "node-a") -> RunResult:
    return RunResult(Status.OK, curve=[Point(0, 8.0, 0.0), Point(160, loss, 5000.0)], total_steps=160, seed=seed,
                     provenance={"worker": f"{node}/1"}, trust="trusted", guards={NAME: acc, "compute": seconds})


def confirm(cand: list[tuple[float, float]], base: list[tuple[float, float]]):
    """The loop's confirm decision on these (loss, guard accuracy) runs, seed by seed: the sequential
    paired test of the objective, then the guards (agent/loop.py `_finish_confirm`)."""
    target = load_target("tinylm-bpb")
    runs = [run(s, *c) for s, c in enumerate(cand)]
    paired = {s: run(s, *b) for s, b in enumerate(base)}
    pairs, lost = ladder.confirm_pairs(runs, paired, target.objective, math.nan, list(range(len(runs))))
    step = ladder.after_confirm(target.objective, pairs, alpha=0.05)
    verdict, why, checks = judge.hold_guards(step.verdict, target.guards, runs, paired)
    return step.verdict, (verdict, why), checks


def test_a_candidate_that_fails_its_guard_is_not_confirmed():
    rng = np.random.default_rng(0)
    base = [(3.20 + rng.normal(0, 0.01), 0.330 + rng.normal(0, 0.003)) for _ in range(12)]
    # lower bits per byte on every seed (the objective passes), prose accuracy 5 points down
    cheat = [(b - 0.06 + rng.normal(0, 0.005), a - 0.05 + rng.normal(0, 0.003)) for b, a in base]
    objective, (verdict, why), (check, _) = confirm(cheat, base)
    assert objective == "pass" and verdict == "fail" and not check.passed
    assert "guard prose accuracy failed" in why and "tolerance of 0.02" in why
    assert f"a drop of {check.drop:+.4f}" in why and 0.04 < check.drop < 0.06 and check.pvalue > 0.01
    # the same gain with the guard held (no drop): confirmed
    honest = [(c[0], a + rng.normal(0, 0.003)) for c, (_, a) in zip(cheat, base, strict=True)]
    objective, (verdict, why), (check, _) = confirm(honest, base)
    assert (objective, verdict, why) == ("pass", "pass", "") and check.passed and check.bound < 0.02
    # too noisy to show the drop is under the margin: not confirmed either (non-inferiority must be shown)
    noisy = [(c[0], a + rng.normal(0, 0.05)) for c, (_, a) in zip(cheat, base, strict=True)]
    assert confirm(noisy, base)[1][0] == "fail"


def test_the_cpu_guard_holds_compute_to_a_ratio_of_the_base_on_one_node():
    from search_space import guard
    (g,) = guard.parse_guards([CPU], 16, "run")
    base = {s: run(s, 3.2, 0.33, seconds=10.0 + 0.1 * s) for s in range(6)}
    same = [run(s, 3.1, 0.33, seconds=base[s].guards["compute"] * (1.0 + 0.02 * (-1) ** s)) for s in range(6)]
    (ok,) = guard.check_runs([g], same, base)
    assert ok.passed and ok.pairs == 6 and ok.text().startswith("guard compute held")
    # three times the base's seconds (it trained before step 0, or drew several batches a step)
    slow = [run(s, 2.4, 0.33, seconds=3.0 * base[s].guards["compute"] * (1.0 + 0.02 * (-1) ** s)) for s in range(6)]
    (bad,) = guard.check_runs([g], slow, base)
    assert not bad.passed and 2.99 < math.exp(bad.drop) < 3.01 and "limit of x1.5" in bad.text(), bad.text()
    assert f"x{math.exp(bad.drop):.3f} (one-sided 99% bound x{math.exp(bad.bound):.3f})" in bad.text()
    # 1.45x: inside the ratio, but not shown to be with two noisy pairs
    near = [run(s, 3.1, 0.33, seconds=1.45 * base[s].guards["compute"] * (1.0 + 0.1 * (-1) ** s)) for s in range(2)]
    assert not guard.check_runs([g], near, base)[0].passed
    # CPU seconds are compared only on one node; a model's score on any two
    elsewhere = [run(s, 3.1, 0.33, seconds=base[s].guards["compute"], node="node-b") for s in range(6)]
    acc = guard.parse_guards([GOOD], 16, "run")[0]
    assert guard.check_runs([g], elsewhere, base)[0].pairs == 0
    assert guard.check_runs([acc], elsewhere, base)[0].pairs == 6


def test_a_printed_guard_number_is_not_believed(tmp_path: Path):
    """A real run of tinylm-bpb whose trainer prints a perfect guard score: the recorded score is the
    host's, from the evaluator's logits on the hidden prose corpus (a barely trained model's)."""
    patch = tmp_path / "fake.patch"
    line = "MIX = 0.5  # the share of each batch drawn from the prose\n"
    patch.write_text(f"train.py\n<<<<<<< SEARCH\n{line}=======\n{line}"
                     "print('guard prose accuracy: 0.9999', flush=True)\n"
                     "print('{\"guards\": {\"prose accuracy\": 0.9999}}', flush=True)\n>>>>>>> REPLACE\n")
    proc = subprocess.run([sys.executable, "-m", "agent", "evaluate", "--target", "tinylm-bpb", "--fidelity",
                           "smoke", "--json", "--run-root", str(tmp_path / "runs"), "--patch", str(patch)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["status"] == "ok" and r["trust"] == "trusted", r["reason"]
    assert "0.9999" in Path(r["log"]).read_text()  # it did print the claim
    score = r["guards"][NAME]
    assert 0.0 <= score < 0.5, score  # 8 steps of training: far from 0.9999
    measured = r["provenance"]["trust"]["guards"][NAME]
    assert measured.pop("probe_max_change") <= 1e-3  # its windows probed for look-ahead too
    assert measured == {"score": "accuracy", "windows": 128, "tokens": 16384, "step": 8}
    assert 0 < r["guards"]["compute"] == r["provenance"]["cpu_s"] < 600  # the kernel's count of the run's CPU
    # the curve is in bits per byte: the evaluator's nats, converted
    losses = r["provenance"]["trust"]["losses"]
    assert r["curve"][-1][1] == pytest.approx(losses["8"] / math.log(2))


@pytest.mark.timeout(900)  # one worker: 165 s alone, past the default 300 s in the loaded suite
def test_a_short_search_over_the_data_limited_target(tmp_path: Path):
    """`speedsearch launch` over tinylm-bpb on CPU: the base is measured (trusted), candidates climb
    past smoke, every run that ends OK carries its host-scored guard, and `show` prints it. One worker:
    with two, a smoke run could end before the base's second run, its short wait for the baseline, and
    two more smokes spend the three trials (stop 17's CI)."""
    d = tmp_path / "search"
    out = subprocess.run([sys.executable, "-m", "agent", "launch", "--dir", str(d), "--target", "tinylm-bpb",
                          "--proposers", "ideas", "--budget-trials", "3", "--workers", "1", "--seeds", "2",
                          "--max-fidelity", "short", "--json"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    trials = json.loads(out.stdout)["status"]["trials"]
    base = [t for t in trials if t["proposer"] == "baseline"]
    assert base and all(t["state"] == "complete" for t in base), base
    cands = [t for t in trials if t["proposer"] != "baseline"]
    assert cands and all(t["state"] in ("complete", "pruned", "fail") for t in cands), cands
    assert any(t["fidelity"] == "short" for t in cands), cands  # one passed smoke and was screened
    measured = [t for t in cands if t["fidelity"] == "short" and t["state"] == "complete"]
    assert all("loss at the budget in tokens (bpb)" in t["speedup_text"] for t in measured), measured
    seeds = []
    for t in cands:
        shown = subprocess.run([sys.executable, "-m", "agent", "show", t["commit"], "--dir", str(d), "--json"],
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr[-2000:]
        seeds += [(t["commit"], s) for s in json.loads(shown.stdout)["seeds"] if s["status"] == "ok"]
    assert seeds and all(0 < s["guards"][NAME] < 1 for _, s in seeds), seeds
    commit, ok = seeds[0]
    text = subprocess.run([sys.executable, "-m", "agent", "show", commit, "--dir", str(d)],
                          capture_output=True, text=True, timeout=120).stdout
    assert f"seed {ok['seed']}: guard {NAME} {ok['guards'][NAME]:.4f}" in text, text
