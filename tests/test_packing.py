"""Packed runs (issue #11): `[resources] pack = k` puts k runs at once on one GPU, each asking Ray for
1/k of it. On logical GPUs: the runs overlap in time and see the same device."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from env.evaluate import RunSpec
from env.pool import Pool
from env.sandbox import Limits, SandboxRequest
from env.warm import slot_key
from search_space.records import Status
from search_space.target import TargetError, load_target

# Prints when it started and ended (the host's clock) and the GPU it was given; the steps take ~2 s,
# long enough that packed runs started together are all still running when the last one starts.
TRAIN = textwrap.dedent('''
    import argparse, os, time
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    a = p.parse_args()
    print("START=%.3f VISIBLE=%s" % (time.time(), os.environ.get("CUDA_VISIBLE_DEVICES")), flush=True)
    for step in range(a.steps + 1):
        print("step:%d/%d val_loss:%.4f train_time:%dms step_avg:1.00ms" % (step, a.steps, 4 - step / a.steps,
              step * 50), flush=True)
        time.sleep(0.5)
    print("END=%.3f" % time.time(), flush=True)
''')


def make_target(root: Path, pack: int, gpus: int = 1) -> object:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.py").write_text(TRAIN)
    (root / "target.toml").write_text(textwrap.dedent(f'''
        name = "packed"
        [run]
        command = "python train.py --steps {{steps}} --seed {{seed}}"
        [files]
        editable = ["train.py"]
        [fidelities]
        full = {{ steps = 4 }}
        [resources]
        gpus = {gpus}
        cpus = 1
        pack = {pack}
        timeout_s = 60
        memory_mb = 512
    '''))
    return load_target(root)


def fields(log_text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for line in log_text.splitlines() if line.startswith(("START=", "END="))
                for kv in line.split())


def test_pack_parses_to_a_fraction_of_one_gpu(tmp_path: Path):
    t = make_target(tmp_path / "a", pack=4)
    assert (t.resources.pack, t.resources.ray_gpus) == (4, 0.25)
    assert make_target(tmp_path / "b", pack=3).resources.ray_gpus == 0.3333
    assert make_target(tmp_path / "c", pack=1).resources.ray_gpus == 1
    with pytest.raises(TargetError, match="pack"):  # a packed run shares one GPU, never several
        make_target(tmp_path / "d", pack=2, gpus=2)
    with pytest.raises(TargetError, match="pack"):
        make_target(tmp_path / "e", pack=0)


def test_packed_runs_run_at_once_on_one_gpu(ray_cluster, tmp_path: Path):
    target = make_target(tmp_path / "t", pack=4)
    pool = Pool(run_root=tmp_path / "runs")
    # 4 logical GPUs and 4 CPUs: 16 packed runs' worth of GPU, 4 of CPU
    assert pool.capacity(target.resources.cpus, target.resources.ray_gpus) == 4
    assert pool.capacity(target.resources.cpus, 1) == 4  # unpacked: one a GPU
    refs = [pool.submit(RunSpec(target, seed=s, fidelity="full")) for s in range(4)]
    done = [pool.get(r) for r in refs]
    seen = []
    for f in done:
        assert f.result.status == Status.OK, f.result.reason
        b = fields(f.log_text)
        assert f.result.provenance["gpu_ids"] == [b["VISIBLE"]]
        seen.append(b)
    # all four ran at once: the last to start did so before the first to end had ended
    assert max(float(b["START"]) for b in seen) < min(float(b["END"]) for b in seen)
    # Ray packs the fractions onto one GPU (best fit), so they all saw the same device
    assert len({b["VISIBLE"] for b in seen}) == 1
    assert len({f.worker for f in done}) == 4  # each its own worker slot, named apart in the records


def test_a_warm_slot_serves_only_runs_with_its_cache_role(tmp_path: Path):
    """A base run's slot has the shared compile cache writable and no overlay; a candidate's the overlay.
    A candidate taking a base's slot compiled cold into an empty folder (issue #11's knob candidate)."""
    req = SandboxRequest(command="python train.py", workdir=tmp_path / "w", log_path=tmp_path / "log",
                         limits=Limits(cpus=1), cache_dir=tmp_path / "cache", cache_write=True)
    base = slot_key(req, "python", False)
    from dataclasses import replace

    assert slot_key(replace(req, cache_write=False), "python", False) != base
    assert slot_key(replace(req, cache_write=True), "python", False) == base
