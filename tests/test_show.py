"""Reviewing a finished search in the terminal: `speedsearch show` and `speedsearch status`.

One real search on the toy target (real Ray, git and SQLite) with confirmation allowed for its
untrusted runs, so that candidates stack (a change on top of a confirmed one) and carry paired
statistics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.toy import make_toy


def cli(*args: str, columns: int = 80, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("show")
    toy = make_toy(root / "toy", sleep=0.01)
    d = root / "search"
    out = cli("launch", "--dir", str(d), "--target", str(toy.source), "--proposers", "ideas", "--seeds", "2",
              "--workers", "2", "--allow-untrusted", timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return d


def status(d: Path, *args: str) -> dict:
    out = cli("status", "--dir", str(d), "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stacked(d: Path) -> dict:
    """A confirmed candidate two changes away from the base."""
    rows = [r for r in status(d, "--all")["trials"] if r["fidelity"] == "confirm" and r["proposer"] == "ideas"
            and r["verdict"] == "pass" and r["depth"] == 2]
    assert rows, "the search stacked no confirmed change on another"
    return rows[0]


def test_show_a_stacked_candidate(search: Path):
    row = stacked(search)
    out = cli("show", str(row["number"]), "--dir", str(search), "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["commit"] == row["commit"] and d["verdict"] == "pass"
    assert d["cost"]["worker_seconds"] > 0 and d["cost"]["llm_dollars"] == 0  # the ideas proposer is free
    assert d["speedup_text"] == row["speedup_text"]  # one speed-up, the same words as status
    # The lineage: two steps from the base, the first a child of the base, each with its own gain.
    lin = d["lineage"]
    assert [s["commit"] for s in lin][-1] == d["commit"] and len(lin) == 2
    assert lin[1]["commit"] == d["commit"] and lin[0]["commit"] == d["parent"]
    assert all(s["speedup_text"] and s["runs"] for s in lin)
    first, second = (judge_estimate(s["speedup_text"]) for s in lin)
    assert lin[0]["over_parent"]["factor"] == pytest.approx(first, rel=0.01)
    assert lin[1]["over_parent"]["factor"] == pytest.approx(second / first, rel=0.02)
    assert "confirm runs" in lin[1]["over_parent"]["runs"]
    # The diffs: against the base both changes, against the parent only the last one.
    changed = lambda diff: {ln[1:].split("=")[0].strip() for ln in diff.splitlines()  # noqa: E731
                            if ln[:1] in "+-" and not ln.startswith(("+++", "---"))}
    assert changed(d["diff_base"]) == {"RATE", "SLEEP"}
    assert len(changed(d["diff_parent"])) == 1 and changed(d["diff_parent"]) < changed(d["diff_base"])
    # Seeds: every run, the confirm ones beside their base partner with the same seed, never seed 0.
    confirm = [r for r in d["seeds"] if r["rung"] == "confirm"]
    assert len(confirm) >= 6 and all(r["base"] and r["pair_gain"] and r["seed"] != 0 for r in confirm)
    assert all("confirm runs" in r["runs"] for r in confirm)
    assert any(r["rung"] in ("short", "full") and "selected it" in r["runs"] for r in d["seeds"])
    # The verdict's statistics: the paired test passed at its look's level.
    st = next(s for s in d["statistics"] if s["verdict"] == "pass")
    assert st["pairs"] == len(confirm) - st["lost"]
    assert st["pvalue"] < st["look_level"] <= st["alpha"] < 0.05
    assert st["speedup_text"] == d["speedup_text"] and 0 <= st["speedrun_pvalue"] < 0.01
    # The curves: a PNG and a sparkline, each line as long as the steps it covers.
    assert Path(d["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sp = d["sparkline"]
    assert len(sp["candidate_line"]) == len(sp["base_line"]) == len(sp["band"]) == len(sp["steps"]) >= 2
    assert "▼" in sp["band"]  # a confirmed speed-up's loss curve lies below the base's band somewhere
    assert "confirm runs" in sp["runs"]


def judge_estimate(text: str) -> float:
    return float(re.search(r": ([\d.]+)x ", text).group(1))


def test_show_in_the_terminal_names_every_run_set(search: Path):
    row = stacked(search)
    by_commit = cli("show", row["commit"][:9], "--dir", str(search))
    by_trial = cli("show", str(row["number"]), "--dir", str(search))
    assert by_commit.returncode == 0 and by_commit.stdout == by_trial.stdout, by_commit.stderr
    text = by_commit.stdout
    for words in ("lineage from the base: 2 changes", "its own gain", "over its parent (step 1)",
                  "statistics of the search's confirm runs", "paired one-sided t-test", "speedrun rule",
                  "diff against the base:", "diff against the parent:", "vs band", row["speedup_text"]):
        assert words in text, words
    table = text[text.index("\nseeds"):text.index("loss: final")]
    assert max(len(line) for line in table.splitlines()) <= 80  # the seeds table fits 80 columns
    none = cli("show", str(row["number"]), "--dir", str(search), "--diff", "none").stdout
    assert "diff against" not in none and "@@" not in none


def test_show_refuses_the_base(search: Path):
    base = next(r for r in status(search, "--all")["trials"] if r["proposer"] == "baseline" and r["number"] < 2)
    out = cli("show", str(base["number"]), "--dir", str(search))
    assert out.returncode == 2 and out.stderr.startswith("error: trial") and "base" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_show_a_candidate_that_never_ran_well(search: Path):
    rows = status(search, "--all")["trials"]
    crashed = next(r for r in rows if r["state"] == "fail" and r["proposer"] == "ideas")
    d = json.loads(cli("show", crashed["commit"], "--dir", str(search), "--json").stdout)
    assert d["statistics"] == [] and d["sparkline"] is None and d["plot"] is None
    assert d["seeds"] and all(r["status"] == "failed" for r in d["seeds"])
    assert d["lineage"][-1]["over_parent"]["factor"] is None


def test_status_filters_sorts_and_units(search: Path):
    every = status(search, "--all", "--sort", "trial")
    assert [r["number"] for r in every["table"]] == sorted(r["number"] for r in every["trials"])
    best = status(search)["table"]
    assert len({r["commit"] for r in best}) == len(best) <= 8  # one row per candidate
    assert best[0]["verdict"] == "pass"
    confirm = status(search, "--rung", "confirm", "--sort", "speedup")["table"]
    assert confirm and all(r["fidelity"] == "confirm" for r in confirm)
    gains = [r["gain"] for r in confirm]
    assert gains == sorted(gains, reverse=True)
    base = status(search, "--proposer", "baseline")["table"]
    assert base and all(r["proposer"] == "baseline" for r in base)
    assert all(r["objective_text"].endswith((" s", " ms")) for r in base)
    assert status(search, "--proposer", "knobs")["table"] == []
    text = cli("status", "--dir", str(search)).stdout
    assert re.search(r"trials: \d+ \(\d+ of the base\): \d+ complete, \d+ failed, \d+ pruned, 0 running", text)
    assert "{" not in text.split("trials:")[1].splitlines()[0]  # counts in words, not a dict
    assert re.search(r"baseline @ full \(trial \d+, mean of its seeds\): time to loss [\d.]+: \d+(\.\d+)? m?s\n", text)
    table = text[text.index(" #"):text.index("best (")]
    assert max(len(line) for line in table.splitlines()) <= 80


def test_knob_titles_tell_candidates_apart_in_a_narrow_column():
    from agent.report import short_title

    a = short_title("knobs: LEARNING_RATE=0.002055, WEIGHT_DECAY=0.2146, BETA2=0.9597, WARMUP_STEPS=28")
    b = short_title("knobs: LEARNING_RATE=0.002889, WEIGHT_DECAY=0.1313, BETA2=0.9883, WARMUP_STEPS=49")
    assert a[:24] != b[:24] and len(a) <= 45
    assert a.startswith("knobs LR=2.06e-3 WD=0.215") or a.startswith("knobs LR=2.05e-3 WD=0.215")
    assert short_title("Value embeddings: a second token embedding added") == "Value embeddings"
    assert short_title("Sleep less per step") == "Sleep less per step"
