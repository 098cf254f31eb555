"""The LLM proposer: Claude, through the anthropic SDK, answers with a forced `submit_patch` tool call.

One `propose()` is one short conversation with one model (picked by weight from an ensemble): the
prompt from `agent.prompt`, then, while the answer is unusable (no tool call, malformed input, edits
that do not parse, do not apply or break the target's rules), the reason goes back as an error
tool_result and the model tries again, up to `fix_attempts` times.

Failures are values, not exceptions: when the model never produced a usable patch, or the API stayed
unavailable after the SDK's retries (429, 529 and 5xx are retried with exponential backoff, honouring
retry-after), `propose()` returns None and `last_error` says why. Only a configuration the API
refuses outright (bad key, no access, unknown model) raises `LLMConfigError`, since asking again
cannot help.

Thread-safe: the loop calls `propose()` from several threads; each call has its own conversation and
cost, and the running total (`total_cost`) is updated under a lock.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from collections import deque
from typing import Any

import anthropic

from agent import prompt as prompts
from agent.pricing import dollars
from agent.proposal import Attempt, Cost, Outcome, Proposal, ProposalContext
from search_space.edits import Edit, EditError, apply_edits, parse_edits
from search_space.rules import RuleViolation, check_change

# Statuses the API uses for a key, a model or an account it will not serve: retrying cannot help.
_CONFIG_ERRORS = tuple(getattr(anthropic, n) for n in ("AuthenticationError", "PermissionDeniedError",
                                                       "NotFoundError", "PaymentRequiredError")
                       if hasattr(anthropic, n))
MAX_TITLE = 200
OUTCOMES = 8  # own outcomes carried into the next prompt


class LLMConfigError(RuntimeError):
    """No API key, or the API refused the key or the model. Never carries the key itself."""

    fatal = True  # asking again cannot help: the loop retires the proposer


class Unusable(ValueError):
    """An answer that cannot become a Proposal; the message is written for the model."""


def _default_check(ctx: ProposalContext, edits: list[Edit]) -> dict[str, str]:
    """Used when the context brings no `check`: apply to the parent's files and check the rules."""
    changed = apply_edits(ctx.files, edits)
    check_change(ctx.target, {p: (ctx.files.get(p), text) for p, text in changed.items()})
    return changed


def _usage_cost(model: str, usage: Any) -> Cost:
    if usage is None:
        return Cost(calls=1)
    return Cost(
        input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
        output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
        cache_read_tokens=int(getattr(usage, "cache_read_input_tokens", 0) or 0),
        cache_write_tokens=int(getattr(usage, "cache_creation_input_tokens", 0) or 0),
        dollars=dollars(model, usage),
        calls=1,
    )


def _block_param(block: Any) -> dict | None:
    """An SDK content block as a request param, for replaying the assistant's turn."""
    kind = getattr(block, "type", None)
    if kind == "text":
        return {"type": "text", "text": block.text} if block.text else None
    if kind == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    return None  # nothing else is requested (no thinking, no server tools)


def _fields(raw: Any) -> tuple[str, str, str]:
    """title, rationale, edits from the tool input, or Unusable saying what is wrong with it."""
    if not isinstance(raw, dict):
        raise Unusable(f"the {prompts.TOOL_NAME} input must be an object with string fields title, "
                       f"rationale and edits; got {type(raw).__name__}")
    problems = []
    for name in ("title", "rationale", "edits"):
        if name not in raw:
            problems.append(f"'{name}' is missing")
        elif not isinstance(raw[name], str):
            problems.append(f"'{name}' must be a string, got {type(raw[name]).__name__}")
        elif name != "rationale" and not raw[name].strip():
            problems.append(f"'{name}' is empty")
    if problems:
        raise Unusable(f"the {prompts.TOOL_NAME} input is malformed: " + "; ".join(problems))
    return " ".join(raw["title"].split())[:MAX_TITLE], raw["rationale"].strip(), raw["edits"]


