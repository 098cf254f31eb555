"""Replay, ablations and record mode on the real toy target, real Ray and real git.

The lineage ablated here: 1. sleep less (a commit); a knobs commit setting 2. rate and 3. sleep
(one change per knob value); 4. sleep even less (a commit whose diff needs change 3's line). So
change 4 does not apply without change 3, nor alone on the base; it does apply without change 2,
whose RATE line sits just above SLEEP (git's three-way merge calls that a conflict, the retry
without context lines does not); and with change 3's value set, leaving change 1 out gives the
candidate's own tree (it runs once, and carries nothing).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent import ablate
from agent.replay import next_purpose, record_search, replay
from env.pool import Pool
from runs_db.db import RunsDB
from runs_db.export import export
from search_space import judge
from search_space.target import load_target
from tests.toy import make_toy

SLEEP_KNOB = '''
[[knobs]]
name = "sleep"
type = "float"
low = 0.001
high = 0.02
via = "constant"
key = "SLEEP"
file = "train.py"
'''


class SpyPool(Pool):
    """The real pool, noting what was submitted, in order."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.submitted: list[tuple[str, int, int]] = []

    def submit(self, spec):
        self.submitted.append((spec.commit, spec.seed, spec.target.steps(spec.fidelity)))
        return super().submit(spec)


@pytest.fixture
def search(tmp_path: Path):
    toy_dir = tmp_path / "toy"
    make_toy(toy_dir, sleep=0.01)
    (toy_dir / "target.toml").write_text((toy_dir / "target.toml").read_text() + SLEEP_KNOB)
    toy = load_target(toy_dir)
    db = RunsDB.create(tmp_path / "s", {"target": str(toy.source), "plots": False}, toy)
    base = db.base_commit
    train = db.files(base, ["train.py"])["train.py"]
    c1, _ = db.commit_candidate(base, {"train.py": train.replace("SLEEP = 0.01", "SLEEP = 0.005")},
                                "Sleep less", "Each step waits less.", "ideas")
    train1 = db.files(c1, ["train.py"])["train.py"]
    c2, _ = db.commit_candidate(c1, {"train.py": train1.replace("RATE = 1.0", "RATE = 2.0")
                                     .replace("SLEEP = 0.005", "SLEEP = 0.004")}, "rate=2, sleep=0.004", "", "knobs")
    train2 = db.files(c2, ["train.py"])["train.py"]
    c3, _ = db.commit_candidate(c2, {"train.py": train2.replace("SLEEP = 0.004", "SLEEP = 0.003")},
                                "Sleep even less", "", "llm")
    yield db, toy, c1, c2, c3
    db.close()


def test_replay_interleaves_fresh_seeds_and_never_repeats_them(ray_cluster, search, tmp_path):
    db, toy, c1, c2, c3 = search
    pool = SpyPool(run_root=tmp_path / "runs")
    ticks = []
    first = replay(db, toy, pool, c2[:10], 3, progress=lambda d, n, _: ticks.append((d, n)))
    second = replay(db, toy, pool, c2, 2)
    assert (first.purpose, second.purpose) == ("replay-1", "replay-2")
    assert ticks[0] == (0, 6) and ticks[-1] == (6, 6) and len(ticks) == 7  # the bar's every step, to the end
    seeds1 = [r.seed for r in first.candidate]
    assert seeds1 == judge.fresh_seeds(c2, "replay-1", 0, 3) and [r.seed for r in first.base] == seeds1
    assert not set(seeds1) & {r.seed for r in second.candidate}
    assert not set(seeds1) & set(judge.fresh_seeds(c2, "confirm", 0, 24))
    # submitted candidate, base, candidate, base ...: each pair shares the machine's moment
    order = [(c, s) for c, s, _ in pool.submitted[:6]]
    assert order == [(w, s) for s in seeds1 for w in (c2, db.base_commit)]
    assert first.speedup.pairs == 3 and first.speedup.text() in first.lines()[0]
    assert first.loss_pvalue is not None and first.pvalue is not None
    trials = {t.number: t for t in db.trials()}
    assert trials[first.trial].proposer == "replay" and trials[first.base_trial].attrs["pairs_for"] == first.trial
    assert trials[first.trial].attrs["speedup_text"] == first.speedup.text()
    assert next_purpose(db) == "replay-3"  # the counter lives in the study


