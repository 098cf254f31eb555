"""On a GPU machine: the Ray pool with a real GPU, and the compile cache kept between runs of one worker.

    python -m bench.gpu_pool [--target tinygpt-gpu] [--runs 2]

Runs the target's smoke fidelity `runs` times, one after another, through the real Pool (one Ray
task per run, `num_gpus` from the target). The second run of the same graph should find inductor's
and Triton's caches warm in the worker's cache folder and compile faster.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from env.evaluate import RunSpec
from env.pool import Pool
from search_space.target import load_target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="tinygpt-gpu")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    target = load_target(args.target)
    pool = Pool(run_root=Path(tempfile.mkdtemp(prefix="gpu-pool-")))
    table = Table("run", "status", "GPU ids", "GPU", "compile+warm-up s", "wall s", "final val_loss",
                  title=f"{args.target} smoke through the Ray pool")
    for i in range(args.runs):
        t0 = time.time()
        f = pool.run(RunSpec(target, seed=0, fidelity="smoke"))
        m = re.search(r"compile_and_warmup_s:([\d.]+)", f.log_text)
        r = f.result
        table.add_row(str(i), r.status.value, ",".join(r.provenance.get("gpu_ids", [])),
                      r.provenance.get("gpu_model", ""), m.group(1) if m else "-", f"{time.time() - t0:.1f}",
                      f"{r.final.val_loss:.4f}" if r.final else r.reason[:80])
    Console().print(table)


if __name__ == "__main__":
    main()
