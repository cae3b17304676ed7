"""How an LLM proposer fails, and checks before it hands in: fatal API errors, the pre-flight request, refusals and
empty replies, replies cut at max_tokens, two edits in one reply, no-op and policy-breaking edits, thinking
settings, rebasing a stale edit, and the show_experiment / profile tools. Through the real SDKs against the fake
servers of tests/fakellm.py, each case for both wire formats. The loop's side (stopping, back-off, just-in-time
asks, re-checks before a run) is in tests/test_loop.py.
"""
import pytest
from tests import test_propose_llm
from tests.fakellm import Call, FakeLLM, Step, call, error, refuse, reply
from tests.test_propose_llm import (EDIT, EDIT_B, GOOD_REPLY, KEY, PROVIDERS, Smoke, make_context, make_proposer, sent,
                                    submit, tool_results)

from agent.edit.parse import parse_edit
from agent.propose import make_proposer as make_cli_proposer
from agent.propose.anthropic_proposer import ADAPTIVE_MODELS
from agent.propose.answers import edits_in_reply
from agent.propose.base import Proposal
from agent.propose.chat_api import ProposalFailed, ProposerFatal

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
# test_propose_llm's fixtures: the keys and endpoints in the environment, the SDKs' sleeps recorded, the incumbent
env, sdk_clock, root = test_propose_llm.env, test_propose_llm.sdk_clock, test_propose_llm.root
SECOND = "HYPOTHESIS: Larger batch\nRATIONALE: fewer steps.\n\n" + EDIT_B
TIMER = ("nanomodel/train.py\n<<<<<<< SEARCH\nLR = 3e-4\n=======\nLR = 3e-4\nimport time\n"
         "time.perf_counter = lambda: 0.0\n>>>>>>> REPLACE\n")
NOOP = "nanomodel/train.py\n<<<<<<< SEARCH\nLR = 3e-4\n=======\nLR = 3e-4\n>>>>>>> REPLACE\n"
KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


def long_run(root, seconds=3600.0):
    """A context whose incumbent takes `seconds` a run."""
    context = make_context(root)
    context.incumbent = {**context.incumbent, "seconds": seconds}
    return context


# ---------------------------------------------------------------------------------------------------
# errors no later request gets past

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("status", [401, 403, 404])
def test_refused_key_and_unknown_model_are_fatal_at_once(provider, status, root):
    with FakeLLM([error(status, message=f"no: {KEY}")]) as server:
        proposer, sleeps = make_proposer(provider, server, **({"model": "claude-nope-9"} if status == 404 else {}))
        with pytest.raises(ProposerFatal) as fatal:
            proposer.propose(make_context(root))
    message = str(fatal.value)
    assert len(server.requests) == 1 and sleeps == [] and KEY not in message
    if status == 404:
        assert "model 'claude-nope-9' not found" in message and "--model" in message
    else:
        assert f"the key in {KEY_ENV[provider]} was refused (API error {status}" in message


@pytest.mark.parametrize("provider", PROVIDERS)
def test_preflight_is_one_tiny_request(provider, root):
    with FakeLLM([reply("ok")], answer_probes=False) as server:
        proposer, _ = make_proposer(provider, server)
        proposer.preflight()
    [probe] = server.requests
    assert probe.body.get("max_tokens", probe.body.get("max_completion_tokens")) == 1
    assert "tools" not in probe.body and "thinking" not in probe.body and "reasoning_effort" not in probe.body


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("answer, raised", [(error(401), ProposerFatal), (error(500), ProposalFailed)])
def test_preflight_stops_only_on_what_is_fatal(provider, answer, raised, root):
    """A refused key stops the night; a server error (after the SDK's retries) may pass by the first proposal."""
    with FakeLLM([answer], answer_probes=False) as server:
        proposer, _ = make_proposer(provider, server, max_attempts=1)
        with pytest.raises(raised):
            proposer.preflight()


def test_missing_key_is_fatal_before_any_request(root, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ProposerFatal, match="^OPENAI_API_KEY is not set.*--api-key-env"):
        make_cli_proposer("openai").preflight()


# ---------------------------------------------------------------------------------------------------
# replies that say nothing, or too much

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tools", [True, False])
@pytest.mark.parametrize("first, second, said", [
    (refuse(), refuse(), "a refusal then a refusal"),
    (reply(""), refuse(), "an empty reply then a refusal"),
    (reply(""), reply(""), "an empty reply then an empty reply")])
def test_two_refusals_or_empty_replies_in_a_row_end_the_proposal(provider, tools, first, second, said, root):
    with FakeLLM([first, second, submit()]) as server:
        proposer, _ = make_proposer(provider, server, tools=tools)
        p = proposer.propose(make_context(root))
    assert p.text == "" and p.error == f"no edit: {said}, in a row"
    assert len(server.requests) == 2 and p.usage.calls == 2


