"""Record-size targets, the parts a CPU checks: start-up allowance, the failing rank's traceback,
templated env, relative data paths, a memory default that follows the machine, knobs on class
fields and keyword arguments, and `speedsearch init --from` on a speedrun-style trainer."""

from __future__ import annotations

import dataclasses
import subprocess
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import app
from env.data import DataError
from env.evaluate import RunSpec, _link_data, evaluate, first_traceback, make_sandbox
from env.machine import default_memory_mb, run_memory_mb, runs_that_fit, total_memory_mb
from env.readout import CurveReader
from env.trusted_log import log_problems
from search_space.knobs import knob_changes, read_constant, rewrite_constant
from search_space.records import Status
from search_space.target import Readout, TargetError, Trust, load_target, parse_target

# A speedrun-style trainer, written for these tests: hyperparameters in a dataclass, optimizers
# configured by keyword, data found by relative globs (Path.glob refuses absolute patterns, as the
# record's loader does), the record's validation line. Pure Python: the loss is a formula.
TRAINER = '''"""A tiny speedrun-style trainer."""
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Hyperparameters:
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # relative, as the loader wants
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    num_iterations: int = 120
    cooldown_frac: float = 0.4
    val_loss_every: int = 20
    vocab_size: int = 256
    warmup_iters: int = 8


args = Hyperparameters()
args.num_iterations = int(os.environ.get("NUM_ITERATIONS", args.num_iterations))
seed = int(os.environ.get("SEED", "0"))


class Muon:
    def __init__(self, params, lr=0.02, momentum=0.95):
        self.params, self.lr, self.momentum = params, lr, momentum


class Adam:
    def __init__(self, groups, betas=(0.9, 0.99), eps=1e-8):
        self.groups = groups


def load(pattern):
    files = sorted(Path.cwd().glob(pattern))
    assert files, f"no files match {pattern}"
    return b"".join(f.read_bytes() for f in files)


train, val = load(args.train_files), load(args.val_files)
hidden_matrix_params, embed_params, head_params = [0.0], [1.0], [2.0]
muon = Muon(hidden_matrix_params, lr=0.05, momentum=0.95)
adam = Adam([dict(params=embed_params, lr=0.6), dict(params=head_params, lr=0.22)], betas=(0.8, 0.95), eps=1e-10)
time.sleep(float(os.environ.get("WARMUP_S", "0")))  # a compile, before step 0
rate = muon.lr * 10 + adam.groups[0]["lr"] * 0.1
floor = 3.0 + (sum(val) % 7) / 100 + seed * 1e-3
training_time_ms, t0 = 0.0, time.perf_counter()
for step in range(args.num_iterations + 1):
    if step == args.num_iterations or step % args.val_loss_every == 0:
        training_time_ms += 1000 * (time.perf_counter() - t0)
        val_loss = floor + 2 * math.exp(-rate * step / 10)
        print(f"step:{step}/{args.num_iterations} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms "
              f"step_avg:{training_time_ms / max(step, 1):.2f}ms", flush=True)
        t0 = time.perf_counter()
    if step < args.num_iterations:
        time.sleep(0.001)
'''


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def trainer_repo(tmp_path_factory) -> Path:
    """The trainer in a git repo, its shards beside it in data/fineweb10B (ignored by git)."""
    repo = tmp_path_factory.mktemp("speedrun") / "speedrun"
    (repo / "data" / "fineweb10B").mkdir(parents=True)
    (repo / "train_gpt.py").write_text(TRAINER)
    (repo / ".gitignore").write_text("data/fineweb10B/\n")
    for split in ("train", "val"):
        (repo / "data" / "fineweb10B" / f"fineweb_{split}_000000.bin").write_bytes(bytes(range(256)) * 4)
    git(repo, "init", "-q")
    git(repo, "add", "train_gpt.py", ".gitignore")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "trainer")
    return repo


@pytest.fixture(scope="module")
def inited(trainer_repo: Path):
    """`speedsearch init --from train_gpt.py --json` run once; its output and the written target."""
    result = CliRunner().invoke(app, ["init", "--from", str(trainer_repo / "train_gpt.py"), "--json"])
    assert result.exit_code == 0, result.output
    import json

    return json.loads(result.output), load_target(trainer_repo)


@pytest.fixture(scope="module")
def sandbox():
    return make_sandbox("process")


def minimal(**over) -> dict:
    raw = {"name": "t", "run": {"command": "python train.py"}, "files": {"editable": ["train.py"]},
           "fidelities": {"full": {"steps": 10}}}
    raw.update(over)
    return raw


# ---- 1. start-up allowance ------------------------------------------------------------------------

