"""Any log (search_space/readout.py, env/readout.py): a regex readout with named groups; epochs as
steps; perplexity and bits per byte; the sandbox's arrival times where the log has no clock; a bad
pattern refused when the target loads; and a whole search over an epoch trainer's own table."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from env.evaluate import RunSpec, evaluate, make_sandbox
from env.readout import CurveReader
from search_space.readout import Readout
from search_space.target import TargetError, load_target, parse_target

TABLE = r"\|\s*(?P<epoch>\d+)\s*\|\s*\d+\s*\|\s*[-+\w.]+\s*\|\s*(?P<ppl>[\w.]+)\s*\|"  # the ppl column


def minimal(readout: dict) -> dict:
    return {"name": "t", "run": {"command": "python train.py --seed {seed} --epochs {steps}"},
            "files": {"editable": ["train.py"]}, "fidelities": {"full": {"steps": 4}}, "readout": readout}


@pytest.mark.parametrize("readout, why", [
    ({"format": "regex"}, "readout.pattern: format = \"regex\" needs a pattern"),
    ({"format": "regex", "pattern": "loss (?P<loss>[\\d.]+"}, "readout.pattern: does not compile"),
    ({"format": "regex", "pattern": "epoch (?P<epoch>\\d+)"}, "needs exactly one of the named groups loss, ppl, bpb"),
    ({"format": "regex", "pattern": "(?P<loss>[\\d.]+) (?P<ppl>[\\d.]+)"}, "(has loss, ppl)"),
    ({"format": "regex", "pattern": "(?P<step>\\d+) (?P<epoch>\\d+) (?P<loss>[\\d.]+)"}, "step and epoch both"),
    ({"format": "regex", "pattern": "(?P<loss>[\\d.]+) (?P<acc>[\\d.]+)"}, "unknown named group(s) acc"),
    ({"format": "regex", "pattern": "(?P<bpb>[\\d.]+)"}, "reads bpb; set readout.unit"),
    ({"format": "regex", "pattern": "(?P<loss>[\\d.]+)", "unit": "bpb"}, "needs readout.tokens_per_byte"),
    ({"format": "regex", "pattern": "(?P<loss>[\\d.]+)", "unit": "bits"}, "readout.unit: 'bits'"),
    ({"format": "regex", "pattern": "(?P<loss>[\\d.]+)", "tokens_per_byte": -1}, "not a positive number"),
    ({"format": "csv"}, "readout.format: 'csv' is not one of speedrun, jsonl, regex"),
    ({"pattern": "(?P<loss>[\\d.]+)"}, "only with format = \"regex\""),
    ({"format": "regex", "patern": "(?P<loss>[\\d.]+)"}, "did you mean pattern?"),
])
def test_a_bad_readout_is_refused_when_the_target_loads(tmp_path: Path, readout: dict, why: str):
    with pytest.raises(TargetError) as e:
        parse_target(minimal(readout), tmp_path)
    assert why in str(e.value), str(e.value)
    assert "\n" not in str(e.value)  # one line


def test_an_epoch_table_with_perplexity_and_no_clock(tmp_path: Path):
    readout = parse_target(minimal({"format": "regex", "pattern": TABLE}), tmp_path).readout
    assert readout.counts == "epoch"
    reader = CurveReader(readout, total_steps=3, started=100.0)
    lines = ["| epoch | n_ctx | loss | ppl | note |", "|---|---|---|---|---|",
             "| 1 | 256 | 2.0000 | 7.389 | warm-up |", "some other output",
             "| 2 | 256 | 1.5000 | 4.4817 | |", "| 3 | 256 | 1.2000 | 3.3201 | best |"]
    for k, line in enumerate(lines):
        reader.feed(line, now=100.0 + k)
    assert [p.step for p in reader.points] == [1, 2, 3]
    # the value is ln(ppl), read from the ppl column (the pattern names one value)
    assert [round(p.val_loss, 3) for p in reader.points] == [round(math.log(v), 3) for v in (7.389, 4.4817, 3.3201)]
    assert [p.train_ms for p in reader.points] == [2000.0, 4000.0, 5000.0]  # arrivals since the run started
    assert reader.problem is None and reader.incomplete() is None


def test_the_kth_match_is_point_k_and_the_trainers_clock_wins(tmp_path: Path):
    ro = Readout(format="regex", pattern=r"eval loss=(?P<loss>[\d.]+) after (?P<ms>\d+)ms")
    reader = CurveReader(ro, total_steps=2, started=0.0)
    reader.feed("eval loss=3.5 after 120ms", now=50.0)
    reader.feed("eval loss=3.1 after 240ms", now=60.0)
    assert [(p.step, p.val_loss, p.train_ms) for p in reader.points] == [(1, 3.5, 120.0), (2, 3.1, 240.0)]
    assert reader.incomplete() is None
    short = CurveReader(ro, total_steps=3, started=0.0)
    short.feed("eval loss=3.5 after 120ms", now=1.0)
    assert short.incomplete() == "the last validation was at step 1 of 3"


def test_bits_per_byte_from_a_loss(tmp_path: Path):
    raw = minimal({"format": "regex", "pattern": r"step (?P<step>\d+) val (?P<loss>[\d.]+)", "unit": "bpb",
                   "tokens_per_byte": 0.25})
    reader = CurveReader(parse_target(raw, tmp_path).readout, total_steps=10, started=0.0)
    point = reader.feed("step 10 val 2.0", now=1.0)
    assert point is not None and point.val_loss == pytest.approx(2.0 * 0.25 / math.log(2))


def test_a_broken_line_is_flagged_and_a_diverged_one_stops(tmp_path: Path):
    ro = Readout(format="regex", pattern=r"epoch (?P<epoch>\d+) ppl (?P<ppl>\S+)")
    reader = CurveReader(ro, total_steps=3, started=0.0)
    reader.feed("epoch 1 ppl -4", now=1.0)  # ln of a negative perplexity
    assert reader.problem and "unreadable epoch line" in reader.problem
    reader.feed("epoch 2 ppl inf", now=2.0)
    assert reader.nonfinite and "at step 2" in reader.nonfinite


EPOCH_TRAINER = textwrap.dedent('''
    import argparse, math, random, time
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    random.seed(args.seed)
    # EVOLVE-BLOCK-START
    RATE = 1.0
    SLEEP = 0.05
    # EVOLVE-BLOCK-END
    print("| epoch | n_ctx | loss | ppl | note |", flush=True)
    for epoch in range(1, args.epochs + 1):
        time.sleep(SLEEP)
        loss = 1 + 3 * math.exp(-RATE * epoch / args.epochs) + random.gauss(0, 0.002)
        print(f"| {epoch} | 128 | {loss:.4f} | {math.exp(loss):.4f} | |", flush=True)
''')

EPOCH_TOML = f'''
name = "epochs"
description = "a trainer that prints its own table per epoch"
[repo]
path = "."
[run]
command = "python train.py --seed {{seed}} --epochs {{steps}}"
[files]
editable = ["train.py"]
frozen = ["target.toml"]
markers = true
[readout]
format = "regex"
pattern = '{TABLE}'
[objective]
kind = "loss_at_budget"
[fidelities]
smoke = {{ steps = 1 }}
short = {{ steps = 2 }}
full = {{ steps = 4 }}
[resources]
cpus = 1
memory_mb = 512
timeout_s = 60
[[knobs]]
name = "rate"
type = "float"
low = 0.5
high = 3.0
via = "constant"
key = "RATE"
file = "train.py"
'''


def epoch_target(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.py").write_text(EPOCH_TRAINER)
    (root / "target.toml").write_text(EPOCH_TOML)
    return load_target(root / "target.toml")


def test_an_epoch_trainers_run_through_the_sandbox(tmp_path: Path):
    target = epoch_target(tmp_path / "t")
    result = evaluate(RunSpec(target, seed=1, fidelity="full"), make_sandbox("process"), tmp_path / "runs")
    assert result.status.value == "ok", result.reason
    assert [p.step for p in result.curve] == [1, 2, 3, 4]
    times = [p.train_ms for p in result.curve]
    assert times == sorted(times) and times[0] >= 40  # observed: each epoch sleeps 50 ms first
    assert result.curve[-1].val_loss == pytest.approx(1 + 3 * math.exp(-1), abs=0.02)


def test_a_search_over_the_builtin_epoch_trainer(tmp_path: Path):
    """`tinylm-epochs` (search_space/targets/epochs), as a user launches it: its own table is read,
    every candidate ends measured, and the verdict speaks of the loss after 8 epochs."""
    import json
    import subprocess
    import sys

    d = tmp_path / "search"
    out = subprocess.run([sys.executable, "-m", "agent", "launch", "--dir", str(d), "--target", "tinylm-epochs",
                          "--budget-trials", "6", "--workers", "2", "--seeds", "2", "--allow-untrusted", "--json"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads(out.stdout)
    trials = data["status"]["trials"]
    base = [t for t in trials if t["proposer"] == "baseline"]
    assert base and all(t["state"] == "complete" for t in base), base
    cands = [t for t in trials if t["proposer"] != "baseline"]
    assert len(cands) == 6 and all(t["state"] in ("complete", "pruned", "fail") for t in cands), cands
    measured = [t for t in cands if t["fidelity"] in ("short", "full", "confirm") and t["state"] == "complete"]
    assert measured, cands  # candidates got past smoke: their epoch tables were read
    assert all("loss at" in t["speedup_text"] for t in measured if t["speedup_text"]), measured


def test_a_search_over_an_epoch_trainer(tmp_path: Path, ray_cluster):
    """The knobs sampler finds a higher RATE: the loss after 4 epochs falls, judged as a difference."""
    from agent.live import Live
    from agent.loop import Search
    from agent.runner import build_proposers, open_search
    from agent.settings import SearchSettings
    from env.pool import Pool

    target = epoch_target(tmp_path / "t")
    settings = SearchSettings(target=str(target.source), proposers=("knobs",), seeds=2, allow_untrusted=True,
                              budget_trials=14, workers=2)
    db, settings = open_search(tmp_path / "search", settings)
    with db:
        summary = Search(db, target, settings, Pool(run_root=tmp_path / "runs"), build_proposers(settings, target, db),
                         Live(enabled=False)).run()
        trials = db.trials()
    ran = [t for t in trials if t.proposer == "knobs"]
    assert ran and all(t.state in ("complete", "pruned", "fail") for t in ran), [t.state for t in ran]
    assert any(t.state == "complete" for t in ran)  # measured rungs: the epoch curves were read
    assert not any("no epoch line" in (t.reason or "") or "not to be trusted" in (t.reason or "") for t in ran)
    assert summary.trials >= 1
