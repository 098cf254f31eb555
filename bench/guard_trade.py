"""Does the guard bite? tinylm-bpb's base against its `code-heavy-mix` idea, seed by seed, through
the real `evaluate` (process sandbox, trusted evaluator, the guard scored on the host), then the
verdict's own code: the paired objective (bits per byte at the budget) and the guard's paired
non-inferiority test.

    python -m bench.guard_trade               # 3 seeds at full: 6 trusted runs
    python -m bench.guard_trade --seeds 6 --fidelity short

Goals: the idea lowers the objective (mean paired gain > 0: it is the trade a guard exists for),
and the guard fails (the drop is not shown to be below the tolerance).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import tomllib
from pathlib import Path

from bench.common import print_table
from env.evaluate import RunSpec, evaluate, make_sandbox
from search_space import guard, judge
from search_space.target import load_target

IDEA = "code-heavy-mix"


def patch_of(target, name: str) -> str:
    """The idea's SEARCH/REPLACE text, as `speedsearch evaluate --patch` takes it."""
    return next(i["edits"] for i in tomllib.loads(target.ideas_file.read_text())["idea"] if i["name"] == name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fidelity", default="full")
    args = ap.parse_args()
    target = load_target("tinylm-bpb")
    g = next(x for x in target.guards if x.score == "accuracy")  # the guard the idea trades away
    sandbox = make_sandbox("process", target)
    patch = patch_of(target, IDEA)
    rows, pairs, base, cand = [], [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, args.seeds + 1):
            for who in ("base", IDEA) if seed % 2 else (IDEA, "base"):  # alternate the order: drift cancels
                r = evaluate(RunSpec(target, seed=seed, fidelity=args.fidelity,
                                     patch=patch if who == IDEA else None), sandbox, Path(tmp))
                if r.status.value != "ok" or not r.trusted:
                    raise SystemExit(f"{who} seed {seed}: {r.status.value} {r.reason[:500]}")
                (base.__setitem__(seed, r) if who == "base" else cand.append(r))
        for c in sorted(cand, key=lambda r: r.seed):
            b = base[c.seed]
            co, bo = (judge.run_objective(target.objective, x.curve, math.nan) for x in (c, b))
            pairs.append((co, bo))
            rows.append([str(c.seed), f"{bo.value:.4f}", f"{co.value:.4f}", f"{bo.value - co.value:+.4f}",
                         f"{b.guards[g.name]:.4f}", f"{c.guards[g.name]:.4f}",
                         f"{b.guards[g.name] - c.guards[g.name]:+.4f}"])
        check = guard.check_runs([g], cand, base)[0]
    sp = judge.speedup(target.objective, math.nan, pairs)
    lowers = sp.gain > 0
    print_table(f"tinylm-bpb at {args.fidelity}: base vs {IDEA}, through evaluate (trusted, host-scored guard)",
                ["seed", "base bpb", "idea bpb", "bpb gain", "base acc", "idea acc", "acc drop"], rows)
    print_table("goals", ["what", "figure", "goal", "result"], [
        ["objective (bits per byte at the budget)", sp.text(), "the idea lowers it (gain > 0)",
         "PASS" if lowers else "FAIL"],
        [f"guard {g.name}", f"drop {check.drop:+.4f}, bound {check.bound:+.4f}, p {check.pvalue:.3g}",
         f"fails (tolerance {g.tolerance:g})", "PASS" if not check.passed else "FAIL"],
    ])
    if not lowers or check.passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
