"""What the review page costs on a large search: its 2-second poll, a candidate's page, and the
search loop's once-a-second look at the reviews.

A synthetic search folder (the embedded tinygpt target's tree; N study trials spread over C
candidate commits, each trial with one saved run of a 20-point curve, a few reviews, one approval)
is served by the real ReviewServer; requests go through HTTP on 127.0.0.1 like the page's.

    python -m bench.review [--trials 1000] [--candidates 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console

from agent.review.server import TOKEN_HEADER, ReviewServer
from bench.common import print_table, verdict
from runs_db import reviews as rv
from runs_db.db import RunsDB
from search_space.records import Point, RunResult, Status
from search_space.target import load_target

FIDELITIES = ("smoke", "short", "full")


def build(folder: Path, n_trials: int, n_cands: int) -> tuple[str, str]:
    """The synthetic search; returns (a candidate with runs at every fidelity, the base)."""
    target = load_target("tinygpt")
    db = RunsDB.create(folder, {"target": "tinygpt", "plots": False}, target)
    with db:
        base = db.base_commit
        path = next(p for p in db.ls(base) if p.endswith("train.py"))
        text = db.files(base, [path])[path]
        commits = []
        for i in range(n_cands):
            parent = commits[i // 2] if i >= 2 else base  # a tree: lineages a few steps deep
            commit, _ = db.commit_candidate(parent, {path: text + f"\n# change {i}\n"}, f"change {i}", "why", "ideas")
            commits.append(commit)
        for n in range(n_trials):
            commit = base if n % 10 == 0 else commits[n % n_cands]
            fid = FIDELITIES[n % 3]
            number = db.start_trial(commit, None, "baseline" if commit == base else "ideas", f"trial {n}", fid)
            curve = [Point(s, 4.0 - 0.1 * s + 0.01 * (n % 7), 100.0 * s) for s in range(20)]
            run = RunResult(Status.OK, curve=curve, total_steps=19, wall_s=2.0, log="log\n", seed=n, fidelity=fid)
            db.finish_trial(number, 1900.0, [run], {"speedup": 1.1, "speedup_text": "time to loss 2.1: 1.10x"})
        for i, c in enumerate(commits[:10]):
            rv.set_review(db, c, rv.REJECT if i % 2 else None, f"note {i}")
        rv.set_review(db, commits[11], rv.APPROVE)
        return commits[n_trials % n_cands - 1 if n_trials % n_cands else n_cands - 1], base


def timed(fn, repeat: int) -> float:
    """Median milliseconds of `fn()` over `repeat` calls."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--candidates", type=int, default=100)
    args = ap.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        with console.status(f"building a search of {args.trials} trials over {args.candidates} candidates"):
            cand, _ = build(Path(tmp) / "search", args.trials, args.candidates)
        console.print(f"built in {time.time() - t0:.0f} s")
        with ReviewServer(Path(tmp) / "search") as server:
            url = f"http://127.0.0.1:{server.port}"

            def get(path: str) -> bytes:
                req = urllib.request.Request(url + path, headers={TOKEN_HEADER: server.token})
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.read()

            size = len(get("/api/trials"))
            poll = timed(lambda: get("/api/trials"), 10)
            page = timed(lambda: get(f"/api/candidate/{cand}"), 5)
            page_base = timed(lambda: get(f"/api/candidate/{cand}?against=base"), 5)
            series = sum(len(v["series"]) for v in json.loads(get(f"/api/candidate/{cand}"))["curves"].values())
        with RunsDB.open(Path(tmp) / "search") as db:
            tick = timed(lambda: (rv.rejected(db), rv.approved_pending(db), rv.queued(db.dir)), 10)
            notes = timed(lambda: rv.prompt_notes(db), 10)
    goals = [("GET /api/trials (the page's 2 s poll)", poll, 500, f"{size / 1024:.0f} KiB"),
             (f"GET /api/candidate (diff vs parent, {series} curves)", page, 1000, ""),
             ("GET /api/candidate?against=base", page_base, 1000, ""),
             ("the loop's look at reviews (rejected, approvals, queue), once a second", tick, 50, ""),
             ("reviewers' notes for one prompt (10 notes)", notes, 100, "")]
    print_table(f"review page on {args.trials} trials, {args.candidates} candidates (medians)",
                ("what", "ms", "goal ms", "", "note"),
                [(what, f"{v:.1f}", f"< {goal}", verdict(v / 1000, goal / 1000), note)
                 for what, v, goal, note in goals])
    if any(v >= goal for _, v, goal, _ in goals):
        sys.exit(1)

if __name__ == "__main__":
    main()