@pytest.mark.parametrize("provider", PROVIDERS)
def test_one_refusal_is_asked_again(provider, root):
    with FakeLLM([refuse(), submit()]) as server:
        proposer, _ = make_proposer(provider, server)
        p = proposer.propose(make_context(root))
    assert p.error == "" and "LR = 6e-4" in p.text and len(server.requests) == 2


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_reply_cut_at_max_tokens_is_named(provider, root):
    """A reply that stopped at the output limit with half an edit: the model is told it was cut, and at what."""
    half = GOOD_REPLY[:GOOD_REPLY.index("=======")]
    with FakeLLM([reply(half, truncated=True), submit()]) as server:
        proposer, _ = make_proposer(provider, server, max_output_tokens=900)
        p = proposer.propose(make_context(root))
    assert p.error == "" and "LR = 6e-4" in p.text
    assert "cut off at the output limit (max_output_tokens=900 tokens)" in sent(server.requests[1])
    assert "cut off" not in sent(server.requests[0])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_cut_tool_call_is_named_too(provider, root):
    cut_call = Step(calls=[Call("submit_edit", {"hypothesis": "x", "rationale": "y"})], truncated=True)
    with FakeLLM([cut_call, submit()]) as server:
        proposer, _ = make_proposer(provider, server, max_output_tokens=900)
        p = proposer.propose(make_context(root))
    assert p.error == ""
    [answer] = tool_results(provider, server.requests[1])
    assert "missing argument(s) edit" in answer and "max_output_tokens=900" in sent(server.requests[1])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_last_reply_cut_says_so_in_the_failure(provider, root):
    half = GOOD_REPLY[:GOOD_REPLY.index("=======")]
    with FakeLLM([reply(half, truncated=True)] * 2) as server:
        proposer, _ = make_proposer(provider, server, tools=False, max_output_tokens=900)
        p = proposer.propose(make_context(root))
    assert p.error.startswith("no valid edit after a reply without a usable edit; last reply (cut at "
                              "max_output_tokens=900):")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_of_two_submit_edit_calls_the_first_is_taken_and_the_second_refused(provider, root):
    smoke = Smoke(failing=[EDIT])  # the conversation goes on, so the answers to both calls are seen
    both = Step(calls=[Call("submit_edit", {"hypothesis": "Double the learning rate", "rationale": "r", "edit": EDIT}),
                       Call("submit_edit", {"hypothesis": "Larger batch", "rationale": "r", "edit": EDIT_B})])
    with FakeLLM([both, submit(EDIT_B, "Larger batch")]) as server:
        proposer, _ = make_proposer(provider, server)
        p = proposer.propose(make_context(root, smoke))
    assert p.attempts[0]["edit"].startswith("HYPOTHESIS: Double the learning rate") and "LR = 6e-4" in smoke.ran[0]
    taken, refused = tool_results(provider, server.requests[1])
    assert taken == "Edit received." and refused.startswith("Only the first edit of a reply is taken; 1 more")
    if provider == "anthropic":
        assert [b["is_error"] for b in server.requests[1].body["messages"][-1]["content"][:2]] == [False, True]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_of_two_edits_in_a_plain_reply_the_first_is_taken_and_the_model_told(provider, root):
    smoke = Smoke(failing=[EDIT])
    with FakeLLM([reply(f"Two ideas.\n\n{GOOD_REPLY}\nAnd also:\n\n{SECOND}"), reply(SECOND)]) as server:
        proposer, _ = make_proposer(provider, server, tools=False, fix_attempts=1)
        p = proposer.propose(make_context(root, smoke))
    first = p.attempts[0]["edit"]
    assert first == GOOD_REPLY and "BATCH" not in first  # not merged under the first hypothesis
    assert "Only the first edit of a reply is taken; 1 more in yours were not" in sent(server.requests[1])
    assert p.error == "" and p.hypothesis == "Larger batch"


def test_a_hypothesis_stated_before_the_edit_is_not_a_second_edit():
    reply_text = f"HYPOTHESIS: double the learning rate, I think\nLet me write it.\n\n{GOOD_REPLY}\nThanks."
    [edit] = edits_in_reply(reply_text)
    assert edit == reply_text
    assert edits_in_reply("no edit here\nHYPOTHESIS: x") == ["no edit here\nHYPOTHESIS: x"]


# ---------------------------------------------------------------------------------------------------
# what the pre-submission check refuses

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("edit, refusal", [(NOOP, "this edit changes nothing"),
                                           (TIMER, "the static policy rejects it:\nnanomodel/train.py:5: reject "
                                                   "[patch-timer]")])
def test_no_op_and_policy_breaking_edits_come_back_as_tool_errors(provider, edit, refusal, root):
    with FakeLLM([submit(edit), submit()]) as server:
        proposer, _ = make_proposer(provider, server)
        p = proposer.propose(make_context(root))
    assert p.error == "" and "LR = 6e-4" in p.text
    [answer] = tool_results(provider, server.requests[1])
    assert answer.startswith(f"error: {refusal}")


