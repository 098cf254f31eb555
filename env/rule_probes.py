"""The track's rules (search_space/track_rules.py), held to by the trusted evaluator (env/trusted.py).

Each rule the evaluator can test is one more fresh sandboxed model process (a `Pass`) on one
checkpoint (the one a loss at a budget reads, else one drawn at random: env/trusted.py
`rule_checkpoint`), with inputs the host builds here and logits the host compares here:
- no test-time training, no state: a random three quarters of the held-out windows, in a random
  order (so every batch holds other rows), in a process of its own. A model that learns from what
  it has scored, remembers it, or lets one row's output depend on another's, gives other logits
  for the same window than the normal pass did.
- no attention across documents: windows that hold a real document boundary (the end of one
  document, the separator token, the next document's first tokens), each twice: as built, and with
  the document before the separator replaced by the end of another one. From the separator on, the
  logits must not move. The two versions go to two processes of their own, each among the normal
  windows at random rows, so a pass of the probe holds as many windows as the normal pass and looks
  like it: a model that could tell it apart could keep to the rule only there. Where the track also
  forbids state, the untouched windows must give the normal pass's logits.
The evaluation context is the window length the host cuts (trust.seq_len, which the rules must
equal), and no window overlaps another; the data budget is counted in the training shards' headers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from search_space.track_rules import TrackRules

DEFAULT_TOLERANCE = 1e-3  # rules not checked against a [trust] section (the target's fill it in)
HEADER_INTS = 256  # the speedrun's .bin shard: 256 int32 of header (magic, version, token count), uint16 tokens
STATE, DOCS, DOCS_B = "rule-state", "rule-docs", "rule-docs-b"


@dataclass
class Probe:
    """The inputs of one rule's pass and what the host needs to judge its logits."""

    inputs: np.ndarray  # [rows, T] int64
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # state: window index per row
    seps: list[int] = field(default_factory=list)  # docs: the separator's position in row i (and i + len)
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # docs: the rows that are probes


def pass_names(rules: TrackRules | None) -> list[str]:
    """The extra model processes these rules call for."""
    if rules is None:
        return []
    return [name for name, wanted in ((STATE, not rules.test_time_training),
                                      (DOCS, not rules.cross_document_attention),
                                      (DOCS_B, not rules.cross_document_attention)) if wanted]


def _shard_tokens(path: Path) -> np.ndarray:
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(int(header[2]),))


