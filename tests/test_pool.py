"""The Ray pool: GPUs by the ids Ray assigned, concurrency, cancel reaching the sandbox."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from env.evaluate import RunSpec
from env.pool import Pool
from search_space.records import Status
from tests.toy import make_toy

SHOW_GPUS = ('train.py\n<<<<<<< SEARCH\nMODE = "ok"\n=======\nMODE = "ok"\nimport atexit, os\n'
             'print("VISIBLE=" + os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), flush=True)\n'
             'print(f"START={time.time()}", flush=True)\n'
             'atexit.register(lambda: print(f"END={time.time()}", flush=True))\n>>>>>>> REPLACE\n')


def test_gpu_ids_reach_the_sandbox_and_runs_overlap(ray_cluster, tmp_path: Path):
    toy = make_toy(tmp_path / "toy", gpus=1, sleep=0.3)  # about 6 s a run
    pool = Pool(run_root=tmp_path / "runs")
    refs = [pool.submit(RunSpec(toy, seed=s, fidelity="full", patch=SHOW_GPUS)) for s in range(4)]
    done = [pool.get(r) for r in refs]
    seen, spans = set(), []
    for f in done:
        assert f.result.status == Status.OK, f.result.reason
        lines = dict(line.split("=", 1) for line in f.log_text.splitlines() if "=" in line and ":" not in line)
        seen.add(lines["VISIBLE"])
        assert f.result.provenance["gpu_ids"] == [lines["VISIBLE"]]
        spans.append((float(lines["START"]), float(lines["END"])))
    assert seen == {"0", "1", "2", "3"}  # four runs, four logical GPUs, one each
    # They ran side by side, not one after another: some moment has at least two of them training
    # (the trainers' own clocks; Ray's worker start-up on a loaded 2-core machine staggers the starts).
    most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most >= 2, spans


def test_cancel_kills_the_run(ray_cluster, tmp_path: Path):
    toy = make_toy(tmp_path / "toy", gpus=1, timeout_s=120)
    hang = 'train.py\n<<<<<<< SEARCH\nMODE = "ok"\n=======\nMODE = "hang"\n>>>>>>> REPLACE\n'
    pool = Pool(run_root=tmp_path / "runs")
    ref = pool.submit(RunSpec(toy, seed=0, fidelity="full", patch=hang, run_id="cancel-me"))
    deadline = time.time() + 30
    def trainers():
        return [p for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] and "train.py" in " ".join(p.info["cmdline"])
                and "cancel-me" in (p.cwd() if p.is_running() else "")]
    while time.time() < deadline and not trainers():
        time.sleep(0.1)
    assert trainers(), "the run never started"
    pool.cancel(ref)
    deadline = time.time() + 15
    while time.time() < deadline and trainers():
        time.sleep(0.1)
    assert not trainers(), "cancel did not reach the sandbox"


def test_capacity(ray_cluster, tmp_path: Path):
    pool = Pool(run_root=tmp_path / "runs")
    assert pool.capacity(cpus=1, gpus=1) == 4
    assert pool.capacity(cpus=1, gpus=2) == 2
    assert pool.capacity(cpus=2, gpus=0) == 2