# ---------------------------------------------------------------------------------------------------
# thinking

def thinking_sent(provider, request):
    if provider == "anthropic":
        return request.body.get("thinking"), request.body["max_tokens"]
    return request.body.get("reasoning_effort"), request.body["max_tokens"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("setting, seconds, model, thinks", [
    ("auto", 17.25, "", False), ("auto", 3600.0, "", True), ("off", 3600.0, "", False),
    ("auto", 3600.0, "qwen3-coder", False), ("on", 17.25, "qwen3-coder", True),
    ("on", 17.25, "claude-sonnet-4-6", True)])
def test_thinking_is_on_when_runs_are_long(provider, setting, seconds, model, thinks, root):
    with FakeLLM([submit()]) as server:
        proposer, _ = make_proposer(provider, server, thinking=setting, max_output_tokens=4000,
                                    **({"model": model} if model else {}))
        assert proposer.propose(long_run(root, seconds)).error == ""
    thinking, max_tokens = thinking_sent(provider, server.requests[0])
    if provider == "anthropic" and thinks and proposer.model.startswith(ADAPTIVE_MODELS):
        expected = ({"type": "adaptive"}, 4000)  # the Claude 5 models (the default) take no manual budget
    elif provider == "anthropic":  # the thinking budget comes on top of the answer's limit
        expected = ({"type": "enabled", "budget_tokens": 8000}, 12000) if thinks else (None, 4000)
    else:
        expected = ("high" if thinks else None, 4000)
    assert (thinking, max_tokens) == expected


def test_thinking_blocks_go_back_with_their_signatures(root):
    script = [Step(thinking="the optimizer dominates", calls=[Call("list_files", {})]), submit()]
    with FakeLLM(script) as server:
        proposer, _ = make_proposer("anthropic", server, thinking="on")
        assert proposer.propose(make_context(root)).error == ""
    assistant = server.requests[1].body["messages"][1]
    assert assistant["role"] == "assistant"
    assert assistant["content"][0] == {"type": "thinking", "thinking": "the optimizer dominates", "signature": "sig_1"}


# ---------------------------------------------------------------------------------------------------
# rebase, the loop's services, notes

@pytest.mark.parametrize("provider", PROVIDERS)
def test_rebase_sends_the_old_edit_and_the_error(provider, root):
    stale = Proposal(text="HYPOTHESIS: Raise LR\nRATIONALE: r\n\n" + EDIT.replace("3e-4", "2e-4"), proposer="x")
    with FakeLLM([submit(EDIT, "Raise LR")]) as server:
        proposer, _ = make_proposer(provider, server)
        p = proposer.rebase(stale, make_context(root), "block #1: SEARCH text not found")
    assert p.error == "" and p.hypothesis == "Raise LR" and "LR = 6e-4" in p.text
    first = sent(server.requests[0])
    assert "no longer passes the check on them: block #1: SEARCH text not found" in first
    assert "LR = 2e-4" in first and "call submit_edit" in first


@pytest.mark.parametrize("provider", PROVIDERS)
def test_show_experiment_and_profile_call_the_loops_services(provider, root):
    asked = []

    def show(exp_id):
        if exp_id == "0404":
            raise ValueError("no experiment '0404'")
        asked.append(("show", exp_id))
        return f"experiment {exp_id}: diff ..."

    def profile(edit):
        asked.append(("profile", edit))
        return "matmul 61%"

    context = make_context(root)
    context.show_experiment, context.profile = show, profile
    script = [Step(calls=[Call("show_experiment", {"id": "0001"}), Call("show_experiment", {"id": "0404"}),
                          Call("profile", {"edit": ""}), Call("profile", {"edit": "not an edit"}),
                          Call("profile", {"edit": EDIT})]),
              call("submit_edit", {"hypothesis": "h", "rationale": "r", "edit": EDIT, "notes": "try BATCH next"})]
    with FakeLLM(script) as server:
        proposer, _ = make_proposer(provider, server)
        p = proposer.propose(context)
    names = {t.get("name") or t["function"]["name"] for t in server.requests[0].body["tools"]}
    assert {"show_experiment", "profile"} <= names
    shown, missing, incumbent, malformed, edited = tool_results(provider, server.requests[1])
    assert shown == "experiment 0001: diff ..." and incumbent == edited == "matmul 61%"
    assert missing == "error: show_experiment failed: ValueError: no experiment '0404'"
    assert malformed.startswith("error: edit has neither SEARCH/REPLACE blocks")  # no profile run for it
    assert asked == [("show", "0001"), ("profile", ""), ("profile", EDIT)]
    assert p.notes == "try BATCH next" and parse_edit(p.text).hypothesis == "h"
