"""On a GPU machine: tinygpt-gpu runs through a warm-slot process sandbox (torch imported ahead, CUDA only
after the go), against cold starts, interleaved; prints status, trust, wall and the start-up it measured.

    python -m bench.gpu_warm_check [--runs 3] [--fidelity short]
"""

from __future__ import annotations

import argparse
import json
import time

from env.evaluate import RunSpec, evaluate, make_sandbox
from env.gpus import local_gpu_ids
from search_space.target import cache_dir, load_target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fidelity", default="short")
    args = ap.parse_args()
    t = load_target("tinygpt-gpu")
    boxes = {"cold": make_sandbox("process", t), "warm": make_sandbox("process", t, warm=True)}
    for i in range(args.runs):
        for mode, box in boxes.items():
            t0 = time.time()
            r = evaluate(RunSpec(t, seed=i, fidelity=args.fidelity, gpu_ids=local_gpu_ids(1)), box,
                         cache_dir() / "runs")
            p = r.provenance
            print(json.dumps({"mode": mode, "seed": i, "status": r.status.value, "trust": r.trust,
                              "wall_s": round(time.time() - t0, 2), "train_ms": r.final.train_ms if r.final else None,
                              "start": p.get("containment", {}).get("start", "cold"),
                              "startup": {k: v for k, v in p.items() if "start" in k}, "reason": r.reason[:200]}),
                  flush=True)
    boxes["warm"].close()


if __name__ == "__main__":
    main()
