"""What a checkpoint for continuation costs (env/run_state.py): on the worker, per state sent.

    python -m bench.run_state [--repeats 20]

A state folder of the size tinylm-epochs writes (its model, Adam moments and RNG states, measured
here from a real one-epoch run's state.pt) and one of 100 MiB (a larger model's), a local Ray, a
RunStateStore writing to a temporary folder. Reported, medians:
- pack: the folder as tar bytes, files opened without following links;
- put: sending them by value to the store, which writes them to its folder (ray.get of the call);
- get + unpack: what a continued run pays once, before it starts.
The goal: a checkpoint costs under 2 % of tinylm-epochs' epoch (~0.3 s on one free core).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from bench.common import median, ms, print_table, verdict
from env.data import ensure_data
from env.run_state import RunStateStore, pack, unpack
from search_space.target import load_target


def tinylm_state(root: Path) -> Path:
    """A real state: one epoch of tinylm-epochs, saved by its own trainer."""
    target = load_target("tinylm-epochs")
    data = ensure_data(target)  # tinygpt's corpus, as the target mounts it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(target.repo / "train.py"), "--epochs", "1", "--data", str(data),
                    "--state", str(root / "state")], check=True, capture_output=True, env=env, cwd=root)
    return root / "state"


def big_state(root: Path, mib: int) -> Path:
    folder = root / "big"
    folder.mkdir()
    (folder / "state.pt").write_bytes(os.urandom(mib << 20))
    (folder / "STEP").write_text("1")
    return folder


def measure(store, folder: Path, repeats: int) -> dict[str, float]:
    out: dict[str, list[float]] = {"pack": [], "put": [], "get + unpack": []}
    for i in range(repeats):
        t = time.perf_counter()
        blob, why = pack(folder, 1 << 32)
        out["pack"].append(time.perf_counter() - t)
        assert blob is not None, why
        t = time.perf_counter()
        ray.get(store.put.remote(f"k{i % 2}", {"step": 1}, blob))
        out["put"].append(time.perf_counter() - t)
        t = time.perf_counter()
        _meta, back = ray.get(store.get.remote(f"k{i % 2}"))
        unpack(back, folder.parent / "restored")
        out["get + unpack"].append(time.perf_counter() - t)
    return {k: median(v) for k, v in out.items()} | {"MiB": len(blob) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = RunStateStore.remote(str(root / "store"))
        rows, failed = [], False
        epoch_s = 0.3
        for name, folder in (("tinylm-epochs", tinylm_state(root)), ("100 MiB", big_state(root, 100))):
            m = measure(store, folder, args.repeats)
            cost = m["pack"] + m["put"]
            goal = 0.02 * epoch_s if name == "tinylm-epochs" else 2.0
            failed |= not cost < goal
            rows.append([name, f"{m['MiB']:.2f}", ms(m["pack"]), ms(m["put"]), ms(m["get + unpack"]),
                         f"< {goal * 1000:.0f} ms", verdict(cost, goal)])
    print_table("a checkpoint for continuation (medians)",
                ["state", "MiB", "pack ms", "put ms", "get+unpack ms", "goal (pack+put)", ""], rows,
                caption="goal: under 2 % of a tinylm-epochs epoch (0.3 s); a 100 MiB state under 2 s")
    ray.shutdown()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
