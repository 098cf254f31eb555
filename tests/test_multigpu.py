"""Multi-GPU candidates on logical GPUs: N GPUs of one node per run, `{nproc}` = N, every rank ends."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from env.evaluate import RunSpec
from env.pool import Pool
from search_space.records import Status
from search_space.target import load_target

# A stand-in for `torchrun --nproc_per_node={nproc} train.py`: rank 0 logs, the other ranks only wait,
# ignoring SIGTERM the way a rank stuck in a collective can.
LAUNCH = textwrap.dedent('''
    import argparse, os, signal, subprocess, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--hang", type=int, default=0)
    a = p.parse_args()
    ranks = [subprocess.Popen([sys.executable, "-c",
             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)", "RANK-TAG"],
             env={**os.environ, "RANK": str(r)}) for r in range(1, a.nproc)]
    print("NPROC=%d VISIBLE=%s NVLS=%s RANKS=%s" % (a.nproc, os.environ.get("CUDA_VISIBLE_DEVICES"),
          os.environ.get("NCCL_NVLS_ENABLE"), ",".join(str(r.pid) for r in ranks)), flush=True)
    for step in range(a.steps + 1):
        loss = 4 - step / a.steps
        print("step:%d/%d val_loss:%.4f train_time:%dms step_avg:1.00ms" % (step, a.steps, loss, step * 50), flush=True)
        time.sleep(600 if a.hang and step == 1 else 0.05)
    for r in ranks:
        r.kill()
''')


def make_target(root: Path, gpus: int, timeout_s: float = 60) -> object:
    root.mkdir(parents=True, exist_ok=True)
    (root / "launch.py").write_text(LAUNCH)
    (root / "target.toml").write_text(textwrap.dedent(f'''
        name = "ranks"
        [run]
        command = "python launch.py --nproc {{nproc}} --steps {{steps}} --seed {{seed}}"
        [files]
        editable = ["launch.py"]
        [fidelities]
        full = {{ steps = 4 }}
        [resources]
        gpus = {gpus}
        timeout_s = {timeout_s}
        memory_mb = 1024
    '''))
    return load_target(root)


def banner(log_text: str) -> dict[str, str]:
    line = next(line for line in log_text.splitlines() if line.startswith("NPROC="))
    return dict(kv.split("=", 1) for kv in line.split())


def test_two_gpu_runs_share_four_gpus_without_overlap(ray_cluster, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # must reach every rank unchanged
    target = make_target(tmp_path / "t", gpus=2)
    assert target.render_command(seed=0, steps=4, data="") .startswith("python launch.py --nproc 2 ")
    pool = Pool(run_root=tmp_path / "runs")
    refs = [pool.submit(RunSpec(target, seed=s, fidelity="full")) for s in range(2)]
    seen = []
    for ref in refs:
        f = pool.get(ref)
        assert f.result.status == Status.OK, f.result.reason
        b = banner(f.log_text)
        assert b["NPROC"] == "2" and b["NVLS"] == "0"
        gpus = b["VISIBLE"].split(",")
        assert len(gpus) == 2 and f.result.provenance["gpu_ids"] == gpus
        seen.append(set(gpus))
    assert not seen[0] & seen[1], f"two runs were given the same GPU: {seen}"


def _alive(tag: str) -> list[int]:
    """The ranks still running, found by the tag in their command line: the pids a rank prints are
    those of the run's own pid namespace, not the host's."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if tag in (p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_every_rank_ends(ray_cluster, tmp_path: Path, how: str):
    target = make_target(tmp_path / "t", gpus=2, timeout_s=4 if how == "timeout" else 120)
    tag = f"speedsearch-test-rank-{how}-{os.getpid()}"
    (tmp_path / "t" / "launch.py").write_text(LAUNCH.replace('p.add_argument("--hang", type=int, default=0)',
                                                             'p.add_argument("--hang", type=int, default=1)')
                                              .replace("RANK-TAG", tag))
    pool = Pool(run_root=tmp_path / "runs")
    ref = pool.submit(RunSpec(target, seed=0, fidelity="full", run_id=f"ranks-{how}"))
    log = None
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for the banner naming the ranks' pids
        logs = list((tmp_path / "runs").glob(f"ranks-{how}/run.log"))
        if logs and "RANKS=" in logs[0].read_text():
            log = logs[0]
            break
        time.sleep(0.1)
    assert log is not None, "the run never started"
    assert len(banner(log.read_text())["RANKS"].split(",")) == 1
    deadline = time.time() + 15  # the rank's /proc entry, read while a loaded machine is still spawning it
    while time.time() < deadline and len(_alive(tag)) != 1:
        time.sleep(0.1)
    assert len(_alive(tag)) == 1
    if how == "cancel":
        pool.cancel(ref)
    else:
        assert pool.get(ref).result.status == Status.TIMEOUT
    deadline = time.time() + 20
    while time.time() < deadline and _alive(tag):
        time.sleep(0.1)
    assert not _alive(tag), f"ranks left running after {how}"
    assert os.getpid()  # the test process itself is untouched