def test_startup_s_extends_the_timeout(tmp_path: Path):
    t = parse_target(minimal(resources={"timeout_s": 60, "startup_s": 540}), tmp_path)
    assert t.resources.startup_s == 540 and t.resources.run_timeout_s == 600
    assert parse_target(minimal(), tmp_path).resources.run_timeout_s == 600  # none declared: as before
    with pytest.raises(TargetError, match="resources: out of range"):
        parse_target(minimal(resources={"startup_s": -1}), tmp_path)


TRUST = Trust(model_command="x", seq_len=8, windows=4, vocab=5, every=10, loss_tolerance=0.1,
              clock_slack_ms=20, startup_allowance_s=5)


def fed(lines: list[tuple[float, str]]) -> CurveReader:
    reader = CurveReader(Readout(), 20, TRUST.pause_regex)
    for t, line in lines:
        reader.feed(line, now=t)
    return reader


def lazy_compile(compile_s: float, claim_ms: float = 1000.0) -> list[tuple[float, str]]:
    """A trainer that compiles at its first training step with its timer stopped: the first
    interval is observed `compile_s` longer than it claims."""
    c = compile_s
    return [(0.0, "step:0/20 val_start"), (0.5, "step:0/20 val_loss:5.0 train_time:0ms"),
            (1.5 + c, "step:10/20 val_start"), (2.0 + c, f"step:10/20 val_loss:4.0 train_time:{claim_ms:.0f}ms"),
            (3.0 + c, "step:20/20 val_start"), (3.5 + c, "step:20/20 val_loss:3.0 train_time:2000ms")]


def test_clock_check_forgives_compile_only_within_startup_s():
    problems, _ = log_problems(TRUST, fed(lazy_compile(8.0)), 20, started=-1.0)
    assert len(problems) == 1 and problems[0].startswith("clock: the log claims 1000 ms of training between "
                                                         "steps 0 and 10, the sandbox observed 9000 ms")
    problems, info = log_problems(TRUST, fed(lazy_compile(8.0)), 20, started=-1.0, startup_s=10)
    assert problems == [] and info["compile_in_clock_s"] == 8.0 and info["startup_s"] == 1.0
    # start-up before step 0 spends the same allowance: 4 s of it leaves 6 s, not enough for 8
    problems, _ = log_problems(TRUST, fed(lazy_compile(8.0)), 20, started=-9.0, startup_s=10)
    assert len(problems) == 1 and problems[0].startswith("clock:")
    problems, _ = log_problems(TRUST, fed(lazy_compile(0.0)), 20, started=-14.0, startup_s=10)
    assert problems == []  # 14 s before step 0 fits 5 + 10
    problems, _ = log_problems(TRUST, fed(lazy_compile(0.0)), 20, started=-16.0, startup_s=10)
    assert problems == ["start-up: 16.0 s passed before step 0, the allowance is 15 s"]
    # an over-claim (more training time than observed) is counted, not a problem: the curve keeps the
    # observed times, and a line Docker handed over late makes the next interval look short
    # (here it leaves 100 ms for the next interval, an under-claim, which is one)
    problems, info = log_problems(TRUST, fed(lazy_compile(0.0, claim_ms=1900)), 20, started=-1.0)
    assert info["over_claims"] == 1 and problems == [
        "clock: the log claims 100 ms of training between steps 10 and 20, the sandbox observed 1000 ms "
        "(tolerance 10% + 20 ms)"]
    late = lazy_compile(0.0)
    late[1] = (1.45, late[1][1])  # step 0's line handed over late, with step 10's marker
    problems, info = log_problems(TRUST, fed(late), 20, started=-1.0)
    assert problems == [] and info["over_claims"] == 1


def test_startup_s_keeps_a_slow_start_from_timing_out(inited, sandbox, tmp_path: Path):
    _, target = inited
    slow = dataclasses.replace(target, env={**target.env, "WARMUP_S": "3"},
                               resources=dataclasses.replace(target.resources, timeout_s=2.0, startup_s=0.0))
    r = evaluate(RunSpec(slow, fidelity="smoke"), sandbox, tmp_path)
    assert r.status == Status.TIMEOUT, r.reason
    allowed = dataclasses.replace(slow, resources=dataclasses.replace(slow.resources, startup_s=10.0))
    r = evaluate(RunSpec(allowed, fidelity="smoke"), sandbox, tmp_path)
    assert r.status == Status.OK, r.reason


# ---- 2. the failing rank's traceback --------------------------------------------------------------

