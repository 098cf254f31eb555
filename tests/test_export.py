"""Export: a winner's record folder (README, logs, statistics, plot, PR body) and its branch, with
the one speed-up over the pairs recorded beside the base, never the runs that selected it."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math

import git
import pytest
from scipy import stats

from runs_db.db import RunsDB
from runs_db.export import ExportError, export
from runs_db.pairs import pair_up, paired_runs, search_target_loss
from search_space.judge import Obs, speedup
from search_space.records import RunResult, Status

try:
    from tests.test_runs_db import TRAIN, make_target, run_result
except ImportError:  # tests/ itself on sys.path
    from test_runs_db import TRAIN, make_target, run_result

DAY = datetime.date(2025, 1, 31)
TARGET = 3.5
SEEDS = [1_000_101, 1_000_102, 1_000_103, 1_000_104]  # confirm's fresh seeds
CAND_LOSS = [3.271, 3.274, 3.269, 3.276]
CAND_MS = [900.0, 910.0, 905.0, 895.0]
BASE_LOSS = [3.280, 3.282, 3.279, 3.281]
BASE_MS = [1000.0, 1010.0, 990.0, 1005.0]


def trusted(r: RunResult, worker: str = "node1/0") -> RunResult:
    return dataclasses.replace(r, trust="trusted", provenance={**r.provenance, "worker": worker})


def crossing_ms(loss: float, ms: float) -> float:
    """Where run_result's straight curve (loss + 0.2 per step short of 10) crosses TARGET."""
    return ms * (10 - (TARGET - loss) / 0.2) / 10


@pytest.fixture
def search(tmp_path, storage_url, study_name):
    """A baseline, a candidate selected at full by seed 0, then confirmed on 4 fresh seeds beside
    the base (plus a seed whose base ran on another node, and the selecting seed run again)."""
    target = make_target(tmp_path)
    with RunsDB.create(tmp_path / "s", {"study_name": study_name, "plots": False}, target,
                       storage=storage_url) as db:
        base = db.base_commit
        b = db.start_trial(base, None, "baseline", "baseline", "full", {"target_loss": TARGET})
        db.finish_trial(b, 1000.0, [trusted(run_result(i, 3.28, 1000)) for i in range(3)])
        mid, _ = db.commit_candidate(base, {"train.py": TRAIN.replace("0.1", "0.2")}, "Raise LR",
                                     "Higher LR.", "llm")
        n = db.start_trial(mid, None, "llm", "Raise LR", "full")
        db.finish_trial(n, 980.0, [trusted(run_result(0, 3.279, 980))])
        win, _ = db.commit_candidate(mid, {"train.py": TRAIN.replace("0.1", "0.2").replace("10", "9")},
                                     "Fewer steps", "Nine steps reach the target.\nMeasured twice.",
                                     "llm", model="claude-test")
        s = db.start_trial(win, None, "llm", "Fewer steps", "smoke")
        db.finish_trial(s, 90.0, [trusted(run_result(0, 3.9, 90, "smoke"))])
        f = db.start_trial(win, None, "llm", "Fewer steps", "full")
        db.finish_trial(f, 700.0, [trusted(run_result(0, 3.20, 700))])  # the lucky seed that selected it
        cand = [trusted(run_result(sd, loss, ms)) for sd, loss, ms in zip(SEEDS, CAND_LOSS, CAND_MS, strict=True)]
        bases = [trusted(run_result(sd, loss, ms)) for sd, loss, ms in zip(SEEDS, BASE_LOSS, BASE_MS, strict=True)]
        cand += [trusted(run_result(77, 3.27, 800)), trusted(run_result(0, 3.20, 700))]
        bases += [trusted(run_result(77, 3.28, 1000), worker="node2/0"), trusted(run_result(0, 3.28, 1000))]
        c = db.start_trial(win, None, "llm", "Fewer steps", "confirm", {"alpha": 0.0012, "fdr": "online FDR <= 5% "
                                                                       "(LORD++)"})
        pb = db.start_trial(base, None, "baseline", "baseline beside", "confirm", {"pairs_for": c})
        db.finish_trial(pb, 1000.0, bases)
        db.finish_trial(c, 900.0, cand, {"verdict": "pass", "speedup": 1.12, "speedup_text": "time to loss 3.5: 1.12x"})
        yield db, target, win, mid


