"""Track rules as data (issue 12, section 3): a target declares its evaluation rules (a pack plus
overrides), and the trusted evaluator holds every run to them, so breaking one cannot move the number.

The hostile models run through the real `speedsearch evaluate` (process sandbox, real torch, the
real held-out split): a model that adapts to the evaluation text, a model that attends across
documents, and an honest document-masked one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.prompt import system_blocks
from agent.proposal import ProposalContext
from env import rule_probes
from env.trusted import heldout_windows
from runs_db.export import export
from search_space.target import TargetError, load_target
from search_space.track_rules import RulesError, load_pack, pack_names, parse_rules
from tests.hostile_measure import at_import
from tests.test_export import DAY, files_in
from tests.test_export import search as search  # noqa: F401  (the export test's recorded search, a fixture)

TINYGPT = load_target("tinygpt")

# ---- hostile and honest models: SEARCH/REPLACE patches of tinygpt's train.py ---------------------------------

GPT_INIT = "        self.lm_head.weight = self.wte.weight  # tied input and output embedding\n"
GPT_IN = "        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))\n"
GPT_OUT = "        return self.lm_head(self.ln_f(x))\n"
SDPA = ("        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), "
        "is_causal=True)\n")


def block(old: str, new: str) -> str:
    return f"train.py\n<<<<<<< SEARCH\n{old}=======\n{new}>>>>>>> REPLACE\n"


# Test-time training in its simplest form: a unigram prior learnt from the rows the model has scored.
# It learns only from each row's first token (which the look-ahead probe never changes) and starts
# again at every checkpoint (a buffer the checkpoint resets), so the look-ahead probe cannot see it.
STATEFUL = at_import('print("ATTACK: adapts to the evaluation text", flush=True)') + block(
    GPT_INIT, GPT_INIT + '        self.register_buffer("seen", torch.zeros(cfg.vocab_size))\n') + block(
    GPT_OUT,
    "        logits = self.lm_head(self.ln_f(x))\n"
    "        if not self.training:\n"
    "            logits = logits + 0.15 * torch.log((self.seen + 1) / (self.seen.sum() + self.seen.numel()))\n"
    "            self.seen += torch.bincount(idx[:, 0], minlength=self.seen.numel()).to(self.seen.dtype)\n"
    "        return logits\n")

# Honest under the slowrun pack: attention stays inside each document (byte 0 starts one).
DOC_MASKED = at_import('print("HONEST: attention stays inside each document", flush=True)') + block(
    GPT_IN,
    "        doc = torch.cumsum((idx == 0).long(), dim=1)\n"
    "        same = doc[:, :, None] == doc[:, None, :]\n"
    "        causal = torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool, device=idx.device).tril()\n"
    "        globals()['_ATTN_MASK'] = (same & causal)[:, None]\n" + GPT_IN) + block(
    SDPA, SDPA.replace("is_causal=True)", "attn_mask=_ATTN_MASK)"))


def tinygpt_copy(folder: Path, old: str, new: str) -> Path:
    """tinygpt's files in `folder`, with one edit to its target.toml."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.py", "prepare.py", "model_server.py", "ideas.toml"):
        shutil.copy(TINYGPT.root / name, folder / name)
    text = TINYGPT.source.read_text()
    assert old in text
    (folder / "target.toml").write_text(text.replace(old, new, 1))
    return folder


