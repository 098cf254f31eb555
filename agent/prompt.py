"""The LLM proposer's prompt, built from a ProposalContext.

Two parts, in the order the API caches them: a stable prefix (the task, the target's rules, the edit
format and the parent's editable code) sent as system blocks marked for prompt caching, so that every
proposal for the same parent pays for it once; then the variable part (the baseline, the best
candidates, recent failures, titles already tried, reviewers' notes) as the user message. Every list is
capped and every long text truncated, so the prompt stays bounded however long the search runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.proposal import Attempt, ProposalContext
from search_space.edits import DIVIDER, REPLACE, SEARCH
from search_space.rules import BLOCK_END, BLOCK_START

TOOL_NAME = "submit_patch"
CACHE = {"type": "ephemeral"}


@dataclass(frozen=True)
class Limits:
    """How much history the variable part may carry."""

    best: int = 5
    best_diff_chars: int = 4000
    failures: int = 8
    failure_diff_chars: int = 1200
    failure_tail_chars: int = 1200
    tried: int = 80
    title_chars: int = 120
    notes: int = 10
    note_chars: int = 1500
    file_chars: int = 300_000  # per editable file; longer files are cut (and cannot be edited past the cut)


OBJECTIVES = {
    "time_to_target": "reaches the target validation loss in less wall-clock training time",
    "steps_to_target": "reaches the target validation loss in fewer training steps",
    "loss_at_budget": "reaches a lower validation loss within the same training budget",
}

TOOL = {
    "name": TOOL_NAME,
    "description": (
        "Submit one patch to the training script: a short title, the rationale, and the edits as "
        "SEARCH/REPLACE blocks. Every block must apply exactly once to the current files."
    ),
    "input_schema": {
        "type": "object",
        "properties": {
            "title": {
                "type": "string",
                "description": "A short, specific name for the idea (under 80 characters), different "
                               "from every title already tried.",
            },
            "rationale": {
                "type": "string",
                "description": "Why this should make the run reach its target faster, and what could go wrong.",
            },
            "edits": {
                "type": "string",
                "description": "One or more SEARCH/REPLACE blocks, each preceded by a line with the file path.",
            },
        },
        "required": ["title", "rationale", "edits"],
    },
}

EDIT_FORMAT = f"""\
Edits are SEARCH/REPLACE blocks. The line before each block is the file's path, as shown in the
<file path="..."> tags:

train.py
{SEARCH}
    x = self.attn(x)
    x = self.mlp(x)
{DIVIDER}
    x = x + self.attn(x)
    x = x + self.mlp(x)
{REPLACE}

- The SEARCH text must match the current file exactly, whitespace and indentation included, and
  exactly once: quote enough surrounding lines to make it unique. Do not abbreviate with "...".
- Use as many blocks as needed; they apply in order, so a later block for the same file sees the
  earlier blocks' result.
