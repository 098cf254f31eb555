"""What shipping a candidate by value costs (env/source.py): on the controller per submit, on a node per run.

    python -m bench.ship [--repeats 50]

A search history of the built-in `tinygpt` (its base, then `--commits` candidates of one changed
line each) in a temporary folder, a local Ray, a temporary SPEEDSEARCH_CACHE. Reported, medians:
- ship, new tree: `ship(spec)` for a commit not shipped yet (tree lookup, git archive, ray.put);
- ship, shipped tree: `ship(spec)` again (what every later run of a candidate costs the controller);
- unship, node cache: extracting the candidate into a workdir from `<cache>/sources/<tree>.tar`;
- materialise_commit: the old way, git archive from the search repo into the workdir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import git
import ray
from rich.console import Console
from rich.table import Table

from env.evaluate import RunSpec
from env.source import ship, unship
from env.workspace import materialise_commit
from runs_db.history import snapshot
from search_space.target import load_target


def history(root: Path, commits: int) -> tuple[Path, list[str]]:
    target = load_target("tinygpt")
    files, _ = snapshot(target.repo)
    repo_dir = root / "repo"
    repo = git.Repo.init(repo_dir)
    for path, (data, _x) in files.items():
        (repo_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / path).write_bytes(data)
    repo.index.add(list(files))
    out = [repo.index.commit("base").hexsha]
    for i in range(commits):
        with open(repo_dir / "train.py", "a") as f:
            f.write(f"# candidate {i}\n")
        repo.index.add(["train.py"])
        out.append(repo.index.commit(f"candidate {i}").hexsha)
    repo.close()
    return repo_dir, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--commits", type=int, default=20)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ship-"))
    os.environ["SPEEDSEARCH_CACHE"] = str(root / "cache")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        target = load_target("tinygpt")
        repo, commits = history(root, args.commits)
        specs = [RunSpec(target, seed=0, fidelity="smoke", repo=repo, commit=c) for c in commits]
        times: dict[str, list[float]] = {"ship, new tree": [], "ship, shipped tree": [], "unship, node cache": [],
                                         "materialise_commit": []}
        shipped = []
        for spec in specs:
            t0 = time.perf_counter()
            shipped.append(ship(spec))
            times["ship, new tree"].append(time.perf_counter() - t0)
        for i in range(args.repeats):
            spec, s = specs[i % len(specs)], shipped[i % len(specs)]
            t0 = time.perf_counter()
            ship(spec)
            times["ship, shipped tree"].append(time.perf_counter() - t0)
            unship(s.source, root / "warm")  # the node's copy exists from here on
            t0 = time.perf_counter()
            unship(s.source, root / f"u{i}")
            times["unship, node cache"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            materialise_commit(repo, spec.commit, root / f"m{i}")
            times["materialise_commit"].append(time.perf_counter() - t0)
        size = len(ray.get(shipped[0].source[1]))
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    goals = {"ship, shipped tree": ("< 1 ms", 1.0), "unship, node cache": ("<= materialise_commit", None)}
    load = os.getloadavg()[0]
    table = Table(title=f"shipping tinygpt's source ({size / 1024:.0f} KiB tar), medians, load {load:.1f}")
    for col in ("step", "median ms", "goal", "met"):
        table.add_column(col)
    mat = statistics.median(times["materialise_commit"]) * 1000
    for name, xs in times.items():
        ms = statistics.median(xs) * 1000
        goal, limit = goals.get(name, ("", None))
        met = "" if not goal else ("yes" if (ms < limit if limit else ms <= mat) else "NO")
        table.add_row(name, f"{ms:.2f}", goal, met)
    Console().print(table)


if __name__ == "__main__":
    main()
