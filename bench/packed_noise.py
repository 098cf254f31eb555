"""The base's timing noise under packing (issue #11, point 4), for the A/A bench (bench/verdict.py).

    python -m bench.packed_noise --target tinygpt-gpu --pack 4 --cpus 4 --waves 3 --out FILE.jsonl

First one run alone on the GPU (the trainer's steady rate alone: the training share's yardstick in
bench/gpu_share.py --alone-rate), then `waves` waves of `pack` base runs sent together through the
real pool (env/pool.py, `[resources] pack`), so they share the GPU as a packed search's runs do. Every
run goes through the trusted evaluator (what the search judges). One RunResult JSON a line, in the
order they ended; runs 2i and 2i+1 of a wave make pair `wave * pack // 2 + i` (side by side, with
the wave's other runs beside them: what a confirm pair meets in a packed search). The solo run and
the alone rate go in '#' header lines, which bench/verdict.py's `read_runs` skips.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.gpu_share import packed_target
from env.evaluate import RunSpec
from env.gpus import visible_gpus
from env.pool import Pool
from search_space.target import cache_dir, load_target


def rate(d: dict, tokens_step: int) -> float:
    """Tokens a second between the first validation after step 0 and the last (bench/gpu_share.py's rule)."""
    c = d.get("claimed") or d.get("curve") or []
    if len(c) < 3 or c[-1][2] <= c[1][2]:
        return float("nan")
    return tokens_step * (c[-1][0] - c[1][0]) / ((c[-1][2] - c[1][2]) / 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="tinygpt-gpu")
    ap.add_argument("--pack", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=4)
    ap.add_argument("--memory-mb", type=int, default=0)
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--fidelity", default="full")
    ap.add_argument("--tokens-step", type=int, default=32 * 1024, help="the base's batch x seq_len (the gpu preset)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/packed-noise"))
    ap.add_argument("--logical-gpus", type=int, default=0, help="a dry run without a GPU: Ray is told of N")
    args = ap.parse_args()
    path = packed_target(args.target, args.work / "target", args.pack, args.cpus, args.memory_mb)
    target = load_target(path)
    pool = Pool(num_gpus=args.logical_gpus or len(visible_gpus()), run_root=cache_dir() / "runs")
    header = [f"# recorded {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: python -m bench.packed_noise "
              f"--target {args.target} --pack {args.pack} --cpus {args.cpus} --waves {args.waves} "
              f"--fidelity {args.fidelity} (trusted evaluator, process sandbox, the Ray pool, {args.pack} base runs at "
              f"once on one GPU; runs 2i, 2i+1 of a wave are a pair)"]

    def one(seed: int) -> RunSpec:
        return RunSpec(target, seed=seed, fidelity=args.fidelity, commit=None, fills_cache=True,
                       run_id=f"packed-noise-s{seed}")

    t0 = time.time()
    solo = pool.get(pool.submit(one(999))).result.to_dict()
    alone = rate(solo, args.tokens_step)
    header.append(f"# solo run (alone on the GPU, seed 999): status {solo['status']}, {alone / 1e3:.1f} k tokens/s "
                  f"(alone_rate_k={alone / 1e3:.1f}), wall {solo.get('wall_s', 0):.1f} s")
    print(header[-1], flush=True)
    lines = []
    for w in range(args.waves):
        seeds = [300 + w * args.pack + i for i in range(args.pack)]
        refs = [pool.submit(one(s)) for s in seeds]
        for i, ref in enumerate(refs):
            d = pool.get(ref).result.to_dict()
            d.update(pair=w * (args.pack // 2) + i // 2, wave=w, packed=args.pack)
            lines.append(json.dumps(d))
            print(f"wave {w} seed {seeds[i]}: {d['status']} {d.get('trust')} wall {d.get('wall_s', 0):.1f} s "
                  f"rate {rate(d, args.tokens_step) / 1e3:.1f} k tokens/s "
                  f"final {(d.get('curve') or [[0, 0, 0]])[-1]}", flush=True)
    header.append(f"# {len(lines)} packed runs in {time.time() - t0:.0f} s (solo included)")
    args.out.write_text("\n".join(header + lines) + "\n")
    (args.out.with_suffix(".solo.json")).write_text(json.dumps(solo))
    Pool.shutdown()


if __name__ == "__main__":
    main()