- To add code, quote a nearby line in SEARCH and repeat it in REPLACE together with the new lines.
- An edit that does not apply is refused with the reason; you will then be asked to fix it."""


def truncate(text: str, limit: int, *, keep: str = "head") -> str:
    """`text` cut to about `limit` characters, saying how much was left out."""
    text = text.strip("\n")
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    if keep == "tail":
        return f"[... {cut} characters cut ...]\n" + text[-limit:]
    return text[:limit] + f"\n[... {cut} characters cut ...]"


def _objective(ctx: ProposalContext) -> str:
    t = ctx.target
    goal = OBJECTIVES.get(t.objective, "performs better on the objective " + t.objective)
    if isinstance(t.target_loss, str):
        loss = "the baseline's own mean final validation loss"
    else:
        loss = f"a mean final validation loss of {t.target_loss:g}"
    return f"Change the trainer so that it {goal}. The target is {loss}, checked over several seeds."


def rules_text(ctx: ProposalContext) -> str:
    t = ctx.target
    rules = [f"Only these paths may be edited: {', '.join(t.editable)}."]
    if t.frozen:
        rules.append(f"These paths are frozen and must not be edited: {', '.join(t.frozen)}.")
    if t.markers:
        rules.append(f"In files with {BLOCK_START} / {BLOCK_END} markers, change only the lines between "
                     "them, and keep the markers themselves.")
    rules += [
        "Never change validation (its data, frequency, length or how the loss is computed), timing, "
        "logging or the log format, or data loading: they are how a run is judged.",
        "No untimed work: do not move computation outside the timed region, precompute before the timer "
        "starts, cache results between runs, or read validation data for training.",
        "No network access, downloads, new dependencies or files outside the repository.",
        "The result must hold for every seed: no seed-specific tuning, no skipped steps that only "
        "pay off by luck.",
        "One idea per patch, so its effect can be measured; keep the code correct and runnable.",
    ]
    return "\n".join(f"- {r}" for r in rules)


def track_rules_text(ctx: ProposalContext) -> str:
    """The track's evaluation rules (the target's `[rules]`), which the trusted evaluator enforces."""
    rules = getattr(ctx.target, "rules", None)
    if rules is None:
        return ""
    return (f"<track_rules>\nThe track's evaluation rules; a run that breaks one is refused, whatever its "
            f"loss.\n{rules.text()}\n</track_rules>\n\n")


def files_text(ctx: ProposalContext, limits: Limits = Limits()) -> str:
    parts = []
    for path in sorted(ctx.files):
        body = truncate(ctx.files[path], limits.file_chars)
        parts.append(f'<file path="{path}">\n{body}\n</file>')
    return "\n\n".join(parts) if parts else "(no editable files were given)"


def system_blocks(ctx: ProposalContext, limits: Limits = Limits()) -> list[dict]:
    """The stable prefix: the same for every proposal on the same parent, so it is prompt-cached.

    Two cache breakpoints: after the task (shared by every parent of the target) and after the code.
    """
    t = ctx.target
    intro = (
        "You are an expert in fast neural-network training, taking part in an automated search for "
        "faster training runs (in the spirit of the NanoGPT speedrun). Each patch you propose is applied "
        "to the parent version of the trainer below, run on GPUs with several seeds, and measured "
        "against the baseline on the same machine.\n\n"
        f"<task>\n{_objective(ctx)}"
        + (f"\nAbout this trainer: {t.description.strip()}" if t.description.strip() else "")
        + f"\n</task>\n\n<rules>\n{rules_text(ctx)}\n</rules>\n\n"
        + track_rules_text(ctx)
        + f"<edit_format>\n{EDIT_FORMAT}\n</edit_format>\n\n"
        f"Answer only by calling the {TOOL_NAME} tool."
    )
    code = f"The parent's editable code (commit {ctx.parent}):\n\n<code>\n{files_text(ctx, limits)}\n</code>"
    return [
        {"type": "text", "text": intro, "cache_control": dict(CACHE)},
        {"type": "text", "text": code, "cache_control": dict(CACHE)},
    ]


def _numbers(a: Attempt) -> str:
    bits = [f"status {a.status}"]
    if a.value is not None:
        bits.append(f"objective {a.value:.6g}")
    if a.speedup is not None:
        bits.append(f"speed-up {a.speedup:.3f}x")
    return ", ".join(bits)


def _title(title: str, limits: Limits) -> str:
    title = " ".join(title.split())
    return title if len(title) <= limits.title_chars else title[: limits.title_chars] + "..."


def history_text(ctx: ProposalContext, limits: Limits = Limits()) -> str:
    """The variable part: what happened so far in this search."""
    out = []
    if ctx.baseline:
        out.append(f"<baseline>\n{truncate(ctx.baseline, 500)}\n</baseline>")
    if ctx.best:
        items = []
        for i, a in enumerate(ctx.best[: limits.best], 1):
            items.append(f'<candidate rank="{i}" proposer="{a.proposer}">\n'
                         f"title: {_title(a.title, limits)}\n{_numbers(a)}\n"
                         f"<diff>\n{truncate(a.diff, limits.best_diff_chars)}\n</diff>\n</candidate>")
        out.append("<best_candidates>\nThe best candidates so far (speed-up > 1 beats the baseline):\n"
                   + "\n".join(items) + "\n</best_candidates>")
    if ctx.failures:
        items = []
        for a in ctx.failures[-limits.failures:]:
            text = f'<failure proposer="{a.proposer}">\ntitle: {_title(a.title, limits)}\n{_numbers(a)}\n'
            if a.diff:
                text += f"<diff>\n{truncate(a.diff, limits.failure_diff_chars)}\n</diff>\n"
            if a.reason:
                text += f"<error>\n{truncate(a.reason, limits.failure_tail_chars, keep='tail')}\n</error>\n"
            items.append(text + "</failure>")
        out.append("<recent_failures>\nRecent candidates that failed or were slower; avoid their mistakes:\n"
                   + "\n".join(items) + "\n</recent_failures>")
    if ctx.tried:
        seen: dict[str, None] = {}
        for t in reversed(ctx.tried):  # the most recent first, without repeats
            seen.setdefault(_title(t, limits), None)
        titles = list(seen)[: limits.tried]
        more = len(seen) - len(titles)
        out.append("<already_tried>\nIdeas already tried (do not repeat them; build on them only with a "
                   "clearly different change):\n" + "\n".join(f"- {t}" for t in titles)
                   + (f"\n- ... and {more} older ones" if more else "") + "\n</already_tried>")
    if ctx.notes:
        notes = [truncate(n, limits.note_chars) for n in ctx.notes[-limits.notes:]]
        out.append("<reviewer_notes>\nNotes from the people reviewing this search; follow them:\n"
                   + "\n".join(f"- {n}" for n in notes) + "\n</reviewer_notes>")
    return "\n\n".join(out)


def user_text(ctx: ProposalContext, limits: Limits = Limits()) -> str:
    history = history_text(ctx, limits)
    ask = ("Propose one new change to the parent code that should make the run reach its target faster. "
           "Think about where the time goes, pick the idea you expect to pay most that has not been tried, "
           f"and submit it with the {TOOL_NAME} tool.")
    return (history + "\n\n" + ask) if history else ("This is the first proposal of the search.\n\n" + ask)


@dataclass(frozen=True)
class Prompt:
    system: list[dict]
    messages: list[dict]


def build(ctx: ProposalContext, limits: Limits = Limits()) -> Prompt:
    """The system blocks and the first user message for one proposal."""
    return Prompt(system_blocks(ctx, limits),
                  [{"role": "user", "content": [{"type": "text", "text": user_text(ctx, limits)}]}])
