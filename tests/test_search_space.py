"""Targets, edits, rules and knobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from search_space.edits import EditError, apply_edits, parse_edits
from search_space.knobs import KNOBS_FILE, knob_changes, read_constant, rewrite_constant
from search_space.rules import RuleViolation, check_change, check_markers
from search_space.target import TargetError, load_target, parse_target
from tests.toy import make_toy


def minimal(**over) -> dict:
    raw = {"name": "t", "run": {"command": "python train.py --seed {seed} --steps {steps}"},
           "files": {"editable": ["train.py"], "frozen": ["val.py"]}, "fidelities": {"full": {"steps": 10}}}
    raw.update(over)
    return raw


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.pop("run"), "target.run: missing"),
    (lambda r: r["run"].update(command="python t.py {oops}"), "run.command: unknown placeholder {oops}"),
    (lambda r: r["files"].update(editable=[]), "files.editable: empty"),
    (lambda r: r.update(fidelities={"short": {"steps": 3}}), "fidelities.full: missing"),
    (lambda r: r.update(fidelities={"full": {"steps": 10}, "short": {"fraction": 2.0}}), "fidelities.short.fraction"),
    (lambda r: r.update(fidelities={"full": {"steps": 10}, "tiny": {"steps": 1}}), "fidelities.tiny: unknown"),
    (lambda r: r.update(objective={"kind": "fastest"}), "objective.kind: 'fastest'"),
    (lambda r: r.update(objective={"target_loss": "low"}), "objective.target_loss"),
    (lambda r: r.update(resources={"gpus": "two"}), "resources.gpus: expected int"),
    (lambda r: r.update(readout={"line_regex": "step:(\\d+)"}), "readout.line_regex: needs named groups"),
    (lambda r: r.update(knobs=[{"name": "lr", "low": 1, "high": 0, "via": "env"}]), "knobs[0]: needs numeric low"),
    (lambda r: r.update(knobs=[{"name": "lr", "low": 0, "high": 1, "via": "constant"}]), "knobs[0].file"),
])
def test_bad_target_names_the_field(tmp_path: Path, mutate, field):
    raw = minimal()
    mutate(raw)
    with pytest.raises(TargetError, match=field.replace("{", "\\{").replace("}", "\\}").replace("[", "\\[")
                       .replace("]", "\\]").replace("(", "\\(")):
        parse_target(raw, tmp_path)


def test_target_defaults_and_fractions(tmp_path: Path):
    raw = minimal(fidelities={"full": {"steps": 100}, "short": {"fraction": 0.25}, "smoke": {"steps": 3}})
    t = parse_target(raw, tmp_path)
    assert t.steps("short") == 25 and t.steps("smoke") == 3 and t.objective == "time_to_target"
    assert t.target_loss == "baseline"
    assert t.render_command(seed=7, steps=25, data="/d") == "python train.py --seed 7 --steps 25"
    with pytest.raises(TargetError, match="fidelity 'confirm'"):
        t.steps("confirm")


def test_builtin_target_loads():
    t = load_target("tinygpt")
    assert t.name == "tinygpt" and t.markers and "train.py" in t.editable
    with pytest.raises(TargetError, match="neither a built-in target"):
        load_target("no-such-target")


def test_edits_parse_and_apply():
    text = "train.py\n<<<<<<< SEARCH\na = 1\n=======\na = 2\n>>>>>>> REPLACE\n"
    edits = parse_edits(text)
    assert apply_edits({"train.py": "x\na = 1\n"}, edits) == {"train.py": "x\na = 2\n"}
    with pytest.raises(EditError, match="not found.*closest line: 'a = 3'"):
        apply_edits({"train.py": "a = 3\n"}, edits)
    with pytest.raises(EditError, match="occurs 2 times"):
        apply_edits({"train.py": "a = 1\na = 1\n"}, edits)
    with pytest.raises(EditError, match="does not exist"):
        apply_edits({}, edits)
    with pytest.raises(EditError, match="no SEARCH/REPLACE blocks"):
        parse_edits("just prose")
    with pytest.raises(EditError, match="not closed"):
        parse_edits("train.py\n<<<<<<< SEARCH\na = 1\n")


def test_rules(tmp_path: Path):
    t = make_toy(tmp_path / "toy")
    text = (tmp_path / "toy" / "train.py").read_text()
    inside = text.replace("RATE = 1.0", "RATE = 2.0")
    outside = text.replace("import argparse", "import argparse  # changed")
    check_change(t, {"train.py": (text, inside)})
    with pytest.raises(RuleViolation, match="outside the EVOLVE-BLOCK"):
        check_change(t, {"train.py": (text, outside)})
    with pytest.raises(RuleViolation, match="frozen"):
        check_change(t, {"target.toml": ("a", "b")})
    with pytest.raises(RuleViolation, match="not editable"):
        check_change(t, {"other.py": (None, "b")})
    with pytest.raises(RuleViolation, match="escape"):
        check_change(t, {"../x.py": (None, "b")})
    with pytest.raises(RuleViolation, match="git's own files"):
        check_change(t, {".git/config": (None, "b")})
    with pytest.raises(RuleViolation, match="symbolic links"):
        check_change(t, {"train.py": (text, inside)}, symlinks=("train.py",))
    with pytest.raises(RuleViolation, match="markers must stay"):
        check_markers("train.py", text, text.replace("# EVOLVE-BLOCK-END", ""))


def test_knobs(tmp_path: Path):
    t = make_toy(tmp_path / "toy")
    files = {"train.py": (tmp_path / "toy" / "train.py").read_text()}
    out = knob_changes(files, t.knobs, {"rate": 2.5})
    assert read_constant(out["train.py"], "RATE") == "2.5"
    assert rewrite_constant("LR: float = 0.1  # note\n", "LR", 0.2) == "LR: float = 0.2  # note\n"
    with pytest.raises(KeyError):
        rewrite_constant("x = 1\n", "LR", 1)
    raw = minimal(knobs=[{"name": "lr", "low": 0.001, "high": 0.1, "log": True, "via": "env", "key": "LR"}])
    t2 = parse_target(raw, tmp_path)
    out = knob_changes({}, t2.knobs, {"lr": 0.01})
    assert '"lr": 0.01' in out[KNOBS_FILE]
