"""Long runs (issue #12, section 4): checkpoints for continuation, progress, early stop at an epoch.

tinylm-epochs (search_space/targets/epochs) saves its state after every epoch; these tests lose its
run mid-epoch (the Ray worker running it is killed, as a lost node would), stop it as a search's
Ctrl-C does and take it up again from a fresh store, as `--resume` does, and compare the curves with
an unbroken run's. tinylm-bpb (search_space/targets/slowrun, under `[trust]`) is lost the same way:
its trusted checkpoints travel with its state, and the continued run is measured whole and trusted.
Real Ray (the session's local cluster), real sandboxes, real trainer.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import psutil
import pytest
import ray
from typer.testing import CliRunner

from agent.cli import app
from env.continuation import Continuation, ContinuedReader
from env.evaluate import RunSpec, evaluate, make_sandbox
from env.pool import Pool, RunLost
from env.run_progress import eta_s, read_progress
from env.run_state import RunStateStore, Saved, pack, read_step, state_key, unpack
from env.stats import Band
from env.trusted_log import CheckpointKeeper, log_problems
from runs_db.db import RunsDB
from search_space.readout import parse_readout
from search_space.records import Status
from search_space.target import TargetError, Trust, load_target, parse_target

SEED = 11


@pytest.fixture(scope="module")
def epochs():
    return load_target("tinylm-epochs")


def _saved(folder: Path) -> dict[str, dict]:
    """The states kept in a search's run_state/ folder: key -> their meta (env/run_state.py's file:
    the meta's length, the meta, the tar)."""
    out = {}
    for p in folder.glob("*.state"):
        try:
            data = p.read_bytes()
        except FileNotFoundError:  # dropped this instant
            continue
        n = int.from_bytes(data[:8], "big")
        out[p.stem] = json.loads(data[8:8 + n])
    return out