def test_export_writes_the_record_folder(search, tmp_path):
    db, target, win, mid = search
    out = export(db, win, tmp_path / "out", "Fewer Steps!", target, date=DAY)
    assert out == tmp_path / "out" / "records" / "2025-01-31_Fewer_Steps"
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"README.md", "pr.md", "statistics.json", "candidate.patch", "loss_curve.png"} <= set(names)
    assert len([n for n in names if n.startswith("baseline/")]) == 4  # the partners of the 4 usable pairs
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"

    st = json.loads((out / "statistics.json").read_text())
    assert st["commit"] == win and st["fidelity"] == "full" and st["target_loss"] == TARGET
    # Only the fresh seeds: the selecting seed 0 and the pair split across nodes are left out.
    assert st["candidate"]["seeds"] == SEEDS and st["baseline"]["seeds"] == SEEDS and st["lost_pairs"] == 2
    ratios = [crossing_ms(bl, bm) / crossing_ms(cl, cm)
              for cl, cm, bl, bm in zip(CAND_LOSS, CAND_MS, BASE_LOSS, BASE_MS, strict=True)]
    geo = math.exp(sum(map(math.log, ratios)) / 4)
    sp = st["speedup"]
    assert sp["estimate"] == pytest.approx(geo) and sp["low"] < geo < sp["high"] and sp["pairs"] == 4
    pairs = [(Obs(crossing_ms(cl, cm)), Obs(crossing_ms(bl, bm)))
             for cl, cm, bl, bm in zip(CAND_LOSS, CAND_MS, BASE_LOSS, BASE_MS, strict=True)]
    text = speedup("time_to_target", TARGET, pairs).text()
    assert st["speedup_text"] == text and text.startswith("time to loss 3.5: ")
    expected_p = stats.ttest_1samp(CAND_LOSS, TARGET, alternative="less").pvalue
    assert st["p_value"] == pytest.approx(expected_p)  # the speedrun's rule, for the record
    assert st["confirmation"]["verdict"] == "pass" and st["confirmation"]["alpha"] == 0.0012

    readme = (out / "README.md").read_text()
    assert readme.startswith("# Fewer steps\n\nNine steps reach the target.\nMeasured twice.\n")
    assert f"**Speed-up: {text}** (the search's verdict: pass at alpha 0.0012" in readme
    assert "Proposer:" not in readme and "```diff" in readme and "+LR = 0.2" in readme
    assert "| candidate | 4 |" in readme and "| baseline | 4 |" in readme
    assert f"p = {expected_p:.3g} over 4 seeds" in readme
    assert readme.index("Raise LR") < readme.index("Fewer steps (confirm: time to loss 3.5: 1.12x)")  # from the base
    pr = (out / "pr.md").read_text()
    assert pr.startswith("## Fewer steps") and text in pr and "records/2025-01-31_Fewer_Steps/" in pr
    assert (out / "candidate.patch").read_text() == db.diff(win, against=db.base_commit)
    with git.Repo(db.repo_path) as r:
        assert r.commit("export/Fewer_Steps").hexsha == win

    with pytest.raises(ExportError, match="exists"):
        export(db, win, tmp_path / "out", "Fewer Steps!", target, date=DAY)
    # A candidate with no paired runs (only its selecting rung) has nothing honest to export.
    with pytest.raises(ExportError, match="no runs paired with the base"):
        export(db, mid, tmp_path / "out", "RaiseLR", target, date=DAY)


def test_untrusted_runs_need_the_flag(search, tmp_path):
    db, target, win, _ = search
    c = db.start_trial(win, None, "replay", "Fewer steps", "confirm")
    pb = db.start_trial(db.base_commit, None, "baseline", "beside replay", "confirm", {"pairs_for": c})
    db.finish_trial(pb, 1000.0, [run_result(5_000_001, 3.28, 1000)])  # untrusted: the default
    db.finish_trial(c, 900.0, [run_result(5_000_001, 3.27, 900)])
    with pytest.raises(ExportError, match="untrusted"):
        export(db, win, tmp_path / "out", "Untrusted", target, date=DAY)
    out = export(db, win, tmp_path / "out", "Untrusted", target, date=DAY, allow_untrusted=True)
    st = json.loads((out / "statistics.json").read_text())
    assert st["untrusted_runs"] == 2 and st["speedup"]["pairs"] == 5


def test_pairs_and_target_loss(search):
    db, target, win, _ = search
    p = paired_runs(db, win)
    assert [r.seed for r in p.candidate] == [r.seed for r in p.base] == SEEDS and p.lost == 2
    assert search_target_loss(db, target) == TARGET
    failed = run_result(9, 3.3, 1000, status=Status.FAILED)
    q = pair_up([run_result(9, 3.3, 1000), run_result(8, 3.3, 1000)], [failed, run_result(8, 3.3, 1000)])
    assert [r.seed for r in q.candidate] == [8] and q.lost == 1


def test_status_calls_only_a_confirmed_candidate_best(search):
    from agent.report import best_lines, status_dict

    db, _, win, mid = search
    data = status_dict(db)
    assert data["best"]["commit"] == win and data["best"]["speedup_text"] == "time to loss 3.5: 1.12x"
    assert best_lines(data).startswith("best (confirmed): Fewer steps: time to loss 3.5: 1.12x")
    data["trials"] = [r for r in data["trials"] if r["commit"] != win]  # as if it had never been confirmed
    data["best"] = None
    data["leading"] = {"title": "Raise LR", "fidelity": "full", "speedup_text": "time to loss 3.5: 1.02x",
                       "commit": mid}
    assert best_lines(data).startswith("nothing confirmed: 0 candidate(s) rejected by confirmation; leading, NOT "
                                       "confirmed: Raise LR at full")


def test_each_replay_draws_seeds_no_earlier_replay_or_confirm_used(search):
    from agent.replay import next_purpose
    from search_space.judge import fresh_seeds

    db, _, win, _ = search
    first, second = next_purpose(db), next_purpose(db)
    assert (first, second) == ("replay-1", "replay-2")  # the counter lives in the study: a rerun moves on
    seeds = [set(fresh_seeds(win, p, 0, 8)) for p in ("confirm", first, second)]
    assert not (seeds[0] & seeds[1]) and not (seeds[1] & seeds[2]) and not (seeds[0] & seeds[2])
