"""Ablations: how much of a candidate's gain each of its changes carries.

A change is each commit of the candidate's lineage from the base, and, inside a commit that only
set knob values (the knobs proposer's moves), each knob value separately. For k changes the
variants are: all of them (the candidate), each change alone on the base, and each left out
(leave-one-out). A variant is built by applying the changes' diffs to the base in lineage order
with a three-way merge; a leave-one-out whose later changes need the one left out does not apply
and is reported as such, never silently skipped. Variants with the same tree run once; one that
is the base itself has no gain by definition and runs not at all.

All variants run on the same fresh seeds ("ablate-<k>", from the search's replay counter),
interleaved seed by seed with one base run per seed, on the same machine. A change's share of
the gain is what leaving it out costs: (gain of all - gain without it) / gain of all, on the one
speed-up's scale (log ratio, or loss reduction); shares need not sum to one (changes interact),
and the rest is shown as such.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from agent.replay import Arm, Progress, check_seeds, next_purpose, run_arms
from env.pool import Pool
from runs_db import record_git
from runs_db.db import RunsDB
from runs_db.export import ABLATION_STATE
from runs_db.pairs import budget_words, pair_up, search_target_loss
from search_space import judge
from search_space.errors import UserError
from search_space.knobs import KNOBS_FILE, read_constant, value_span
from search_space.target import Target

STATE_PREFIX = ABLATION_STATE  # study state: the latest ablation of a commit


@dataclass(frozen=True)
class Change:
    """One change of a lineage: the difference between commits `frm` and `to` of the search's history."""

    number: int
    title: str
    frm: str
    to: str
    kind: str  # "commit" | "knob"
    # a knob's value, (file, constant or knob name, value as written): set by rewriting that line,
    # so it applies wherever the constant is (a diff's context lines would tie it to its neighbours)
    knob: tuple[str, str, str] | None = None


@dataclass
class Variant:
    label: str  # all | alone-<i> | without-<i>
    changes: tuple[int, ...]  # the change numbers it holds
    commit: str | None  # None: does not apply
    same_as: str = ""  # the label (or "base") of an earlier variant with the same tree
    speedup: judge.Speedup | None = None


@dataclass
class Plan:
    commit: str
    changes: list[Change]
    variants: list[Variant]
    seeds: int

    @property
    def arms(self) -> list[Variant]:
        """The variants that run: they apply and are not the base or a repeat."""
        return [v for v in self.variants if v.commit and not v.same_as]

    @property
    def runs(self) -> int:
        return self.seeds * (len(self.arms) + 1)  # +1: the base, once per seed

    def cost_line(self) -> str:
        k, n = len(self.changes), len(self.arms)
        skipped = len(self.variants) - n
        return (f"ablation of {self.commit[:10]}: {k} change{'s' if k != 1 else ''}, {len(self.variants)} variants "
                f"({n} to run" + (f", {skipped} not run: base, repeat or not applicable" if skipped else "")
                + f") and the base, x {self.seeds} seeds = {self.runs} runs")


@dataclass
class Ablation:
    plan: Plan
    purpose: str
    target_loss: float
    shares: dict[int, float | None] = field(default_factory=dict)  # change -> share of the full gain
    plot: str | None = None  # relative to the search folder
    untrusted: int = 0  # runs whose losses were claimed, not measured

    def variant(self, label: str) -> Variant:
        return next(v for v in self.plan.variants if v.label == label)

    def effective(self, v: Variant) -> judge.Speedup | None:
        """A variant's speed-up, through its twin when it repeats one; None for the base or n/a."""
        if v.commit is None or v.same_as == "base":
            return None
        return self.variant(v.same_as).speedup if v.same_as else v.speedup

    def lines(self) -> list[str]:
        full = self.effective(self.variant("all"))
        out = [f"{self.purpose} of {self.plan.commit[:10]} (fresh seeds, beside the base): all changes: "
               f"{full.text() if full else 'n/a'}"]
        for c in self.plan.changes:
            alone, without = self.variant(f"alone-{c.number}"), self.variant(f"without-{c.number}")
            share = self.shares.get(c.number)
            out.append(f"  {c.number}. {c.title}")
            out.append(f"     alone: {self._words(alone)}")
            out.append(f"     without it: {self._words(without)}")
            out.append(f"     carries: {'n/a' if share is None else f'{share:.0%}'} of the gain")
        known = [s for s in self.shares.values() if s is not None]
        if known and len(known) == len(self.plan.changes):
            out.append(f"  interactions (the rest): {1 - sum(known):.0%}")
        if self.untrusted:
            out.append(f"{self.untrusted} run(s) untrusted (claimed losses): shown, never evidence")
        return out

    def _words(self, v: Variant) -> str:
        if v.commit is None:
            if v.label.startswith("alone-"):
                return "does not apply on the base alone (it builds on an earlier change)"
            return "does not apply (a later change needs this one)"
        if v.same_as == "base":
            return "the base itself (no gain by definition)"
        sp = self.effective(v)
        return sp.text() if sp else "n/a"

    def to_dict(self) -> dict:
        def one(v: Variant) -> dict:
            sp = self.effective(v)
            return {"label": v.label, "changes": list(v.changes), "commit": v.commit, "applies": v.commit is not None,
                    "same_as": v.same_as, "speedup_text": self._words(v), "speedup": sp.to_dict() if sp else None}
        return {"commit": self.plan.commit, "purpose": self.purpose, "seeds": self.plan.seeds, "runs": self.plan.runs,
                "target_loss": self.target_loss, "plot": self.plot, "untrusted_runs": self.untrusted,
                "changes": [{"number": c.number, "title": c.title, "kind": c.kind, "commit": c.to,
                             "share": self.shares.get(c.number)} for c in self.plan.changes],
                "variants": [one(v) for v in self.plan.variants]}


