"""The embedded tinygpt target: its corpus, its trainer's log format, and its idea library."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from env.data import ensure_data
from env.trusted import cross_entropy, heldout_windows
from search_space.edits import EditError
from search_space.ideas import apply_ideas, load_ideas
from search_space.knobs import read_constant, rewrite_constant
from search_space.rules import check_markers, outside_blocks
from search_space.target import SPEEDRUN_LINE, load_target

HERE = Path(__file__).resolve().parent.parent / "search_space" / "targets" / "tinygpt"
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:(\d+\.\d{4}|nan) train_time:(\d+)ms step_avg:(\d+\.\d{2})ms$")
TRAIN_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+)ms step_avg:(\d+\.\d{2})ms$")


def read_shard(path: Path) -> np.ndarray:
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
    tokens = np.fromfile(path, dtype="<u2", offset=1024)
    assert len(tokens) == header[2] and path.stat().st_size == 1024 + 2 * header[2]
    return tokens


def shard_docs(paths: list[Path]) -> list[bytes]:
    stream = np.concatenate([read_shard(p) for p in paths])
    assert stream.max() < 256 and stream[0] == 0
    return bytes(stream.astype(np.uint8)).split(b"\0")[1:]


@pytest.fixture(scope="module")
def data() -> Path:
    """The real corpus (this machine's data key's language), prepared as a search prepares it: the
    folder a training run sees (run/; the held-out split is beside it)."""
    return ensure_data(load_target("tinygpt"))


def train(tmp_path: Path, data: Path, text: str, *args: str) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "train.py").write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "train.py", "--data", str(data), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def train_here(tmp_path: Path, data: Path, text: str, *args: str) -> tuple[int, str]:
    """Run a trainer variant inside this process (no torch import per run): (exit status, stdout)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "train.py").write_text(text)
    out, argv = io.StringIO(), sys.argv
    sys.argv = ["train.py", "--data", str(data), *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.chdir(tmp_path):  # checkpoints land in tmp_path
            runpy.run_path(str(tmp_path / "train.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue()


def val_losses(stdout: str) -> list[tuple[int, float]]:
    return [(int(m[1]), float(m[3])) for m in map(VAL_LINE.match, stdout.splitlines()) if m]


def test_real_corpus(data: Path):
    assert (data.parent / "DONE").exists()
    train_paths = sorted(data.glob("train_*.bin"))
    assert train_paths and sum(len(read_shard(p)) for p in train_paths) > 2_000_000
    assert 100_000 < len(read_shard(data / "val_000.bin")) <= 2**20
    assert 100_000 < len(read_shard(data.parent / "heldout" / "val_000.bin")) <= 2**20


def test_baseline_prints_speedrun_lines(tmp_path: Path, data: Path):
    run = train(tmp_path, data, (HERE / "train.py").read_text(), "--seed", "1", "--steps", "3")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    vals = [VAL_LINE.match(x) for x in lines if "val_loss" in x]
    assert all(vals) and [int(m[1]) for m in vals] == [0, 3] and all(m[2] == "3" for m in vals)
    assert vals[0][4] == "0" and float(vals[1][3]) < float(vals[0][3])
    assert [m[1] for m in map(TRAIN_LINE.match, lines) if m] == ["3"]
    found = [m.groupdict() for m in re.finditer(SPEEDRUN_LINE, run.stdout)]
    assert [f["step"] for f in found] == ["0", "3"]  # the readout sees validation lines only
    again = train(tmp_path / "again", data, (HERE / "train.py").read_text(), "--seed", "1", "--steps", "3")
    assert val_losses(again.stdout) == val_losses(run.stdout)  # same seed, same run


def test_checkpoints_and_model_server_reproduce_the_logged_loss(tmp_path: Path, data: Path):
    """The frozen trainer marks each validation and saves a checkpoint there; the frozen model server,
    fed the trainer's own dev windows, gives logits whose loss (the host's numpy code) is the logged one."""
    run = train(tmp_path, data, (HERE / "train.py").read_text(), "--steps", "3")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert [x for x in lines if x.endswith("val_start")] == ["step:0/3 val_start", "step:3/3 val_start"]
    assert VAL_LINE.match(lines[lines.index("step:3/3 val_start") + 1])  # the marker comes right before
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000000.pt", "step_000003.pt"]
    (tmp_path / "model_server.py").write_text((HERE / "model_server.py").read_text())
    windows = heldout_windows(data / "val_000.bin", 128, 128)  # the same windows as the trainer's fixed set
    np.save(tmp_path / "x.npy", windows[:, :-1])
    (tmp_path / "ckpts.txt").write_text("ckpt/step_000000.pt\nckpt/step_000003.pt\n")
    served = subprocess.run([sys.executable, "model_server.py", "--ckpts", "ckpts.txt", "--inputs", "x.npy",
                             "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert served.returncode == 0, served.stderr[-2000:]
    for i, (step, logged) in enumerate(val_losses(run.stdout)):
        logits = np.load(tmp_path / "out" / f"{i:03d}.npy")
        assert logits.shape == (128, 128, 256) and logits.dtype == np.float32
        assert abs(cross_entropy(logits, windows[:, 1:]) - logged) < 1e-3, step


def test_train_py_has_one_evolve_block_holding_the_knobs():
    text = (HERE / "train.py").read_text()
    assert len(outside_blocks(text)) == 2
    block = text.split("EVOLVE-BLOCK-START")[1].split("EVOLVE-BLOCK-END")[0]
    for name in ("def build_model", "def build_optimizers", "def lr_schedule", "def train_step", "PRESETS"):
        assert name in block
    for target in (load_target("tinygpt"), load_target("tinygpt-gpu")):
        assert target.ideas_file == HERE / "ideas.toml"
        for knob in target.knobs:
            assert read_constant(block, knob.target_key) is not None, knob.name
            check_markers("train.py", text, rewrite_constant(text, knob.target_key, knob.high))


def test_every_idea_applies_and_runs(tmp_path: Path, data: Path):
    base = (HERE / "train.py").read_text()
    ideas = load_ideas(HERE / "ideas.toml")
    assert len(ideas) >= 10

    for idea in ideas:
        text = apply_ideas({"train.py": base}, [idea])["train.py"]
        check_markers("train.py", base, text)
        code, stdout = train_here(tmp_path / idea.name, data, text, "--seed", "0", "--steps", "2")
        assert code == 0 and [s for s, _ in val_losses(stdout)] == [0, 2], f"{idea.name}: {stdout[-1000:]}"


def test_compatible_ideas_stack_in_any_order(tmp_path: Path, data: Path):
    base = {"train.py": (HERE / "train.py").read_text()}
    ideas = load_ideas(HERE / "ideas.toml")
    for a, b in itertools.permutations(ideas, 2):
        if a.compatible(b):
            check_markers("train.py", base["train.py"], apply_ideas(base, [a, b])["train.py"])
        else:
            with pytest.raises(EditError):
                apply_ideas(base, [a, b])
    # one greedy stack of mutually compatible ideas must still train
    stack = []
    for idea in ideas:
        if all(idea.compatible(s) for s in stack):
            stack.append(idea)
    assert len(stack) >= len(ideas) - 2
    code, stdout = train_here(tmp_path, data, apply_ideas(base, stack[::-1])["train.py"], "--steps", "2")
    assert code == 0 and len(val_losses(stdout)) == 2


def test_divergence_exits_nonzero_with_a_nan_line(tmp_path: Path, data: Path):
    text = rewrite_constant((HERE / "train.py").read_text(), "LEARNING_RATE", 1e6)
    text = rewrite_constant(text, "GRAD_CLIP", 0)
    run = train(tmp_path, data, text, "--steps", "5")
    assert run.returncode != 0
    last = run.stdout.strip().splitlines()[-1]
    assert VAL_LINE.match(last) and "val_loss:nan" in last