def evaluate(tmp_path: Path, target: str, patch: str | None = None) -> tuple[dict, str]:
    args = [sys.executable, "-m", "agent", "evaluate", "--target", target, "--fidelity", "smoke", "--json",
            "--run-root", str(tmp_path / "runs")]
    if patch is not None:
        (tmp_path / "change.patch").write_text(patch)
        args += ["--patch", str(tmp_path / "change.patch")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    return result, Path(result["log"]).read_text()


# ---- rules as data -------------------------------------------------------------------------------------------

def test_packs_load_with_their_summaries():
    assert {"speedrun-track1", "slowrun"} <= set(pack_names())
    track1 = load_pack("speedrun-track1")
    assert (track1.causal, track1.test_time_training, track1.eval_context) == (True, False, 1024)
    assert track1.cross_document_attention and not track1.strided_eval and track1.heldout_hidden
    text = track1.text()
    assert text.startswith("NanoGPT speedrun, track 1 (rule pack speedrun-track1):\n")
    assert "Evaluation context: 1024 tokens." in text and "No test-time training" in text
    assert "attention across documents" not in text  # track 1 allows it
    slow = parse_rules({"pack": "slowrun", "doc_separator": 0})
    assert not slow.cross_document_attention and not slow.test_time_training and not slow.strided_eval
    assert "fixed budget of training tokens" in slow.text() and "(token 0)" in slow.text()
    # the built-in tinygpt: track 1 at its CPU window, which the evaluator's window length matches
    assert TINYGPT.rules.pack == "speedrun-track1" and TINYGPT.rules.eval_context == TINYGPT.trust.seq_len == 128
    assert TINYGPT.rules.state_tolerance == TINYGPT.rules.doc_tolerance == TINYGPT.trust.probe_tolerance  # filled in


def test_overrides_change_only_what_they_name():
    rules = parse_rules({"pack": "speedrun-track1", "eval_context": 256, "test_time_training": True,
                         "state_tolerance": 0.01})
    assert (rules.eval_context, rules.test_time_training, rules.state_tolerance) == (256, True, 0.01)
    assert rules.causal and rules.pack == "speedrun-track1"  # the rest is the pack's
    assert "256 tokens" in rules.text() and "No test-time training" not in rules.text()
    assert rule_probes.pass_names(rules) == []
    assert rule_probes.pass_names(load_pack("speedrun-track1")) == ["rule-state"]
    plain = parse_rules({})  # no pack: a causal model, nothing else asked
    assert plain.pack is None and plain.test_time_training and plain.text().startswith("custom rules:")


@pytest.mark.parametrize("old,new,message", [
    ('pack = "speedrun-track1"', 'pack = "speedrun-track2"', r"rules\.pack: no pack 'speedrun-track2'; did you mean"),
    ("eval_context = 128", "eval_context = 128\ntest_time_trainig = false",
     r"rules\.test_time_trainig: unknown rule; did you mean test_time_training\?"),
    ("eval_context = 128", 'eval_context = "long"', r"rules\.eval_context: expected an integer, got 'long'"),
    ("eval_context = 128", "eval_context = 1024", r"rules\.eval_context: 1024 tokens, but trust\.seq_len is 128"),
    ('pack = "speedrun-track1"', 'pack = "slowrun"', r"rules\.doc_separator: needed when cross_document_attention"),
    ("probe_rows = 8", "probe_rows = 0", r"rules\.causal: the look-ahead probe is off"),
    ('mount = "run"', 'mount = "heldout"', r"rules\.heldout_hidden: the held-out split 'heldout/val_000\.bin' is "
                                           r"inside what a run sees"),
    ("eval_context = 128", "eval_context = 128\nstate_tolerance = -1", r"rules\.state_tolerance: expected a positive"),
])
def test_a_bad_rule_is_one_line_naming_it(tmp_path, old, new, message):
    folder = tinygpt_copy(tmp_path, old, new)
    with pytest.raises(TargetError, match=message) as e:
        load_target(folder)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(folder / "target.toml"))
    with pytest.raises(RulesError, match="rules: expected a table"):
        parse_rules(["pack"])


# ---- the probes' pieces ----------------------------------------------------------------------------------------

def write_shard(path: Path, tokens: np.ndarray) -> Path:
    header = np.zeros(rule_probes.HEADER_INTS, dtype=np.int32)
    header[:3] = 20240520, 1, len(tokens)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())
    return path


