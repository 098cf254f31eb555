"""A track's evaluation rules, as data: the `[rules]` section of a target.toml.

A target names a pack (search_space/packs/<name>.toml: the rules of a known track, with a
plain-language summary) and may override any rule. What the rules say is enforced by the trusted
evaluator (env/rule_probes.py), never by the candidate: without a `[trust]` section they are only
words, and the target's results are `untrusted` anyway.

Pure: no I/O but reading the pack files shipped beside this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search_space.errors import UserError

PACKS = Path(__file__).parent / "packs"


class RulesError(UserError):
    """A `[rules]` section or a pack that cannot be used; the message names the field."""


@dataclass(frozen=True)
class TrackRules:
    """The evaluation rules one target's runs are held to. Without a pack: a causal model, its
    validation data kept out of training, nothing else."""

    pack: str | None = None
    title: str = "custom rules"
    summary: str = ""  # the pack's prose (the rule lines below are generated from the values)
    causal: bool = True  # look-ahead probe required (trust.probe_rows > 0)
    test_time_training: bool = True  # False: the state probe (same windows, other order, fresh process)
    cross_document_attention: bool = True  # False: the document probe (needs doc_separator)
    strided_eval: bool = True  # False: every window scored alone, no overlap between windows
    eval_context: int | None = None  # tokens per evaluation window; must equal trust.seq_len
    heldout_hidden: bool = True  # no validation data in training: the held-out split is outside the run's mount
    train_tokens: int | None = None  # data budget: the data folder's `*train*.bin` shards hold at most this many
    doc_separator: int | None = None  # the token that starts every document
    # Max |logit change| between the two orders, and after a separator when the previous document
    # changes. None: the target's trust.probe_tolerance (the same float noise as the look-ahead probe's).
    state_tolerance: float | None = None
    doc_tolerance: float | None = None
    doc_rows: int = 8  # windows the document probe builds

    def checks(self) -> list[str]:
        """One plain line per rule: what it says and how the evaluator holds the run to it."""
        out = []
        if self.eval_context is not None:
            out.append(f"Evaluation context: {self.eval_context} tokens. The evaluator cuts the held-out text into "
                       f"windows of exactly {self.eval_context} tokens and scores every position; the model "
                       "never chooses its inputs.")
        if self.causal:
            out.append("Causal: a prediction may use only earlier tokens. Checked by changing the tokens after a "
                       "random cut: the logits before it must not move.")
        if not self.test_time_training:
            out.append("No test-time training and no state between inputs: the model must not learn from, or "
                       "remember, the evaluation text. Checked by scoring the same windows in a fresh process "
                       "in another order and batching: every logit must agree.")
        if not self.strided_eval:
            out.append("No strided or sliding-window evaluation: each window is scored once, on its own, from "
                       "its first token; windows do not overlap.")
        if not self.cross_document_attention:
            out.append(f"No attention across documents: after a document separator (token {self.doc_separator}) "
                       "the logits must not depend on the document before it. Checked by replacing the previous "
                       "document's tokens.")
        if self.heldout_hidden:
            out.append("No validation data in training: the held-out split is never mounted for a training "
                       "run, and the validation tokens are the same for every run.")
        if self.train_tokens is not None:
            out.append(f"Fixed data budget: the training run is given at most {self.train_tokens:,} tokens "
                       "(counted in the data folder's training shards, not by the trainer).")
        return out

    def text(self) -> str:
        """The plain-language summary shown in the LLM's prompt and in an export's README."""
        head = f"{self.title} (rule pack {self.pack})" if self.pack else self.title
        body = [" ".join(self.summary.split())] if self.summary.strip() else []  # the pack's prose, unwrapped
        return "\n".join([head + ":", *body, *(f"- {line}" for line in self.checks())])


_BOOLS = ("causal", "test_time_training", "cross_document_attention", "strided_eval", "heldout_hidden")
_INTS = ("eval_context", "train_tokens", "doc_separator", "doc_rows")
_FLOATS = ("state_tolerance", "doc_tolerance")
RULE_KEYS = (*_BOOLS, *_INTS, *_FLOATS)
SECTION_KEYS = ("pack", *RULE_KEYS)


def pack_names() -> list[str]:
    return sorted(p.stem for p in PACKS.glob("*.toml"))


def _nearest(word: str, names: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f" (valid: {', '.join(names)})"


def _values(raw: dict, where: str) -> dict[str, Any]:
    """Checked rule values from a table; one line naming the field for anything wrong."""
    got: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in RULE_KEYS:
            raise RulesError(f"{where}.{key}: unknown rule{_nearest(key, RULE_KEYS)}")
        if key in _BOOLS:
            if not isinstance(value, bool):
                raise RulesError(f"{where}.{key}: expected true or false, got {value!r}")
        elif key in _INTS:
            if not isinstance(value, int) or isinstance(value, bool):
                raise RulesError(f"{where}.{key}: expected an integer, got {value!r}")
            if value < (0 if key == "doc_separator" else 1):
                raise RulesError(f"{where}.{key}: out of range, got {value}")
        else:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise RulesError(f"{where}.{key}: expected a positive number, got {value!r}")
            value = float(value)
        got[key] = value
    return got


def load_pack(name: str) -> TrackRules:
    path = PACKS / f"{name}.toml"
    if "/" in name or not path.is_file():
        raise RulesError(f"rules.pack: no pack {name!r}{_nearest(name, pack_names())}")
    raw = tomllib.loads(path.read_text())
    title, summary = raw.get("title", name), raw.get("summary", "")
    return TrackRules(pack=name, title=title, summary=summary, **_values(raw.get("rules", {}), f"pack {name}"))


def parse_rules(raw: Any) -> TrackRules:
    """The `[rules]` table: an optional pack, then overrides of any of its rules."""
    if not isinstance(raw, dict):
        raise RulesError(f"rules: expected a table, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SECTION_KEYS]
    if unknown:
        raise RulesError(f"rules.{unknown[0]}: unknown rule{_nearest(unknown[0], SECTION_KEYS)}")
    pack = raw.get("pack")
    if pack is not None and not isinstance(pack, str):
        raise RulesError(f"rules.pack: expected a name, got {pack!r}")
    base = load_pack(pack) if pack else TrackRules()
    rules = dataclasses.replace(base, **_values({k: v for k, v in raw.items() if k != "pack"}, "rules"))
    if not rules.cross_document_attention and rules.doc_separator is None:
        raise RulesError("rules.doc_separator: needed when cross_document_attention = false (the token that "
                         "starts each document)")
    return rules


def check_against(rules: TrackRules, *, seq_len: int | None, probe_rows: int | None, probe_tolerance: float | None,
                  heldout: str | None, mount: str | None, has_data: bool) -> TrackRules:
    """The rules against the rest of the target (its `[trust]` and `[data]`): a rule the evaluator
    could not hold the runs to is refused when the target loads, not discovered after a search.
    Returns the rules with the probes' tolerances filled in from the look-ahead probe's."""
    if seq_len is None:  # no trusted evaluator: the rules are words, the results untrusted
        return rules
    if rules.eval_context is not None and rules.eval_context != seq_len:
        raise RulesError(f"rules.eval_context: {rules.eval_context} tokens, but trust.seq_len is {seq_len} (the "
                         "evaluator's window length); make them equal")
    if rules.causal and not probe_rows:
        raise RulesError("rules.causal: the look-ahead probe is off (trust.probe_rows = 0); give it rows")
    if rules.heldout_hidden and has_data:
        parts = Path(heldout or "").parts
        if mount is None or parts[:len(Path(mount).parts)] == Path(mount).parts:
            raise RulesError(f"rules.heldout_hidden: the held-out split {heldout!r} is inside what a run sees "
                             f"(data.mount = {mount!r}); mount a folder that does not hold it")
    return dataclasses.replace(rules, state_tolerance=rules.state_tolerance or probe_tolerance,
                               doc_tolerance=rules.doc_tolerance or probe_tolerance)