# -- the changes of a lineage ----------------------------------------------------------------


def changes(db: RunsDB, target: Target, commit: str) -> list[Change]:
    """The candidate's changes from the base, oldest first; a knobs-only commit is split by knob."""
    lineage = list(reversed(db.lineage(commit)))  # base first
    out: list[Change] = []
    for parent, child in zip(lineage, lineage[1:], strict=False):
        title = db.message(child).splitlines()[0]
        split = _knob_steps(db, target, parent, child)
        if len(split) > 1:
            for name, knob in split:
                out.append(Change(len(out) + 1, f"{name} (from: {title})", parent, child, "knob", knob))
        else:
            out.append(Change(len(out) + 1, title, parent, child, "commit"))
    return out


def _knob_steps(db: RunsDB, target: Target, parent: str, child: str) -> list[tuple[str, tuple[str, str, str]]]:
    """For a commit that only set knob values: (knob=value, (file, key, value)) per knob; [] when
    the commit did anything else."""
    changed = _changed_paths(db, parent, child)
    if not target.knobs or not changed:
        return []
    old = db.files(parent, [p for p in changed if p in db.ls(parent)])
    new = db.files(child, changed)
    singles: list[tuple[str, tuple[str, str, str]]] = []
    rebuilt = dict(old)
    for knob in target.knobs:
        if knob.via == "constant" and knob.file in new and knob.file in old:
            key = knob.target_key
            before, after = read_constant(old[knob.file], key), read_constant(new[knob.file], key)
            if after is not None and before != after:
                singles.append((f"{knob.name}={after}", (knob.file, key, after)))
                rebuilt[knob.file] = _set_raw(rebuilt[knob.file], knob.target_key, after)
        elif knob.via != "constant" and KNOBS_FILE in new:
            before_v = json.loads(old.get(KNOBS_FILE, "{}")).get(knob.name)
            after_v = json.loads(new[KNOBS_FILE]).get(knob.name)
            if after_v is not None and before_v != after_v:
                singles.append((f"{knob.name}={after_v}", (KNOBS_FILE, knob.name, json.dumps(after_v))))
                merged = {**json.loads(rebuilt.get(KNOBS_FILE, "{}")), knob.name: after_v}
                rebuilt[KNOBS_FILE] = _dump(merged)
    if len(singles) < 2 or any(rebuilt.get(p) != new[p] for p in changed):
        return []  # not knobs alone (or one knob: the commit is the change)
    return singles


def _changed_paths(db: RunsDB, parent: str, child: str) -> list[str]:
    return record_git.out(db.repo_path, "diff", "--name-only", parent, child).splitlines()


def _set_raw(text: str, name: str, raw: str) -> str:
    span = value_span(text, name)  # NAME, Class.field or call(kw): search_space/locate.py
    return text if span is None else text[: span[0]] + raw + text[span[1]:]


def build(db: RunsDB, changes: list[Change], held: tuple[int, ...], message: str) -> str | None:
    """The base plus the `held` changes, in lineage order: a commit, or None when one does not apply."""
    repo, cur = db.repo_path, db.base_commit
    for n in held:
        c = changes[n - 1]
        if c.knob is None:
            got = record_git.pick(repo, cur, [(c.frm, c.to)], message)
        else:
            path, key, raw = c.knob
            present = path in db.ls(cur)
            text = db.files(cur, [path])[path] if present else ""
            if path == KNOBS_FILE:
                new = _dump({**(json.loads(text) if present else {}), key: json.loads(raw)})
            elif present and value_span(text, key) is not None:
                new = _set_raw(text, key, raw)
            else:
                return None  # the constant is not there without the changes left out
            got = record_git.commit_files(repo, cur, {path: new}, message)
        if got is None:
            return None
        cur = got
    return cur


def _dump(values: dict) -> str:
    return json.dumps(values, sort_keys=True, indent=1) + "\n"


# -- variants, cost, run ---------------------------------------------------------------------