def test_first_traceback_of_the_root_cause_rank(tmp_path: Path):
    log = tmp_path / "run.log"
    log.write_text("\n".join([
        "starting",
        "[rank0]: Traceback (most recent call last):",
        "[rank1]: Traceback (most recent call last):",
        "[rank0]:   File \"t.py\", line 3, in <module>",
        "[rank1]:   File \"t.py\", line 9, in step",
        "[rank0]: RuntimeError: peer went away",
        "[rank1]:     x = model(batch)",
        "[rank1]: torch.OutOfMemoryError: CUDA out of memory",
        "Root Cause (first observed failure):", "[0]:", "  rank      : 1 (local_rank: 1)", ""]))
    assert first_traceback(log) == ("Traceback (most recent call last):\n  File \"t.py\", line 9, in step\n"
                                    "    x = model(batch)\ntorch.OutOfMemoryError: CUDA out of memory")
    log.write_text("Traceback (most recent call last):\n  File \"a.py\", line 1\nKeyError: 'x'\n\nDuring handling "
                   "of the above exception, another exception occurred:\n\nTraceback (most recent call last):\n"
                   "ValueError: later\n")
    assert first_traceback(log).endswith("KeyError: 'x'")
    log.write_text("Traceback (most recent call last):\n" + "".join(f"  frame {i}\n" for i in range(200)) + "E: deep\n")
    clipped = first_traceback(log).splitlines()
    assert len(clipped) == 61 and clipped[-1] == "E: deep" and clipped[10] == "  ... 142 lines ..."
    log.write_text("no traceback here\n")
    assert first_traceback(log) == ""