def test_the_document_probe_changes_only_the_previous_document(tmp_path):
    rng = np.random.default_rng(0)
    stream = rng.integers(1, 50, size=4000)
    stream[::300] = 0  # a document starts every 300 tokens
    heldout = write_shard(tmp_path / "val.bin", stream)
    windows = np.stack([stream[s:s + 33] for s in range(0, 3900, 300)]).astype(np.int64)
    probe = rule_probes.docs_probe(windows, heldout, 0, 6, rng)
    k, t = len(probe.seps), windows.shape[1] - 1
    assert probe.inputs.shape == (2 * k, t) and k == 6
    for i, s in enumerate(probe.seps):
        built, other = probe.inputs[i], probe.inputs[k + i]
        assert t // 4 <= s <= 3 * t // 4 and built[s] == 0 == other[s]
        assert (built[s:] == other[s:]).all() and (built[:s] != other[:s]).any()
    rules = parse_rules({"pack": "slowrun", "doc_separator": 0})
    logits = rng.normal(size=(2 * k, t, 7)).astype(np.float32)
    logits[k:] = logits[:k]
    assert rule_probes.docs_problem(rules, probe, logits) == (None, 0.0)
    s = probe.seps[2]
    logits[k + 2, s + 1] += 0.5  # a position after the separator saw the previous document
    why, d = rule_probes.docs_problem(rules, probe, logits)
    assert why.startswith(f"no cross-document attention (rule pack slowrun): logits at position {s + 1}, after a "
                          f"document separator at position {s}, changed by 0.5") and d == pytest.approx(0.5)


def test_without_a_separator_in_the_text_the_probe_inserts_one(tmp_path):
    rng = np.random.default_rng(2)
    stream = rng.integers(1, 50, size=2000)  # no document starts anywhere
    windows = np.stack([stream[s:s + 41] for s in range(0, 1900, 100)]).astype(np.int64)
    probe = rule_probes.docs_probe(windows, write_shard(tmp_path / "val.bin", stream), 0, 4, rng)
    for i, s in enumerate(probe.seps):
        assert probe.inputs[i, s] == 0 == probe.inputs[4 + i, s] and (probe.inputs[i, :s] != 0).all()
        assert (probe.inputs[i, s + 1:] == probe.inputs[4 + i, s + 1:]).all()


def test_the_state_probe_compares_each_window_with_itself():
    rng = np.random.default_rng(1)
    windows = rng.integers(0, 9, size=(40, 17))
    probe = rule_probes.state_probe(windows, rng)
    assert len(probe.rows) == 30 and len(set(probe.rows.tolist())) == 30
    assert (probe.inputs == windows[probe.rows, :-1]).all()
    assert probe.rows.tolist() != sorted(probe.rows.tolist())  # another order, other batches
    normal = rng.normal(size=(40, 16, 5)).astype(np.float32)
    rules = load_pack("speedrun-track1")
    assert rule_probes.state_problem(rules, probe, normal, normal[probe.rows])[0] is None
    got = normal[probe.rows].copy()
    got[3, 7, 2] += 0.25
    why, d = rule_probes.state_problem(rules, probe, normal, got)
    assert why.startswith(f"no test-time training (rule pack speedrun-track1): window {probe.rows[3]}'s logits at "
                          "position 7 changed by 0.25") and d == pytest.approx(0.25)


def test_overlapping_windows_and_the_data_budget(tmp_path):
    heldout = write_shard(tmp_path / "val.bin", np.arange(1000) % 7)
    rules = parse_rules({"pack": "slowrun", "doc_separator": 0, "train_tokens": 1500})
    spaced = np.zeros((10, 65), dtype=np.int64)  # 10 windows of 64 fit in 1000 tokens without overlap
    assert rule_probes.overlap_problem(rules, spaced, heldout) is None
    why = rule_probes.overlap_problem(rules, np.zeros((20, 65), dtype=np.int64), heldout)
    assert why.startswith("no strided evaluation (rule pack slowrun): 20 windows of 64 tokens overlap")
    (tmp_path / "run").mkdir()
    write_shard(tmp_path / "run" / "train_000.bin", np.zeros(1000))
    assert rule_probes.budget_problem(rules, tmp_path) == (None, 1000)
    write_shard(tmp_path / "run" / "train_001.bin", np.zeros(600))
    assert rule_probes.budget_problem(rules, tmp_path) == (
        "data budget (rule pack slowrun): the training shards hold 1,600 tokens, the rule allows 1,500", 1600)