class LLMProposer:
    """Patches from Claude. `models` is one model id or a weighted ensemble {model: weight}."""

    name = "llm"

    def __init__(self, models: str | dict[str, float] = "claude-sonnet-4-6", api_key: str | None = None,
                 base_url: str | None = None, max_tokens: int = 8000, fix_attempts: int = 3,
                 max_retries: int = 5, timeout: float = 120, seed: int | None = None,
                 limits: prompts.Limits | None = None):
        weights = {models: 1.0} if isinstance(models, str) else dict(models)
        if not weights or any(not isinstance(m, str) or not m for m in weights):
            raise ValueError(f"models: give a model id or {{model: weight}}, got {models!r}")
        if any(not (w >= 0) for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"models: weights must be >= 0 with a positive sum, got {weights!r}")
        if fix_attempts < 0 or max_tokens <= 0 or max_retries < 0:
            raise ValueError("fix_attempts and max_retries must be >= 0, max_tokens > 0")
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise LLMConfigError("the llm proposer needs an Anthropic API key: set ANTHROPIC_API_KEY "
                                 "(or leave the llm proposer out)")
        # The key lives in the client only: never on self, in a prompt, a log or an error message.
        self._client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=max_retries,
                                           timeout=timeout)
        self.models = {m: float(w) for m, w in weights.items() if w > 0}
        self.max_tokens = max_tokens
        self.fix_attempts = fix_attempts
        self.limits = limits or prompts.Limits()
        self.total_cost = Cost()
        self.cost_by_model: dict[str, Cost] = {}
        self.last_error: str | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.outcomes: deque[Attempt] = deque(maxlen=OUTCOMES)  # what became of its own proposals

    def __repr__(self) -> str:
        return f"LLMProposer(models={self.models!r})"

    def pick_model(self) -> str:
        with self._lock:
            return self._rng.choices(list(self.models), weights=list(self.models.values()))[0]

    def _charge(self, cost: Cost, model: str, usage: Any) -> None:
        one = _usage_cost(model, usage)
        cost.add(one)
        with self._lock:
            self.total_cost.add(one)
            self.cost_by_model.setdefault(model, Cost()).add(one)

    def _fail(self, why: str) -> None:
        with self._lock:
            self.last_error = why

    def with_outcomes(self, ctx: ProposalContext) -> ProposalContext:
        """The context plus what became of this proposer's own recent proposals: the ones that
        failed or lost go with the failures (with their reason), the ones that won with the best."""
        with self._lock:
            mine = list(self.outcomes)
        if not mine:
            return ctx
        shown = {(a.title, a.status) for a in ctx.failures} | {a.title for a in ctx.best}
        lost = [a for a in mine if a.status != "won" and (a.title, a.status) not in shown]
        won = [a for a in mine if a.status == "won" and a.title not in shown]
        return dataclasses.replace(ctx, failures=list(ctx.failures) + lost, best=won + list(ctx.best))

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        model = self.pick_model()
        ctx = self.with_outcomes(ctx)
        built = prompts.build(ctx, self.limits)
        messages: list[Any] = list(built.messages)
        cost = Cost()
        check = ctx.check or (lambda edits: _default_check(ctx, edits))
        tried = {" ".join(t.split()).lower() for t in ctx.tried}
        why = "no answer"
        request: dict[str, Any] = {
            "model": model, "max_tokens": self.max_tokens, "system": built.system, "tools": [prompts.TOOL],
            "tool_choice": {"type": "tool", "name": prompts.TOOL_NAME}}
        for attempt in range(self.fix_attempts + 1):
            try:
                response = self._client.messages.create(**request, messages=messages)
            except _CONFIG_ERRORS as e:
                raise LLMConfigError(f"the Anthropic API refused the request for model {model}: "
                                     f"{type(e).__name__} ({getattr(e, 'status_code', '?')}): {e.message}") from None
            except anthropic.APIError as e:  # 429/529/5xx after the SDK's retries, timeouts, bad requests
                status = getattr(e, "status_code", None)
                self._fail(f"API error with {model} on attempt {attempt + 1}: {type(e).__name__}"
                           + (f" ({status})" if status else "") + f": {getattr(e, 'message', e)}")
                return None
            self._charge(cost, model, getattr(response, "usage", None))

            blocks = [b for b in (_block_param(b) for b in response.content) if b]
            call = next((b for b in blocks if b["type"] == "tool_use" and b["name"] == prompts.TOOL_NAME), None)
            cut = (" Your answer was cut off at the output token limit: make the edits shorter."
                   if response.stop_reason == "max_tokens" else "")
            try:
                if call is None:
                    raise Unusable(f"you answered without calling the {prompts.TOOL_NAME} tool")
                title, rationale, text = _fields(call["input"])
                if title.lower() in tried:
                    raise Unusable(f"the title {title!r} was already tried; propose a different idea "
                                   "(or, if it really differs, a title that says how)")
                edits = parse_edits(text)
                check(edits)
            except (Unusable, EditError, RuleViolation) as e:
                why = f"{type(e).__name__}: {e}"
                feedback = (f"Your patch was refused: {str(e).rstrip('.')}.{cut}\nFix it and call "
                            f"{prompts.TOOL_NAME} again with the complete corrected patch (all blocks, "
                            "not only the failing one); SEARCH text must be copied exactly from the parent code.")
                self._continue(messages, blocks, call, feedback)
                continue
            return Proposal(title=title, rationale=rationale, proposer=self.name, parent=ctx.parent,
                            edits=tuple(edits), model=model, cost=cost)
        self._fail(f"no usable patch from {model} after {self.fix_attempts + 1} answers; last: {why}")
        return None

    @staticmethod
    def _continue(messages: list[dict], blocks: list[dict], call: dict | None, feedback: str) -> None:
        """Append the assistant's turn and the feedback to the conversation.

        Every tool_use must be answered by a tool_result in the next user turn; the one we judged
        carries the reason (is_error), any other gets a short refusal.
        """
        if blocks:
            messages.append({"role": "assistant", "content": blocks})
        results = []
        for b in blocks:
            if b["type"] == "tool_use":
                text = feedback if b is call else f"Only one {prompts.TOOL_NAME} call per answer is used."
                results.append({"type": "tool_result", "tool_use_id": b["id"], "is_error": True,
                                "content": [{"type": "text", "text": text}]})
        if call is None:
            results.append({"type": "text", "text": feedback})
        if messages[-1]["role"] == "user":  # no assistant turn to reply to: extend the user's turn
            messages[-1] = {"role": "user", "content": list(messages[-1]["content"]) + results}
        else:
            messages.append({"role": "user", "content": results})

    def tell(self, proposal: Proposal, outcome: Outcome) -> None:
        """Every outcome of its proposals reaches its next prompt (`with_outcomes`): at a rung
        as it is measured, and the final word; each replaces the proposal's previous one."""
        if outcome.final and outcome.won:
            status = "won"
        elif outcome.status != "ok":
            status = outcome.status
        else:
            status = f"ok at {outcome.rung}, {outcome.verdict or 'not faster'}" if outcome.final else \
                f"ok at {outcome.rung}"
        attempt = Attempt(proposal.title, self.name, "", status, outcome.value,
                          (1 / outcome.score) if outcome.score else None, outcome.line(proposal.title))
        with self._lock:
            for old in [a for a in self.outcomes if a.title == proposal.title]:
                self.outcomes.remove(old)
            self.outcomes.append(attempt)
