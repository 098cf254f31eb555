"""The LLM proposer against a scripted Messages API server, through the real anthropic SDK."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from agent import pricing
from agent.proposal import Attempt, ProposalContext
from agent.proposers.llm import LLMConfigError, LLMProposer
from search_space.edits import Edit, apply_edits
from search_space.rules import check_change
from search_space.target import parse_target
from tests.fake_anthropic import FakeAnthropic, Reply

KEY = "sk-ant-test-0123456789"
TRAIN = """\
import math

LR = 0.001
BATCH = 8


def model(x):
    return x * 2


def train(steps):
    loss = math.inf
    for step in range(steps):
        loss = model(step) * LR
    return loss
"""
DATA = "def load():\n    return list(range(10))\n"


def patch(search: str = "LR = 0.001", replace: str = "LR = 0.002", path: str = "train.py") -> str:
    return f"{path}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


def answer(title: str = "Double the learning rate", edits: str | None = None) -> dict:
    return {"title": title, "rationale": "A higher LR converges faster here.", "edits": edits or patch()}


@pytest.fixture
def target(tmp_path: Path):
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "data.py").write_text(DATA)
    raw = {
        "name": "tiny",
        "description": "A toy trainer for tests.",
        "run": {"command": "python train.py --seed {seed} --steps {steps}"},
        "files": {"editable": ["*.py"], "frozen": ["data.py"]},
        "fidelities": {"full": {"steps": 10}},
    }
    return parse_target(raw, tmp_path)


@pytest.fixture
def ctx(target):
    files = {"train.py": TRAIN, "data.py": DATA}
    accepted: list[list[Edit]] = []

    def check(edits: list[Edit]) -> dict[str, str]:
        changed = apply_edits(files, edits)
        check_change(target, {p: (files.get(p), t) for p, t in changed.items()})
        accepted.append(edits)
        return changed

    c = ProposalContext(target=target, parent="abc1234", files=files, check=check)
    c.accepted = accepted  # type: ignore[attr-defined]  # for the tests' eyes only
    return c


@pytest.fixture
def api():
    with FakeAnthropic() as server:
        yield server


def proposer(api: FakeAnthropic, **kw) -> LLMProposer:
    kw.setdefault("max_retries", 0)
    return LLMProposer(kw.pop("models", "claude-sonnet-4-6"), api_key=KEY, base_url=api.base_url, **kw)


def last_user_text(body: dict) -> str:
    """Everything in the last user turn, tool_result contents included, as one string."""
    return json.dumps(body["messages"][-1]["content"])


# -- the happy path ----------------------------------------------------------------------------------


def test_good_patch_becomes_a_proposal(api, ctx):
    usage = {"input_tokens": 1000, "output_tokens": 500, "cache_creation_input_tokens": 3000,
             "cache_read_input_tokens": 7000}
    api.tool_use(answer(), usage=usage)
    llm = proposer(api)
    p = llm.propose(ctx)

    assert p is not None
    assert (p.title, p.proposer, p.parent, p.model) == ("Double the learning rate", "llm", "abc1234",
                                                        "claude-sonnet-4-6")
    assert p.rationale.startswith("A higher LR")
    assert p.edits == (Edit("train.py", "LR = 0.001", "LR = 0.002"),)
    assert ctx.accepted == [list(p.edits)]
    c = p.cost
    assert (c.input_tokens, c.output_tokens, c.cache_write_tokens, c.cache_read_tokens, c.calls) == (
        1000, 500, 3000, 7000, 1)
    # sonnet: $3 in, $15 out, $3.75 cache write, $0.30 cache read per Mtok
    assert c.dollars == pytest.approx((1000 * 3 + 500 * 15 + 3000 * 3.75 + 7000 * 0.3) / 1e6)
    assert llm.total_cost == c and llm.cost_by_model["claude-sonnet-4-6"] == c
    assert llm.last_error is None

    (req,) = api.requests
    body = req.body
    assert req.path == "/v1/messages"
    assert body["model"] == "claude-sonnet-4-6" and body["max_tokens"] == 8000
    assert body["tool_choice"] == {"type": "tool", "name": "submit_patch"}
    (tool,) = body["tools"]
    assert tool["name"] == "submit_patch"
    assert set(tool["input_schema"]["required"]) == {"title", "rationale", "edits"}
    assert all(tool["input_schema"]["properties"][f]["type"] == "string" for f in ("title", "rationale", "edits"))
    # the key travels in its header only
    assert req.api_key == KEY
    assert KEY not in json.dumps(body) and KEY not in repr(llm) and KEY not in json.dumps(vars(llm), default=str)


def test_prompt_holds_code_rules_and_history_with_a_cached_prefix(api, ctx):
    ctx.baseline = "baseline: val_loss 3.2800 in 812.5 s (5 seeds)"
    ctx.best = [Attempt("Muon optimizer for hidden matrices", "llm", "--- a/train.py\n+++ b/train.py\n"
                        "-LR = 0.001\n+LR = 0.02  # muon", "ok", value=700.0, speedup=1.161)]
    tail = "Traceback (most recent call last):\n" + "  frame\n" * 2000 + "RuntimeError: CUDA out of memory"
    ctx.failures = [Attempt("Batch 4096", "ideas", "-BATCH = 8\n+BATCH = 4096", "crashed", reason=tail)]
    ctx.tried = ["Muon optimizer for hidden matrices", "Batch 4096", "Rotary embeddings"]
    ctx.notes = ["Keep the warmup; the last run diverged without it."]
    api.tool_use(answer())
    assert proposer(api).propose(ctx) is not None

    body = api.requests[0].body
    system = body["system"]
    assert isinstance(system, list) and system
    assert all(b["cache_control"] == {"type": "ephemeral"} for b in system)
    prefix = "\n".join(b["text"] for b in system)
    assert "LR = 0.001" in prefix and 'path="train.py"' in prefix  # the parent's code
    assert "frozen" in prefix and "data.py" in prefix and "<<<<<<< SEARCH" in prefix
    assert "validation" in prefix and "untimed" in prefix.lower()

    (user,) = body["messages"]
    text = user["content"][0]["text"]
    assert "val_loss 3.2800" in text
    assert "Muon optimizer for hidden matrices" in text and "+LR = 0.02  # muon" in text and "1.161x" in text
    assert "RuntimeError: CUDA out of memory" in text and "Batch 4096" in text
    assert "Rotary embeddings" in text
    assert "Keep the warmup" in text
    assert len(text) < 8000  # the 2000-frame traceback was cut, keeping its end
    assert "characters cut" in text
    # nothing variable leaks into the cached prefix
    assert "Rotary embeddings" not in prefix and "CUDA out of memory" not in prefix


# -- answers that go back to the model ----------------------------------------------------------------


@pytest.mark.parametrize("bad, reason", [
    ("Change LR to 0.002 please.", "no SEARCH/REPLACE blocks found"),
    (patch(search="LR = 0.01"), "SEARCH text not found in train.py"),
    (patch(search="return list(range(10))", replace="return list(range(5))", path="data.py"),
     "data.py is frozen"),
    (patch(path="missing.py"), "file missing.py does not exist"),
])
def test_refused_edits_go_back_with_the_reason(api, ctx, bad, reason):
    api.tool_use(answer(edits=bad)).tool_use(answer())
    llm = proposer(api)
    p = llm.propose(ctx)

    assert p is not None and p.edits == (Edit("train.py", "LR = 0.001", "LR = 0.002"),)
    assert len(api.requests) == 2 and p.cost.calls == 2 and llm.total_cost.calls == 2
    first, second = (r.body for r in api.requests)
    assert second["system"] == first["system"]  # the cached prefix is untouched
    assert second["messages"][0] == first["messages"][0]
    assistant, user = second["messages"][1:]
    (call,) = [b for b in assistant["content"] if b["type"] == "tool_use"]
    assert assistant["role"] == "assistant" and call["input"]["edits"] == bad
    (result,) = user["content"]
    assert result["type"] == "tool_result" and result["tool_use_id"] == call["id"] and result["is_error"] is True
    assert reason in json.dumps(result["content"])


@pytest.mark.parametrize("bad, reason", [
    ({"title": "x", "rationale": "y"}, "'edits' is missing"),
    ({"title": 3, "rationale": "y", "edits": ["a"]}, "'title' must be a string"),
    ({"title": "  ", "rationale": "y", "edits": patch()}, "'title' is empty"),
    ("not an object", "must be an object"),
])
def test_malformed_tool_input_goes_back(api, ctx, bad, reason):
    api.tool_use(bad).tool_use(answer())
    assert proposer(api).propose(ctx) is not None
    assert reason in last_user_text(api.requests[1].body)


def test_answer_without_the_tool_is_asked_again(api, ctx):
    api.text("I think you should raise the learning rate.").tool_use(answer())
    assert proposer(api).propose(ctx) is not None
    messages = api.requests[1].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert "without calling the submit_patch tool" in last_user_text(api.requests[1].body)


def test_repeated_title_is_refused(api, ctx):
    ctx.tried = ["Double the learning rate"]
    api.tool_use(answer()).tool_use(answer(title="Double the LR only for the embeddings"))
    p = proposer(api).propose(ctx)
    assert p is not None and p.title == "Double the LR only for the embeddings"
    assert "already tried" in last_user_text(api.requests[1].body)


def test_gives_up_after_fix_attempts(api, ctx):
    for _ in range(3):
        api.tool_use(answer(edits=patch(search="nope")))
    llm = proposer(api, fix_attempts=2)
    assert llm.propose(ctx) is None
    assert len(api.requests) == 3 and llm.total_cost.calls == 3
    assert "SEARCH text not found" in llm.last_error and "after 3 answers" in llm.last_error
    # the conversation grew by one exchange per refusal
    assert [len(r.body["messages"]) for r in api.requests] == [1, 3, 5]


def test_without_a_check_the_target_rules_apply(api, ctx):
    ctx.check = None
    api.tool_use(answer(edits=patch("def load():", "def load(n=10):", path="data.py"))).tool_use(answer())
    p = proposer(api).propose(ctx)
    assert p is not None and p.edits[0].path == "train.py"
    assert "data.py is frozen" in last_user_text(api.requests[1].body)


# -- the API misbehaving ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["rate_limit", "overloaded", "server_error"])
def test_transient_errors_are_retried_by_the_sdk(api, ctx, script):
    getattr(api, script)()
    api.tool_use(answer())
    start = time.monotonic()
    llm = proposer(api, max_retries=3)
    p = llm.propose(ctx)
    assert p is not None and len(api.requests) == 2
    assert p.cost.calls == 1  # refused requests are not billed
    assert api.requests[1].headers.get("x-stainless-retry-count") == "1"
    assert time.monotonic() - start < 5  # retry-after-ms was honoured, not the default backoff


def test_persistent_overload_is_a_clean_none(api, ctx):
    for _ in range(3):
        api.overloaded()
    llm = proposer(api, max_retries=2)
    assert llm.propose(ctx) is None  # documented: API failures return None, they never raise
    assert len(api.requests) == 3 and api.pending() == 0
    assert "529" in llm.last_error and "Overloaded" in llm.last_error
    assert llm.total_cost.calls == 0


def test_refused_key_raises_a_clear_error_without_the_key(api, ctx):
    api.error(401, "authentication_error", "invalid x-api-key")
    with pytest.raises(LLMConfigError, match="AuthenticationError") as info:
        proposer(api).propose(ctx)
    assert KEY not in str(info.value)


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(LLMConfigError, match="ANTHROPIC_API_KEY"):
        LLMProposer()


def test_key_from_the_environment(api, ctx, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-env")
    api.tool_use(answer())
    assert LLMProposer(base_url=api.base_url, max_retries=0).propose(ctx) is not None
    assert api.requests[0].api_key == "sk-ant-from-env"


# -- ensembles and threads ----------------------------------------------------------------------------


def test_weighted_ensemble(target, ctx):
    def good(req):
        return Reply(200, {"id": "msg_1", "type": "message", "role": "assistant", "model": req.body["model"],
                           "content": [{"type": "tool_use", "id": "toolu_1", "name": "submit_patch",
                                        "input": answer()}],
                           "stop_reason": "tool_use", "stop_sequence": None,
                           "usage": {"input_tokens": 10, "output_tokens": 10}})

    with FakeAnthropic(responder=good) as api:
        models = {"claude-haiku-4-5": 3.0, "claude-opus-4-5": 1.0, "claude-sonnet-4-6": 0.0}
        llm = proposer(api, models=models, seed=7)
        got = [llm.propose(ctx).model for _ in range(40)]
    assert [r.body["model"] for r in api.requests] == got
    assert "claude-sonnet-4-6" not in got
    assert got.count("claude-haiku-4-5") > got.count("claude-opus-4-5") > 0
    assert set(llm.cost_by_model) == {"claude-haiku-4-5", "claude-opus-4-5"}
    assert llm.total_cost.calls == 40


def test_concurrent_proposals_all_get_their_answers(api, ctx):
    titles = [f"Idea {i}" for i in range(4)]
    for t in titles:
        api.tool_use(answer(title=t), delay=0.3)
    llm = proposer(api)
    results: list = [None] * 4

    def run(i: int) -> None:
        results[i] = llm.propose(ctx)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(p is not None for p in results)
    assert sorted(p.title for p in results) == titles
    assert api.max_in_flight > 1  # the calls overlapped: no lock around the API call
    assert llm.total_cost.calls == 4 and llm.total_cost.input_tokens == 4 * 1200


# -- pricing ------------------------------------------------------------------------------------------


def test_pricing_prefixes_and_default():
    assert pricing.price("claude-opus-4-5-20251101").input == 5.0
    assert pricing.price("claude-opus-4-1-20250805").input == 15.0
    assert pricing.price("claude-sonnet-4-6").output == 15.0
    assert pricing.price("us.anthropic.claude-haiku-4-5-20251001-v1:0").input == 1.0
    assert pricing.price("claude-3-5-haiku@20241022").input == 0.8
    assert pricing.price("some-future-model") == pricing.DEFAULT
    assert pricing.DEFAULT.input >= max(p.input for p in pricing.PRICES.values())
    usage = {"input_tokens": 1_000_000, "output_tokens": 0, "cache_creation_input_tokens": 1_000_000,
             "cache_read_input_tokens": 1_000_000,
             "cache_creation": {"ephemeral_1h_input_tokens": 400_000, "ephemeral_5m_input_tokens": 600_000}}
    assert pricing.dollars("claude-sonnet-4", usage) == pytest.approx(3 + 0.6 * 3.75 + 0.4 * 6 + 0.3)


def test_cut_off_answer_is_told_to_be_shorter(api, ctx):
    api.tool_use({"title": "Big refactor", "rationale": "r"}, stop_reason="max_tokens").tool_use(answer())
    assert proposer(api).propose(ctx) is not None
    text = last_user_text(api.requests[1].body)
    assert "'edits' is missing" in text and "cut off at the output token limit" in text


# -- what became of its proposals ------------------------------------------------------------------


def test_a_candidate_failing_smoke_reaches_the_next_prompt(api, ctx):
    from agent.proposal import Outcome

    api.tool_use(answer(title="Crash on purpose")).tool_use(answer(title="Something else"))
    llm = proposer(api)
    first = llm.propose(ctx)
    # the loop's one signature: every proposer is told (proposal, Outcome); this used to raise TypeError
    llm.tell(first, Outcome(rung="smoke", status="failed", final=True, verdict="stopped",
                            reason="RuntimeError: boom: the trainer raised"))
    assert llm.propose(ctx).title == "Something else"
    text = json.dumps(api.requests[1].body["messages"][0])
    assert "Crash on purpose" in text and "boom: the trainer raised" in text and "recent_failures" in text
    assert "boom" not in json.dumps(api.requests[0].body)


def test_every_rung_and_the_win_reach_the_next_prompt(api, ctx):
    from agent.proposal import Outcome

    api.tool_use(answer(title="Faster decay")).tool_use(answer(title="Next"))
    llm = proposer(api)
    p = llm.propose(ctx)
    llm.tell(p, Outcome(rung="short", status="ok", value=80.0, score=0.8, speedup="time to loss 2: 1.25x"))
    llm.tell(p, Outcome(rung="full", status="ok", value=70.0, score=0.7, won=True, final=True, verdict="pass",
                        speedup="time to loss 2: 1.43x [1.3, 1.6] vs base, 4 pairs"))
    llm.propose(ctx)
    text = json.dumps(api.requests[1].body["messages"][0])
    best = text[text.index("<best_candidates>"):text.index("</best_candidates>")]
    assert "Faster decay" in best and "status won" in best and "speed-up 1.429x" in best  # the final word
    assert "recent_failures" not in text  # the rung's interim word was replaced, not kept beside it