def test_ablation_splits_knobs_reports_what_does_not_apply_and_plots(ray_cluster, search, tmp_path):
    db, toy, c1, c2, c3 = search
    plan = ablate.plan(db, toy, c3, seeds=2)
    titles = [c.title.split(" (")[0] for c in plan.changes]
    assert titles == ["Sleep less", "rate=2.0", "sleep=0.004", "Sleep even less"]
    assert [c.kind for c in plan.changes] == ["commit", "knob", "knob", "commit"]
    by = {v.label: v for v in plan.variants}
    assert by["without-3"].commit is None and by["alone-4"].commit is None  # change 4 needs change 3
    assert "RATE = 1.0" in db.files(by["without-2"].commit, ["train.py"])["train.py"]
    assert by["without-1"].same_as == "all"
    assert db.files(by["alone-1"].commit) == db.files(c1)
    assert db.files(by["without-4"].commit) == db.files(c2)
    alone_rate = db.files(by["alone-2"].commit, ["train.py"])["train.py"]  # a knob alone, on the base
    assert "RATE = 2.0" in alone_rate and "SLEEP = 0.01" in alone_rate
    # all, alone-1, alone-2, alone-3, without-2, without-4, and the base: 7 arms x 2 seeds
    assert plan.runs == 14 and "= 14 runs" in plan.cost_line()

    pool = SpyPool(run_root=tmp_path / "runs")
    ab = ablate.run(db, toy, pool, plan)
    assert len(pool.submitted) == 14
    assert ab.shares[3] is None and ab.shares[1] == 0.0 and None not in (ab.shares[2], ab.shares[4])
    text = "\n".join(ab.lines())
    assert "does not apply (a later change needs this one)" in text and "does not apply on the base alone" in text
    assert ab.effective(by["all"]).pairs == 2 and "carries:" in text
    assert (db.dir / ab.plot).read_bytes()[:4] == b"\x89PNG"
    saved = ablate.latest(db, c3)
    assert saved["purpose"] == ab.purpose and saved["changes"][2]["share"] is None and saved["runs"] == 14
    assert len(db.candidates()) == 3  # variants never become candidates


def test_record_finds_the_fewest_steps_that_reach_the_target(ray_cluster, search, tmp_path):
    """A candidate whose loss falls per absolute step (not per fraction of the run): at 20, 15 and 11
    steps it ends below the base's mean final loss (about 2.104), at 8 steps above it."""
    db, toy, c1, *_ = search
    train = db.files(db.base_commit, ["train.py"])["train.py"]
    fast, _ = db.commit_candidate(db.base_commit, {"train.py": train.replace("RATE = 1.0", "RATE = 2.0").replace(
        "math.exp(-RATE * step / args.steps)", "math.exp(-RATE * step / 20)")}, "Decay per step", "", "llm")
    pool = SpyPool(run_root=tmp_path / "runs")
    found = record_search(db, toy, pool, fast, seeds=3, shrink=0.25)
    assert [r.steps for r in found.levels] == [20, 15, 11, 8] and found.steps == 11
    assert 2.09 < found.target_loss < 2.12
    # the base always ran at its own count
    assert {steps for c, _, steps in pool.submitted if c == db.base_commit} == {20}
    assert found.record.speedup.pairs == 3 and found.record.speedup.text().startswith("time to loss")
    assert db.get_state("record:" + fast)["steps"] == 11
    # the export says so; its headline takes only the runs at the full count
    done = export(db, fast, "PerStep", toy, allow_untrusted=True)  # the toy has no trusted evaluator
    readme = subprocess.run(["git", "-C", str(done.repo), "show", f"{done.branch}:{done.folder}/README.md"],
                            capture_output=True, text=True, check=True).stdout
    assert "**11** (the base runs 20)" in readme and done.facts["speedup"]["pairs"] == 3
    assert done.facts["record_steps"] == 11
