"""What the trusted evaluation adds to a run's wall time (issue 7, goal: at most 10 % of a full run).

Each pair runs the same candidate (the base, same seed) twice through `evaluate` with the process
sandbox: once as the target is (checkpoints recomputed on the held-out split, look-ahead probe,
clock checks), once with its `[trust]` section removed (the frozen trainer still pauses and saves
its checkpoints, so the difference is the evaluator alone). The order flips every pair (ABBA) so a
slow drift of the machine cancels; the figure is the median of the paired differences.

    python -m bench.trusted_cost                         # tinygpt, full (300 steps), 4 pairs
    python -m bench.trusted_cost --target tinygpt-gpu --pairs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from bench.common import median, print_table
from env.evaluate import RunSpec, evaluate, make_sandbox
from env.gpus import local_gpu_ids
from search_space.records import Status
from search_space.target import load_target

GOAL = 0.10  # added wall time as a fraction of the untrusted run's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="tinygpt")
    parser.add_argument("--fidelity", default="full")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    trusted = load_target(args.target)
    if trusted.trust is None:
        raise SystemExit(f"{args.target} has no [trust] section: nothing to measure")
    plain = dataclasses.replace(trusted, trust=None)
    sandbox = make_sandbox("process", trusted)
    gpu_ids = local_gpu_ids(trusted.resources.gpus)
    rows, added, fractions = [], [], []
    with tempfile.TemporaryDirectory(prefix="trusted-cost-") as tmp:
        evaluate(RunSpec(trusted, args.seed, "smoke", gpu_ids=gpu_ids), sandbox, Path(tmp))  # data, caches
        for i in range(args.pairs):
            order = [("with", trusted), ("without", plain)]
            walls: dict[str, float] = {}
            for name, target in order if i % 2 == 0 else order[::-1]:
                r = evaluate(RunSpec(target, args.seed, args.fidelity, gpu_ids=gpu_ids), sandbox, Path(tmp))
                if r.status != Status.OK:
                    raise SystemExit(f"pair {i} ({name}): {r.status} {r.reason[:500]}")
                walls[name] = r.wall_s
                if name == "with":
                    eval_s = r.provenance["trust"]["seconds"]
            extra = walls["with"] - walls["without"]
            added.append(extra)
            fractions.append(extra / walls["without"])
            rows.append([str(i + 1), f"{walls['without']:.2f}", f"{walls['with']:.2f}", f"{extra:+.2f}",
                         f"{100 * extra / walls['without']:+.1f} %", f"{eval_s:.2f}"])
    rows.append(None)
    frac = median(fractions)
    mark = "PASS" if frac <= GOAL else "FAIL"
    rows.append(["median", "", "", f"{median(added):+.2f}", f"{100 * frac:+.1f} %", ""])
    rows.append(["goal", "", "", "", f"<= {100 * GOAL:.0f} %  {mark}", ""])
    print_table(f"trusted evaluation cost: {args.target} @ {args.fidelity}, process sandbox",
                ["pair", "without [trust] s", "with [trust] s", "added s", "added", "after-run eval s"], rows,
                caption="wall time of evaluate(); 'after-run eval s' is the part after the training run ended")


if __name__ == "__main__":
    main()