def _wait_for_state(folder: Path, key: str, at_least: int, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = _saved(folder).get(key)
        if got and got["step"] >= at_least:
            return got
        time.sleep(0.05)
    raise AssertionError(f"no state after step {at_least} in {timeout} s: {_saved(folder)}")


def _worker_of(run_id: str) -> psutil.Process:
    """The Ray worker running this run (of this test's own cluster): the parent, some levels up,
    of its trainer, found by the trainer's folder (the run id names it)."""
    for p in psutil.Process().children(recursive=True):
        try:
            if "train.py" in " ".join(p.cmdline()) and run_id in p.cwd():
                return next(q for q in p.parents() if q.name().startswith("ray::"))
        except (psutil.Error, StopIteration):
            pass
    raise AssertionError("the run's trainer is not running")


@pytest.fixture(scope="module")
def unbroken(epochs, tmp_path_factory):
    """The same run, never broken: evaluated here, beside the tests' own runs (no state store)."""
    def run():
        r = evaluate(RunSpec(epochs, seed=SEED, fidelity="full", run_id="unbroken"), make_sandbox("process"),
                     tmp_path_factory.mktemp("unbroken") / "runs")
        assert r.status == Status.OK, r.reason
        assert [p.step for p in r.curve] == list(range(1, 9))
        return r

    with ThreadPoolExecutor(1) as ex:
        yield ex.submit(run)


def _same_curve(a, b) -> None:
    assert [p.step for p in a.curve] == [p.step for p in b.curve] == list(range(1, 9))
    for p, q in zip(a.curve, b.curve, strict=True):
        assert abs(p.val_loss - q.val_loss) < 1e-6, (p, q)  # the same table: RNG and optimizer restored exactly


def test_a_lost_run_continues_from_its_checkpoint(ray_cluster, epochs, unbroken, tmp_path: Path):
    RunsDB.create(tmp_path, {"plots": False}, epochs).close()  # a search folder, for `status`
    pool = Pool(run_root=tmp_path / "runs", warm=False)  # a cold start: the trainer's own command line
    spec = RunSpec(epochs, seed=SEED, fidelity="full", run_id="t4-c-s11-lostmid")
    ref = pool.submit(spec)
    key = pool._states[ref]
    state = _wait_for_state(tmp_path / "run_state", key, 2)
    # progress while it runs: the store's, and `status --json` (what the store wrote in the search folder)
    live = pool.running()[key]
    assert live["total"] == 8 and live["counts"] == "epoch" and 2 <= live["step"] <= 8
    out = CliRunner().invoke(app, ["status", "--dir", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    row = json.loads(out.stdout)["long_runs"][0]
    assert (row["trial"], row["role"], row["seed"], row["counts"], row["total"]) == (4, "", SEED, "epoch", 8)
    assert row["step"] >= 2 and row["eta_s"] is not None and row["eta_s"] >= 0
    os.kill(_worker_of(spec.run_id).pid, signal.SIGKILL)  # mid-epoch: the state is after epoch >= 2
    with pytest.raises(RunLost) as lost:
        pool.get(ref)
    assert _saved(tmp_path / "run_state")[key]["step"] >= state["step"]  # kept for the retry
    f = pool.get(pool.submit(lost.value.spec))  # the loop's retry (agent/loop.py `_lost`)
    r = f.result
    assert r.status == Status.OK, r.reason
    assert r.provenance["continued"]["from"] >= 2
    _same_curve(r, unbroken.result())
    times = [p.train_ms for p in r.curve]
    assert times == sorted(set(times))  # one clock across the break, rising
    assert "continues from its checkpoint after epoch" in f.log_text
    assert f.log_text.count("| 1 | 16 |") == 1 and "| 8 | 16 |" in f.log_text  # the log is whole
    # the result is in: the state is dropped (said to the store without waiting for it)
    deadline = time.time() + 10
    while time.time() < deadline and (key in _saved(tmp_path / "run_state") or key in read_progress(tmp_path)):
        time.sleep(0.05)
    assert key not in _saved(tmp_path / "run_state") and key not in read_progress(tmp_path)


def test_a_resumed_search_reuses_the_checkpoint(ray_cluster, epochs, unbroken, tmp_path: Path):
    """A search stopped (Ctrl-C: `Pool.stop`) keeps its runs' states under its folder; the resumed
    search, with a store of its own, continues the same run from there."""
    pool = Pool(run_root=tmp_path / "runs")
    spec = RunSpec(epochs, seed=SEED, fidelity="full", run_id="t3-c-s11-before")  # a run id as the loop's
    ref = pool.submit(spec)
    key = pool._states[ref]
    _wait_for_state(tmp_path / "run_state", key, 1)
    pool.stop([ref])
    ray.kill(pool._store)  # the controller is gone with its actors
    step = _saved(tmp_path / "run_state")[key]["step"]
    assert step >= 1
    again = Pool(run_root=tmp_path / "runs")  # the resumed search: its rung runs again, same seed
    f = again.run(replace(spec, run_id="t9-c-s11-after"))
    assert f.result.status == Status.OK, f.result.reason
    assert f.result.provenance["continued"]["from"] >= step
    _same_curve(f.result, unbroken.result())


def test_a_state_is_never_restored_into_another_run(ray_cluster, epochs, tmp_path: Path):
    base = RunSpec(epochs, seed=SEED, fidelity="full", commit="a" * 40)
    keys = {state_key(s) for s in (base, replace(base, seed=SEED + 1), replace(base, commit="b" * 40),
                                   replace(base, fidelity="short"), replace(base, patch="x"))}
    assert len(keys) == 5
    assert state_key(replace(base, run_id="another-trial")) == state_key(base)  # a retry or a resume: the same run
    # a saved state under one seed's key: a run of another seed starts fresh
    pool = Pool(run_root=tmp_path / "runs")
    spec = RunSpec(epochs, seed=SEED, fidelity="smoke")
    ref = pool.submit(spec)
    key = pool._states[ref]
    _wait_for_state(tmp_path / "run_state", key, 1)
    pool.stop([ref])
    other = pool.run(replace(spec, seed=SEED + 1)).result
    assert other.status == Status.OK and "continued" not in other.provenance


def test_bad_checkpoint_config_is_one_line(tmp_path: Path):
    def target(extra: dict, command: str = "python train.py --resume '{resume}'"):
        raw = {"name": "t", "run": {"command": command}, "files": {"editable": ["train.py"]},
               "fidelities": {"full": {"steps": 4}}, **extra}
        return parse_target(raw, tmp_path)

    good = target({"checkpoint": {"every": 2, "path": "state"}})
    assert good.checkpoint.every == 2 and good.checkpoint.path == "state"
    for bad, says in [({"checkpoint": {"every": 0, "path": "s"}}, "checkpoint.every"),
                      ({"checkpoint": {"every": 1, "path": "../out"}}, "checkpoint.path"),
                      ({"checkpoint": {"every": 1, "path": "/abs"}}, "checkpoint.path"),
                      ({"checkpoint": {"every": 1}}, "checkpoint.path: missing"),
                      ({"checkpoint": {"every": 1, "path": "s", "evry": 2}}, "checkpoint.evry"),
                      ({}, "{resume} needs a [checkpoint]")]:
        with pytest.raises(TargetError) as e:
            target(bad)
        assert says in str(e.value) and "\n" not in str(e.value)


def test_continued_reader_takes_a_reprinted_epoch_once_and_skips_the_gap(epochs):
    saved = Saved(step=2, points=[(1, 2.5, 1000.0), (2, 2.4, 2000.0)], arrivals=[1.0, 2.0], elapsed_s=2.5)
    r = ContinuedReader(epochs.readout, 8, None, saved)
    r.started = 12345.0  # evaluate's "the run starts now" does not reset the continued clock
    r.feed("resumed after epoch 2", now=100.0)  # the first line, after a long gap and a restart
    assert r.feed("| 2 | 16 | 2.4100 | 11.134 | |", now=100.5) is None  # printed again: the saved point stands
    p = r.feed("| 3 | 16 | 2.3000 | 9.974 | best |", now=101.0)
    assert p is not None and p.step == 3
    assert abs(p.train_ms - 3500.0) < 1e-6  # 2.5 s before the break + 1 s after its first line
    assert [q.step for q in r.points] == [1, 2, 3] and r.problem is None
    assert eta_s({"step": 4, "total": 8, "elapsed_s": 10.0, "at": 50.0}, now=52.0) == 8.0


def test_a_run_stops_early_at_an_epoch_boundary(epochs, tmp_path: Path):
    """The band judges epoch points as it judges steps: a curve above it is pruned at that epoch."""
    band = Band(steps=tuple(range(1, 9)), mean=(1.0,) * 8, std=(0.0,) * 8, train_ms=(1.0,) * 8)
    spec = RunSpec(epochs, seed=SEED, fidelity="full", band=band, run_id="pruned")
    r = evaluate(spec, make_sandbox("process"), tmp_path / "runs")
    assert r.status == Status.PRUNED, r.reason
    assert "at step 2 " in r.reason  # the first epoch the band judges (min_fraction of 8)
    assert r.curve and r.curve[-1].step < 8


def test_the_trusted_clock_check_holds_across_a_break():
    """Under `[trust]` the claimed clock is checked on the spliced timeline: the interval across the
    break is observed from the new run's first line, so an honest continued trainer passes and one
    that under-claims that interval is caught."""
    trust = Trust(model_command="python eval.py", seq_len=8, windows=4, vocab=16, every=125, loss_tolerance=0.1)
    saved = Saved(step=125, points=[(0, 10.0, 0.0), (125, 5.0, 1000.0)], arrivals=[0.5, 1.5], elapsed_s=1.6,
                  first_line=0.5)

    def problems(claimed_ms: float) -> list[str]:
        r = ContinuedReader(parse_readout({}), 250, None, saved)
        r.feed("loading the model again", now=100.0)  # the restart's start-up ended here
        assert r.feed(f"step:250/250 val_loss:4.0 train_time:{claimed_ms:.0f}ms", now=101.0) is not None
        return log_problems(trust, r, 250, 98.0)[0]

    assert problems(2100) == []  # 1.1 s observed from step 125 to 250 (0.1 s before the break), 1.1 s claimed
    assert any("clock" in p and "between steps 125 and 250" in p for p in problems(1200))


def test_a_state_carries_only_the_runs_own_files(tmp_path: Path):
    """A link planted in the state folder is not followed (the worker would ship a file of its
    node's), and a state over its cap is not kept."""
    state = tmp_path / "state"
    (state / "sub").mkdir(parents=True)
    (state / "sub" / "weights.bin").write_bytes(b"w" * 100)
    (state / "STEP").write_text("3")
    (state / "secret").symlink_to("/etc/hostname")
    (state / "dirlink").symlink_to("/etc", target_is_directory=True)
    blob, why = pack(state, 1 << 20)
    assert blob is not None and why == ""
    unpack(blob, tmp_path / "back")
    got = sorted(str(p.relative_to(tmp_path / "back")) for p in (tmp_path / "back").rglob("*"))
    assert got == ["STEP", "sub", "sub/weights.bin"]
    assert read_step(tmp_path / "back") is not None and read_step(tmp_path / "back")[0] == 3
    blob, why = pack(state, 50)
    assert blob is None and "over its cap" in why


# --- a trusted run (tinylm-bpb, `[trust]` and `[checkpoint]`): lost mid-run, continued, measured whole ---
# Each training step sleeps a little (a candidate's change, the same in both runs), so the run is
# still training when the test loses it after its first state.
SLOWER = ("train.py\n<<<<<<< SEARCH\n    def forward(self, idx):  # [B, T] -> [B, T, 256]\n=======\n"
          "    def forward(self, idx):  # [B, T] -> [B, T, 256]\n        time.sleep(0.02)\n>>>>>>> REPLACE\n")


@pytest.fixture(scope="module")
def bpb():
    return load_target("tinylm-bpb")


def test_a_lost_trusted_run_is_measured_whole(ray_cluster, bpb, tmp_path: Path):
    """The trusted evaluator's checkpoints taken before the break travel with the state, so the
    continued run is measured at every validation, before and after the break, and is trusted; its
    measured curve is an unbroken run's."""
    spec = RunSpec(bpb, seed=SEED, fidelity="full", patch=SLOWER, run_id="t2-c-s11-bpblost")
    with ThreadPoolExecutor(1) as ex:
        unbroken = ex.submit(evaluate, replace(spec, run_id="bpb-unbroken"), make_sandbox("process"),
                             tmp_path / "unbroken")
        pool = Pool(run_root=tmp_path / "runs", warm=False)
        ref = pool.submit(spec)
        key = pool._states[ref]
        state = _wait_for_state(tmp_path / "run_state", key, 40, timeout=120)
        assert state["kept"] == [0, 40] and state["kept_problem"] == ""  # the weights behind the state went too
        os.kill(_worker_of(spec.run_id).pid, signal.SIGKILL)
        with pytest.raises(RunLost) as lost:
            pool.get(ref)
        r = pool.get(pool.submit(lost.value.spec)).result
        whole = unbroken.result()
    assert whole.status == Status.OK and whole.trust == "trusted", whole.reason
    assert r.status == Status.OK, r.reason
    assert r.trust == "trusted", r.provenance["trust"]
    broke = r.provenance["continued"]["from"]
    assert 40 <= broke < 160
    measured = r.provenance["trust"]["losses"]
    assert sorted(measured) == [0, 40, 80, 120, 160]  # every validation measured, before and after the break
    assert "came back with its state" in r.provenance["trust"]["continued"]
    assert [p.step for p in r.curve] == [p.step for p in whole.curve] == [0, 40, 80, 120, 160]
    for p, q in zip(r.curve, whole.curve, strict=True):
        assert abs(p.val_loss - q.val_loss) < 1e-6, (p, q)  # measured from the same weights
    for p, q in zip(r.claimed, whole.claimed, strict=True):
        assert p.val_loss == q.val_loss  # the trainer's own numbers: an exact resume


def test_trusted_checkpoints_over_the_cap_stay_claimed(ray_cluster, bpb, tmp_path: Path):
    """Past `[checkpoint] max_mb` the trusted checkpoints stop going (the state still goes): the
    continued run says why its points up to the break stay claimed."""
    capped = replace(bpb.checkpoint, max_mb=1)
    spec = RunSpec(replace(bpb, checkpoint=capped), seed=SEED, fidelity="full")
    store = RunStateStore.remote(str(tmp_path / "run_state"))
    keeper = CheckpointKeeper(bpb.trust, tmp_path / "work", tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    for step, size in ((0, 1000), (40, 1000), (80, 2 << 20)):
        keeper.kept[step] = tmp_path / "ckpt" / f"step_{step:06d}.pt"
        keeper.kept[step].write_bytes(bytes([step]) * size)
    first = Continuation(spec, store, "k")
    first._send_kept(keeper, [0, 40, 80])
    assert sorted(first.kept_sent) == [0, 40] and "over the cap of 1 MiB ([checkpoint] max_mb)" in first.kept_problem
    saved = Saved(step=80, points=[(0, 8.0, 0.0), (40, 4.0, 10.0), (80, 3.0, 20.0)], arrivals=[1.0, 2.0, 3.0],
                  elapsed_s=3.0, kept=[0, 40], kept_problem=first.kept_problem)
    ray.get(store.put.remote("k", asdict(saved), pack(tmp_path / "ckpt", 1 << 30)[0]))
    again = Continuation(spec, store, "k")
    back = CheckpointKeeper(bpb.trust, tmp_path / "work2", tmp_path / "ckpt2")
    again.restore_kept(back)
    assert sorted(back.kept) == [0, 40] and back.kept[40].read_bytes() == bytes([40]) * 1000
    floor, why = again.untrusted_before()
    assert floor == 80 and "up to step 80 are claimed" in why and "over the cap" in why
    ray.get(store.drop.remote("k"))
    assert ray.get(store.get_kept.remote("k", 80)) == {} and not (tmp_path / "run_state" / "k.kept").exists()