def test_torchrun_failure_quotes_the_failing_rank(tmp_path: Path, sandbox):
    """A real torchrun, two CPU ranks: rank 1 raises; rank 0, stopped by the launcher's SIGTERM,
    prints a long goodbye, and the launcher's own report and traceback follow: the cause is far
    from the log's tail (ordered by the signal, not by timing)."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "fail.py").write_text(
        "import signal, sys, time\nimport torch.distributed as dist\ndist.init_process_group('gloo')\n"
        "def bye(*_):\n    for i in range(60):\n        print(f'rank 0 shutting down, item {i:<100}|', flush=True)\n"
        "    sys.exit(1)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "if dist.get_rank() == 1:\n    def inner():\n        raise ValueError('rank one broke')\n    inner()\n"
        "time.sleep(120)\n")
    (tmp_path / "t" / "target.toml").write_text(
        'name = "ddp"\n[run]\ncommand = "torchrun --standalone --nproc_per_node=2 fail.py"\n'
        '[files]\neditable = ["fail.py"]\n[fidelities]\nfull = { steps = 1 }\n'
        '[resources]\ncpus = 2\ntimeout_s = 300\n')
    r = evaluate(RunSpec(load_target(tmp_path / "t")), sandbox, tmp_path / "runs")
    assert r.status == Status.FAILED
    assert "first traceback:\nTraceback (most recent call last):\n" in r.reason, r.reason
    trace = r.reason.split("first traceback:\n")[1].split("\nlog tail:")[0]
    assert trace.endswith("ValueError: rank one broke") and "[rank1]" not in trace and "inner()" in trace
    assert "ChildFailedError" in r.reason.split("log tail:")[1]  # the launcher's report stays, after it


# ---- 3 and 4. templated env, relative data ------------------------------------------------------

def test_env_placeholders_are_checked_and_filled(tmp_path: Path):
    (tmp_path / "d").mkdir()
    raw = minimal(run={"command": "python train.py", "env": {"STEPS": "{steps}", "FILES": "{data_rel}/x_*.bin",
                                                            "N": "{nproc}", "D": "{data}", "S": "{seed}"}},
                  data={"path": "d", "link": "data/fw"})
    t = parse_target(raw, tmp_path)
    assert t.render_env(seed=3, steps=40, data="/abs/d") == {"STEPS": "40", "FILES": "data/fw/x_*.bin", "N": "1",
                                                             "D": "/abs/d", "S": "3"}
    with pytest.raises(TargetError, match=r"run.env.X: unknown placeholder \{oops\}"):
        parse_target(minimal(run={"command": "python train.py", "env": {"X": "{oops}"}}), tmp_path)
    with pytest.raises(TargetError, match=r"run.command: \{data_rel\} needs data.link"):
        parse_target(minimal(run={"command": "python train.py {data_rel}"}, data={"path": "d"}), tmp_path)
    for bad in ("/abs", "../up", "."):
        with pytest.raises(TargetError, match="data.link"):
            parse_target(minimal(data={"path": "d", "link": bad}), tmp_path)


def test_init_target_runs_with_templated_env_and_relative_data(inited, sandbox, tmp_path: Path):
    """The written target runs as is: steps and seed reach the trainer through `run.env`, and its
    relative globs find the data through the link (the run's folder is not the data's)."""
    _, target = inited
    assert target.env == {"NUM_ITERATIONS": "{steps}", "SEED": "{seed}"}
    assert target.data_link == "data/fineweb10B" and target.steps("short") == 30
    r = evaluate(RunSpec(target, seed=2, fidelity="short"), sandbox, tmp_path)
    assert r.status == Status.OK, r.reason
    assert [p.step for p in r.curve] == [0, 20, 30]
    assert abs(r.curve[0].val_loss - (5.0 + (sum(bytes(range(256)) * 4) % 7) / 100 + 0.002)) < 1e-3
    linked = dataclasses.replace(target, data_link="train_gpt.py")  # a link over the candidate's own file
    r = evaluate(RunSpec(linked, fidelity="smoke"), sandbox, tmp_path)
    assert r.status == Status.FAILED and "data.link: train_gpt.py already exists" in r.reason


def test_data_link_never_leaves_the_workdir(tmp_path: Path):
    """A tree whose `data` is a link (or a file) gets no data link through it: the host would
    write outside the workdir."""
    elsewhere, work, data = tmp_path / "elsewhere", tmp_path / "work", tmp_path / "d"
    for d in (elsewhere, work, data):
        d.mkdir()
    (work / "data").symlink_to(elsewhere)
    target = parse_target(minimal(data={"path": "d", "link": "data/fineweb10B"}), tmp_path)
    with pytest.raises(DataError, match="data.link: data in the candidate's tree is no folder"):
        _link_data(target, work, data)
    assert list(elsewhere.iterdir()) == []
    (work / "data").unlink()
    _link_data(target, work, data)
    assert (work / "data" / "fineweb10B").resolve() == data.resolve()


# ---- 5. memory ----------------------------------------------------------------------------------

def test_default_memory_follows_the_machine(tmp_path: Path):
    assert parse_target(minimal(), tmp_path).resources.memory_mb is None
    cores_fit = runs_that_fit(0, 1)
    assert cores_fit >= 1 and runs_that_fit(0, 10_000) == 1
    assert default_memory_mb(0, 1) == max(512, int(0.8 * total_memory_mb() / cores_fit))
    assert default_memory_mb(0, 10_000) == int(0.8 * total_memory_mb())  # one run fits: most of the machine
    assert run_memory_mb(3072, 0, 1) == 3072 and run_memory_mb(None, 0, 1) == default_memory_mb(0, 1)
    assert 0 < total_memory_mb() < 1 << 30


# ---- 6. knobs on class fields and keyword arguments -----------------------------------------------

def test_knobs_reach_fields_and_keywords(tmp_path: Path):
    files = {"train_gpt.py": TRAINER}
    knobs = [{"name": "cooldown", "low": 0.1, "high": 0.9, "key": "Hyperparameters.cooldown_frac"},
             {"name": "muon_lr", "low": 0.01, "high": 0.1, "key": "Muon(lr)"},
             {"name": "head_lr", "low": 0.1, "high": 0.5, "key": "dict(head_params, lr)"},
             {"name": "warm", "type": "int", "low": 1, "high": 20, "key": "Hyperparameters.warmup_iters"}]
    (tmp_path / "train_gpt.py").write_text(TRAINER)
    raw = minimal(knobs=[{**k, "via": "constant", "file": "train_gpt.py"} for k in knobs])
    t = parse_target(raw, tmp_path)
    out = knob_changes(files, t.knobs, {"cooldown": 0.25, "muon_lr": 0.07, "head_lr": 0.3, "warm": 12})
    text = out["train_gpt.py"]
    assert "    cooldown_frac: float = 0.25\n" in text and "    warmup_iters: int = 12\n" in text
    assert "muon = Muon(hidden_matrix_params, lr=0.07, momentum=0.95)" in text
    assert "dict(params=embed_params, lr=0.6), dict(params=head_params, lr=0.3)" in text
    assert read_constant(text, "dict(embed_params, lr)") == "0.6" and read_constant(text, "Muon(momentum)") == "0.95"
    # the rest of the file is untouched
    assert len(text.splitlines()) == len(TRAINER.splitlines())
    assert rewrite_constant("args.lr = 0.1  # a dotted name that is no class\n", "args.lr", 0.2).startswith(
        "args.lr = 0.2  #")
    assert rewrite_constant("f(a, lr=1)\nf(b, lr=2)\n", "f(b, lr)", 3) == "f(a, lr=1)\nf(b, lr=3)\n"
    for missing in ("Hyperparameters.nope", "Muon(nope)", "Nope(lr)"):
        with pytest.raises(KeyError):
            rewrite_constant(TRAINER, missing, 1)


# ---- 7. speedsearch init --from -------------------------------------------------------------------

def test_init_writes_a_target_that_loads_and_whose_knobs_apply(inited, trainer_repo: Path):
    report, target = inited
    raw = tomllib.loads((trainer_repo / "target.toml").read_text())
    assert raw["run"]["command"] == "python train_gpt.py" and raw["readout"]["format"] == "speedrun"
    assert target.steps("full") == 120 and target.repo == trainer_repo.resolve()
    assert target.data_path == (trainer_repo / "data" / "fineweb10B").resolve()
    keys = {k.name: k.target_key for k in target.knobs}
    assert keys == {"cooldown_frac": "Hyperparameters.cooldown_frac", "warmup_iters": "Hyperparameters.warmup_iters",
                    "muon_lr": "Muon(lr)", "muon_momentum": "Muon(momentum)",
                    "embed_lr": "dict(embed_params, lr)", "head_lr": "dict(head_params, lr)"}
    assert report["knobs"] == list(keys)
    assert "Hyperparameters.val_loss_every = 20" in report["left_out"]
    assert any("no [trust] section" in line for line in report["not_inferred"])
    assert not any(line.startswith("data") for line in report["not_inferred"])  # found, and ignored by git
    source = {"train_gpt.py": TRAINER}
    for knob in target.knobs:  # each knob moves its own value and nothing else
        assert knob.low < float(read_constant(TRAINER, knob.target_key)) < knob.high
        changed = knob_changes(source, target.knobs, {knob.name: knob.high})["train_gpt.py"]
        assert float(read_constant(changed, knob.target_key)) == knob.high
        others = [k for k in target.knobs if k is not knob]
        assert [read_constant(changed, k.target_key) for k in others] == \
               [read_constant(TRAINER, k.target_key) for k in others]


def test_init_says_what_it_could_not_infer(tmp_path: Path):
    (tmp_path / "t").mkdir()
    script = tmp_path / "t" / "train.py"
    script.write_text("import torch\nimport torch.distributed as dist\ndist.init_process_group('nccl')\n"
                      "model = torch.compile(torch.nn.Linear(2, 2).cuda())\nlr = 0.1\n"
                      "opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)\n"
                      "print(f'it {1} loss {2.0}')\n")
    runner = CliRunner()
    result = runner.invoke(app, ["init", "--from", str(script), "--dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for words in ("steps: no step count", "{seed}: the trainer takes no seed", "readout: no validation line",
                  "resources.startup_s = 600", "data: no glob", "wrote"):
        assert words in text, words
    target = load_target(tmp_path / "out")
    assert target.command == "torchrun --standalone --nproc_per_node={nproc} train.py"
    assert target.resources.gpus == 1 and target.resources.startup_s == 600
    assert [k.target_key for k in target.knobs] == ["SGD(lr)", "SGD(momentum)"]
    again = runner.invoke(app, ["init", "--from", str(script), "--dir", str(tmp_path / "out")])
    assert again.exit_code == 2 and "already holds a target.toml" in again.output
    bad = tmp_path / "bad.py"
    bad.write_text("def (:\n")
    broken = runner.invoke(app, ["init", "--from", str(bad), "--dir", str(tmp_path / "b")])
    assert broken.exit_code == 2 and "not Python" in broken.output and not (tmp_path / "b").exists()


def test_init_takes_a_step_count_read_from_the_environment(tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text("import os\nfrom dataclasses import dataclass\n\n\n@dataclass\nclass Hyperparameters:\n"
                      "    num_iterations: int = int(os.environ.get('NUM_ITERATIONS', '500'))\n"
                      "    seed: int = int(os.environ.get('SEED', 0))\n    lr: float = 0.01\n\n\n"
                      "print(f'step:{1}/{2} val_loss:{3.0:.4f} train_time:{4:.0f}ms step_avg:{5:.2f}ms')\n")
    result = CliRunner().invoke(app, ["init", "--from", str(script)])
    assert result.exit_code == 0, result.output
    target = load_target(tmp_path)
    assert target.env == {"NUM_ITERATIONS": "{steps}", "SEED": "{seed}"}
    assert target.steps("full") == 500 and target.steps("smoke") == 5 and target.steps("short") == 125
    assert [k.target_key for k in target.knobs] == ["Hyperparameters.lr"]
    assert "readout" not in result.output and "{steps}" not in result.output