# ---- hostile and honest models through the real evaluator ------------------------------------------------------

def test_a_model_that_adapts_to_the_evaluation_text_is_refused(tmp_path):
    r, log = evaluate(tmp_path, "tinygpt", STATEFUL)
    assert "ATTACK: adapts to the evaluation text" in log, log[-2000:]
    assert r["status"] == "invalid" and r["trust"] == "untrusted", r["reason"]
    assert "no test-time training (rule pack speedrun-track1): window " in r["reason"]
    assert "when the same windows were scored in another order by a fresh process (tolerance 0.001)" in r["reason"]
    measured = r["provenance"]["trust"]
    assert "look-ahead" not in r["reason"] and measured["probe_max_change"] <= 1e-3  # only the rule's probe sees it
    assert measured["rules"]["state_max_change"] > 0.01 and measured["rules"]["state_rows"] == 96


@pytest.fixture(scope="module")
def slowrun(tmp_path_factory) -> Path:
    """tinygpt held to the slowrun pack (its documents start with byte 0)."""
    return tinygpt_copy(tmp_path_factory.mktemp("slowrun"), 'pack = "speedrun-track1"',
                        'pack = "slowrun"\ndoc_separator = 0')


def test_attention_across_documents_is_refused(tmp_path, slowrun):
    r, _ = evaluate(tmp_path, str(slowrun))  # tinygpt's own model: plain causal attention over the window
    assert r["status"] == "invalid" and r["trust"] == "untrusted", r["reason"]
    assert "no cross-document attention (rule pack slowrun): logits at position " in r["reason"]
    assert "when only the previous document's tokens changed (tolerance 0.001)" in r["reason"]
    assert r["provenance"]["trust"]["rules"]["docs_max_change"] > 0.01


def test_an_honest_document_masked_model_passes_every_rule(tmp_path, slowrun):
    r, log = evaluate(tmp_path, str(slowrun), DOC_MASKED)
    assert "HONEST: attention stays inside each document" in log
    assert r["status"] == "ok" and r["trust"] == "trusted", r["reason"]
    rules = r["provenance"]["trust"]["rules"]
    assert rules["pack"] == "slowrun" and rules["docs_rows"] == 8 and rules["state_rows"] == 96
    assert rules["docs_max_change"] <= 1e-3 and rules["state_max_change"] <= 1e-3
    t = load_target(slowrun)  # the same validation tokens for every run of the target: the host's windows
    windows = heldout_windows(t.data_path / t.trust.heldout, t.trust.windows, t.trust.seq_len)
    assert rules["heldout_digest"] == rule_probes.windows_digest(windows)
    assert set(r["provenance"]["trust"]["process_s"]) == {"trusted-0", "trusted-1", "probe", "rule-state",
                                                          "rule-docs", "rule-docs-b"}


# ---- the summary where people and models read it ----------------------------------------------------------------

def test_the_summary_is_in_the_prompt():
    text = system_blocks(ProposalContext(target=TINYGPT, parent="abc1234", files={}))[0]["text"]
    assert "<track_rules>" in text and TINYGPT.rules.text() in text
    plain = dataclasses.replace(TINYGPT, rules=None)
    assert "<track_rules>" not in system_blocks(ProposalContext(target=plain, parent="abc1234", files={}))[0]["text"]


def test_the_summary_is_in_the_exported_readme(search):  # noqa: F811
    db, target, win, _ = search
    rules = parse_rules({"pack": "slowrun", "doc_separator": 0})
    done = export(db, win, "Ruled", dataclasses.replace(target, rules=rules), date=DAY)
    readme = files_in(Path(target.repo), done.branch, done.folder)["README.md"]
    assert "## Evaluation rules\n" in readme and rules.text() in readme
    assert readme.index("## Evaluation rules") < readme.index("## Hardware and software")