def state_probe(windows: np.ndarray, rng: np.random.Generator) -> Probe:
    n = len(windows)
    rows = rng.permutation(n)[:max(1, 3 * n // 4)]
    return Probe(windows[rows, :-1].copy(), rows=rows)


def docs_probe(windows: np.ndarray, heldout: Path, separator: int, count: int, rng: np.random.Generator) -> Probe:
    """`count` rows with a document start at a random position s (a quarter to three quarters in): a
    real boundary of the held-out text where it has one, else a separator put into a window; then the
    same rows with everything before s taken from the end of another document (or another window)."""
    x = windows[:, :-1]
    n, t = x.shape
    stream = _shard_tokens(heldout)
    starts = np.flatnonzero(np.asarray(stream) == separator)
    built, changed, seps = [], [], []
    for _ in range(count):
        r, s = int(rng.integers(0, n)), int(rng.integers(t // 4, 3 * t // 4 + 1))
        room = starts[(starts >= s) & (starts + (t - s) <= len(stream))]
        if len(room) > 1:  # a real boundary: a document's end, the separator, the next one's beginning
            d, e = (int(v) for v in rng.choice(room, size=2, replace=False))
            row = np.asarray(stream[d - s:d + t - s], dtype=np.int64)
            donor = np.asarray(stream[e - s:e], dtype=np.int64)  # the end of another document
        else:  # the held-out text holds (almost) no separator: insert one
            after = x[r, s:].copy()
            after[0] = separator
            row = np.concatenate([x[r, :s], after])
            donor = x[(r + int(rng.integers(1, n))) % n, :s] if n > 1 else np.roll(x[r, :s], 1)
        other = row.copy()
        other[:s] = donor
        built.append(row)
        changed.append(other)
        seps.append(s)
    return Probe(np.stack(built + changed), seps=seps)


def plan(rules: TrackRules | None, windows: np.ndarray, heldout: Path, rng: np.random.Generator) -> dict[str, Probe]:
    out: dict[str, Probe] = {}
    for name in pass_names(rules):
        if name == STATE:
            out[name] = state_probe(windows, rng)
        elif name == DOCS:
            assert rules is not None and rules.doc_separator is not None  # the parser asks for it
            x = windows[:, :-1]
            built = docs_probe(windows, heldout, rules.doc_separator, min(rules.doc_rows, len(x)), rng)
            k = len(built.seps)
            slots = rng.choice(len(x), size=k, replace=False)
            for which, rows in ((DOCS, built.inputs[:k]), (DOCS_B, built.inputs[k:])):
                inputs = x.copy()
                inputs[slots] = rows
                out[which] = Probe(inputs, seps=built.seps, slots=slots)
    return out


def _pack(rules: TrackRules) -> str:
    return f" (rule pack {rules.pack})" if rules.pack else ""


def state_problem(rules: TrackRules, probe: Probe, normal: np.ndarray, got: np.ndarray) -> tuple[str | None, float]:
    """The state pass's logits against the normal pass's for the same windows."""
    d = np.abs(got - normal[probe.rows])
    if not np.all(np.isfinite(d)):
        return "no test-time training: logits of the state probe are not finite", float("inf")
    worst, tol = float(d.max()) if d.size else 0.0, rules.state_tolerance or DEFAULT_TOLERANCE
    if worst <= tol:
        return None, worst
    i, pos = np.unravel_index(int(d.max(axis=-1).argmax()), d.shape[:2])
    return (f"no test-time training{_pack(rules)}: window {int(probe.rows[i])}'s logits at position {int(pos)} "
            f"changed by {worst:.4g} when the same windows were scored in another order by a fresh process "
            f"(tolerance {tol:g}): the model's output depends on what else it has seen"), worst


def docs_problem(rules: TrackRules, probe: Probe, got: np.ndarray) -> tuple[str | None, float]:
    """Logits from each separator on, with the previous document as built against replaced."""
    k = len(probe.seps)
    worst = (0.0, 0, 0)
    for i, s in enumerate(probe.seps):
        d = np.abs(got[i, s:] - got[k + i, s:]).max(axis=-1)
        if not np.all(np.isfinite(d)):
            return "no cross-document attention: logits of the document probe are not finite", float("inf")
        worst = max(worst, (float(d.max()), s + int(d.argmax()), s))
    d, pos, s = worst
    tol = rules.doc_tolerance or DEFAULT_TOLERANCE
    if d <= tol:
        return None, d
    return (f"no cross-document attention{_pack(rules)}: logits at position {pos}, after a document separator at "
            f"position {s}, changed by {d:.4g} when only the previous document's tokens changed (tolerance "
            f"{tol:g})"), d


def overlap_problem(rules: TrackRules | None, windows: np.ndarray, heldout: Path) -> str | None:
    """No strided evaluation: the host's windows (evenly spaced, env/trusted.py) must not overlap."""
    if rules is None or rules.strided_eval:
        return None
    n, width = windows.shape[0], windows.shape[1] - 1  # each window: its inputs, then one more target token
    tokens = len(_shard_tokens(heldout))
    if n > 1 and (tokens - width - 1) / (n - 1) < width:
        return (f"no strided evaluation{_pack(rules)}: {n} windows of {width} tokens overlap in the held-out "
                f"split's {tokens} tokens (the target asks for more windows than the split holds)")
    return None


def windows_digest(windows: np.ndarray) -> str:
    """The held-out tokens every run is scored on (fixed validation tokens: equal digests, equal tokens)."""
    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()[:16]


def budget_problem(rules: TrackRules | None, data_folder: Path) -> tuple[str | None, int | None]:
    """The data budget, counted in the headers of the data folder's training shards (`*train*.bin`)."""
    if rules is None or rules.train_tokens is None:
        return None, None
    shards = sorted(p for p in data_folder.rglob("*train*.bin") if p.is_file())
    total = sum(int(np.fromfile(p, dtype=np.int32, count=HEADER_INTS)[2]) for p in shards)
    if total > rules.train_tokens:
        return (f"data budget{_pack(rules)}: the training shards hold {total:,} tokens, the rule allows "
                f"{rules.train_tokens:,}"), total
    return None, total


def problems(rules: TrackRules | None, probes: dict[str, Probe], normal: np.ndarray | None,
             got: dict[str, np.ndarray]) -> tuple[list[str], dict]:
    """Every rule pass's verdict: problem lines naming the rule and the numbers, and what was measured."""
    out: list[str] = []
    info: dict = {}
    if rules is None:
        return out, info
    if STATE in probes and normal is not None:
        why, d = state_problem(rules, probes[STATE], normal, got[STATE])
        info["state_max_change"], info["state_rows"] = d, len(probes[STATE].rows)
        out += [why] if why else []
    if DOCS in probes:
        probe = probes[DOCS]
        why, d = docs_problem(rules, probe, np.concatenate([got[DOCS][probe.slots], got[DOCS_B][probe.slots]]))
        info["docs_max_change"], info["docs_rows"] = d, len(probe.seps)
        out += [why] if why else []
        if normal is not None and not rules.test_time_training:
            why, info["docs_normal_change"] = docs_pass_problem(rules, probe, normal, got)
            out += [why] if why else []
    return out, info


def docs_pass_problem(rules: TrackRules, probe: Probe, normal: np.ndarray,
                      got: dict[str, np.ndarray]) -> tuple[str | None, float]:
    """The windows the document probe's passes left as they were, against the normal pass: a
    stateless model gives them the same logits; one that behaves otherwise when probed does not."""
    rest = np.setdiff1d(np.arange(len(normal)), probe.slots)
    d = max(float(np.abs(got[name][rest] - normal[rest]).max()) if len(rest) else 0.0 for name in (DOCS, DOCS_B))
    tol = rules.state_tolerance or DEFAULT_TOLERANCE
    if d <= tol:
        return None, d
    return (f"no cross-document attention{_pack(rules)}: the document probe's processes gave other logits (by "
            f"{d:.4g}, tolerance {tol:g}) than the normal pass for the windows they left as they were: the model "
            "behaves otherwise when it is probed"), d
