"""Run a target's baseline at one fidelity, seeds given, and print one JSON line per run: what
`speedsearch evaluate --target T --fidelity F --seed N --json` prints (the same calls: load_target,
RunSpec, make_sandbox, env.evaluate, RunResult.to_dict()), without the CLI, so a recording needs
only search_space and env. Used by bench/record_cpu_trusted.sh.

    python -m bench.evaluate_runs --target tinygpt --fidelity full --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json

from env.evaluate import RunSpec, evaluate, make_sandbox
from env.gpus import local_gpu_ids
from search_space.target import cache_dir, load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="tinygpt")
    ap.add_argument("--fidelity", default="full")
    ap.add_argument("--seeds", required=True, help="comma-separated, run one after the other")
    ap.add_argument("--sandbox", default="process")
    args = ap.parse_args()
    t = load_target(args.target)
    for seed in (int(s) for s in args.seeds.split(",")):
        spec = RunSpec(t, seed=seed, fidelity=args.fidelity, gpu_ids=local_gpu_ids(t.resources.gpus))
        result = evaluate(spec, make_sandbox(args.sandbox, t), cache_dir() / "runs")
        print(json.dumps(result.to_dict()), flush=True)


if __name__ == "__main__":
    main()