def plan(db: RunsDB, target: Target, commit: str, seeds: int) -> Plan:
    """What the ablation will run, built (the variant commits) but not run."""
    check_seeds(seeds)
    commit = db.resolve(commit)
    if commit == db.base_commit:
        raise UserError(f"--commit {commit[:12]}: that is the base; it has no changes to ablate")
    chs = changes(db, target, commit)
    k = len(chs)
    wanted = [("all", tuple(range(1, k + 1)))]
    wanted += [(f"alone-{c.number}", (c.number,)) for c in chs]
    wanted += [(f"without-{c.number}", tuple(n for n in range(1, k + 1) if n != c.number)) for c in chs]
    repo, base = db.repo_path, db.base_commit
    trees = {record_git.tree_of(repo, base): "base"}
    variants = []
    for label, held in wanted:
        if label == "all":
            v_commit: str | None = commit
        elif not held:
            v_commit = base
        else:
            v_commit = build(db, chs, held, f"ablation {label} of {commit[:12]}\n")
        if v_commit is None:
            variants.append(Variant(label, held, None))
            continue
        tree = record_git.tree_of(repo, v_commit)
        twin = trees.setdefault(tree, label)
        variants.append(Variant(label, held, v_commit, "" if twin == label else twin))
        if v_commit != commit and twin == label:
            record_git.keep(repo, f"{record_git.ABLATE_REFS}{commit[:12]}/{label}", v_commit)
    return Plan(commit, chs, variants, seeds)


def run(db: RunsDB, target: Target, pool: Pool, p: Plan, fidelity: str = "full",
        progress: Progress | None = None) -> Ablation:
    purpose = next_purpose(db, prefix="ablate")
    seeds = judge.fresh_seeds(p.commit, purpose, 0, p.seeds)
    arms = [Arm("base", db.base_commit)] + [Arm(v.label, v.commit) for v in p.arms if v.commit]
    out = run_arms(db, target, pool, arms, seeds, purpose, fidelity, progress)
    base_runs = [r for r, _ in out["base"]]
    target_loss = search_target_loss(db, target, fidelity)
    if target_loss is None:
        target_loss = judge.choose_target_loss([r.final.val_loss for r in base_runs if r.final])
    for v in p.arms:
        paired = pair_up([r for r, _ in out[v.label]], base_runs)
        v.speedup = judge.speedup(target.objective, target_loss, paired.obs(target.objective, target_loss),
                                  budget=budget_words(target, fidelity))
    ab = Ablation(p, purpose, target_loss, untrusted=sum(not r.trusted for runs in out.values() for r, _ in runs))
    full = ab.effective(ab.variant("all"))
    g_all = full.gain if full else math.nan
    for c in p.changes:
        without = ab.variant(f"without-{c.number}")
        if without.commit is None or not math.isfinite(g_all) or g_all == 0:
            ab.shares[c.number] = None
            continue
        sp = ab.effective(without)
        g_without = 0.0 if sp is None else sp.gain
        ab.shares[c.number] = (g_all - g_without) / g_all if math.isfinite(g_without) else None
    ab.plot = _plot(db, ab)
    db.set_state(STATE_PREFIX + p.commit, ab.to_dict())
    return ab


def latest(db: RunsDB, commit: str) -> dict | None:
    """The latest ablation recorded for `commit` (its to_dict), if any."""
    got = db.get_state(STATE_PREFIX + commit, None)
    return got if isinstance(got, dict) else None


def _plot(db: RunsDB, ab: Ablation) -> str | None:
    """Each change's share of the gain (left out) and its gain alone, as a share of the full gain."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    full = ab.effective(ab.variant("all"))
    g_all = full.gain if full else math.nan
    if not math.isfinite(g_all) or g_all == 0:
        return None
    names, carried, alone = [], [], []
    for c in ab.plan.changes:
        names.append(f"{c.number}. {c.title[:40]}")
        share = ab.shares.get(c.number)
        carried.append(share * 100 if share is not None else math.nan)
        sp = ab.effective(ab.variant(f"alone-{c.number}"))
        alone.append(sp.gain / g_all * 100 if sp and math.isfinite(sp.gain) else math.nan)
    fig = Figure(figsize=(8, 1.2 + 0.6 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ys = list(range(len(names)))
    ax.barh([y - 0.2 for y in ys], [0 if math.isnan(x) else x for x in carried], 0.4,
            label="carried: lost when left out", color="tab:red")
    ax.barh([y + 0.2 for y in ys], [0 if math.isnan(x) else x for x in alone], 0.4,
            label="alone on the base", color="tab:blue")
    for y, x in zip(ys, carried, strict=True):
        if math.isnan(x):
            ax.text(0, y - 0.2, " leave-one-out does not apply", va="center", fontsize=8)
    ax.set_yticks(ys, names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(100, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"% of the full gain ({full.text()})"[:110])
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{ab.purpose} of {ab.plan.commit[:10]}: each change's share of the gain", fontsize=10)
    fig.tight_layout()
    rel = Path("ablations") / f"{ab.plan.commit[:12]}-{ab.purpose}.png"
    (db.dir / rel).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(db.dir / rel)
    return rel.as_posix()
