"""LLM proposers through the real anthropic / openai SDKs against scripted fake servers on 127.0.0.1.

Most tests run once per provider: the same script drives both wire formats (tests/fakellm.py).
"""
import json
import time

import anthropic
import openai
import pytest
from tests.fakellm import Call, FakeLLM, Step, call, error, reply, stall

from agent.edit.parse import parse_edit
from agent.propose.anthropic_proposer import AnthropicProposer
from agent.propose.base import Context, SmokeResult
from agent.propose.chat_api import ProposerFatal
from agent.propose.openai_proposer import OpenAIProposer
from agent.propose.prices import PRICES, Price, PriceError, price_for
from agent.propose.prompt import system_prompt
from agent.propose.tools import ToolError, Worktree

KEY = "sk-test-0123456789abcdef"  # the API key the proposer must send and never repeat
PROVIDERS = ["anthropic", "openai"]
# the SDK warns of models near their end of life (claude-sonnet-4-5 in the price tests); not what these tests are about
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
TRAIN = """import torch

LR = 3e-4
BATCH = 8


def make_optimizer(params):
    return torch.optim.AdamW(params, lr=LR)
"""
EDIT = "nanomodel/train.py\n<<<<<<< SEARCH\nLR = 3e-4\n=======\nLR = 6e-4\n>>>>>>> REPLACE\n"
EDIT_B = "nanomodel/train.py\n<<<<<<< SEARCH\nBATCH = 8\n=======\nBATCH = 16\n>>>>>>> REPLACE\n"
GOOD_REPLY = f"HYPOTHESIS: Double the learning rate\nRATIONALE: fewer steps to the target.\n\n{EDIT}"
HISTORY = [
    {"id": "0001", "hypothesis": "Fused AdamW", "decision": "accepted", "reason": "faster (p=0.001)",
     "speedup": 0.042, "val_loss": 4.11, "diff": "--- a/nanomodel/train.py\n+++ b/nanomodel/train.py\n+fused=True"},
    {"id": "0002", "hypothesis": "Drop the warmup", "decision": "rejected", "reason": "val loss 4.35 above target",
     "speedup": None},
]


class SDKClock:
    """The SDKs' `time` module, with sleep recorded instead of slept: their retries take no time, tests see the waits."""

    def __init__(self):
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def __getattr__(self, name):
        return getattr(time, name)


SDK_CLOCK = SDKClock()


@pytest.fixture(autouse=True)
def sdk_clock(monkeypatch):
    SDK_CLOCK.sleeps.clear()
    for sdk in (anthropic._base_client, openai._base_client):  # where each SDK's retry loop sleeps
        monkeypatch.setattr(sdk, "time", SDK_CLOCK)


@pytest.fixture(autouse=True)
def env(monkeypatch):
    for name in ("ANTHROPIC_BASE_URL", "OPENAI_BASE_URL", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


@pytest.fixture
def root(tmp_path):
    """The incumbent worktree, with a protected file and a symlink that points outside it."""
    root = tmp_path / "incumbent"
    (root / "nanomodel").mkdir(parents=True)
    (root / "nanomodel" / "train.py").write_text(TRAIN)
    (root / "agent").mkdir()
    (root / "agent" / "evaluate.py").write_text("VAL_TOKENS = 1024\n")
    (tmp_path / "outside.txt").write_text("outside secret\n")
    (root / "nanomodel" / "leak.py").symlink_to(tmp_path / "outside.txt")
    return root


def make_context(root, smoke=None) -> Context:
    return Context(root=str(root), editable=["nanomodel/**"], protected=["agent/**"],
                   files={"nanomodel/train.py": TRAIN},
                   incumbent={"commit": "abc1234", "seconds": 17.25, "val_loss": 4.1234, "target": 4.2},
                   hardware="CPU: 2 cores, no GPU; torch 2.13.0", history=HISTORY,
                   rules="RULE-7: the evaluator and the timer are protected.", smoke=smoke)


class Smoke:
    """A smoke check that fails for the edits in `failing` and records what it ran."""

    def __init__(self, failing=()):
        self.failing, self.ran = list(failing), []

    def __call__(self, text):
        self.ran.append(text)
        failed = any(parse_edit(text).body.strip() == parse_edit(f).body.strip() for f in self.failing)
        return SmokeResult(not failed, "RuntimeError: shape mismatch in attn" if failed else "smoke run passed")


def make_proposer(provider, server, **kw):
    """The provider's proposer on the fake server, and the list of its SDK's retry waits."""
    if provider == "anthropic":
        proposer = AnthropicProposer(base_url=server.url, **kw)
    else:
        proposer = OpenAIProposer(base_url=server.url + "/v1", **kw)
    return proposer, SDK_CLOCK.sleeps


def submit(edit=EDIT, hypothesis="Double the learning rate", **kw) -> Step:
    return call("submit_edit", {"hypothesis": hypothesis, "rationale": "fewer steps to the target", "edit": edit},
                **kw)


def sent(request) -> str:
    return json.dumps(request.body)


def tool_results(provider, request) -> list[str]:
    """The tool results a request carries (the answers to the previous reply's calls)."""
    messages = request.body["messages"]
    if provider == "anthropic":
        return [b["content"] for b in messages[-1]["content"] if b["type"] == "tool_result"]
    results = []
    for message in reversed(messages):
        if message["role"] == "assistant":
            break
        if message["role"] == "tool":
            results.insert(0, message["content"])
    return results


def tool_choice_is_none(provider, request) -> bool:
    choice = request.body.get("tool_choice")
    return choice == {"type": "none"} if provider == "anthropic" else choice == "none"


# ---------------------------------------------------------------------------------------------------
# the tool loop

@pytest.mark.parametrize("provider", PROVIDERS)
def test_tool_loop_lists_reads_greps_smokes_and_submits(provider, root):
    smoke = Smoke()
    script = [call("list_files", {"glob": "nanomodel/*.py"}),
              call("read_file", {"path": "nanomodel/train.py", "start_line": 3, "end_line": 4}),
              call("grep", {"pattern": r"AdamW\(", "path_glob": "nanomodel/*.py"}),
              call("run_smoke", {"edit": EDIT}),
              submit()]
    with FakeLLM(script) as server:
        proposer, _ = make_proposer(provider, server)
        p = proposer.propose(make_context(root, smoke))
    assert p.error == "" and not server.overrun and server.remaining == 0
    assert p.proposer == proposer.name == f"{provider}:{proposer.model}"
    assert p.hypothesis == "Double the learning rate"
    assert p.text.startswith("HYPOTHESIS: Double the learning rate\nRATIONALE: fewer steps to the target\n")
    assert "LR = 6e-4" in parse_edit(p.text).body
    # the smoke check ran once: the submission is the edit run_smoke already passed
    assert len(smoke.ran) == 1 and p.attempts == [{"edit": EDIT, "ok": True, "log_tail": "smoke run passed"}]
    first, listed, read, grepped, smoked = server.requests
    assert {t.get("name") or t["function"]["name"] for t in first.body["tools"]} == \
        {"list_files", "read_file", "grep", "run_smoke", "submit_edit"}
    # the symlink that points outside is not listed
    assert tool_results(provider, listed) == [f"nanomodel/train.py ({len(TRAIN.encode())} bytes)"]
    assert tool_results(provider, read) == ["nanomodel/train.py: lines 3-4 of 8\nLR = 3e-4\nBATCH = 8"]
    assert tool_results(provider, grepped) == ["nanomodel/train.py:8: return torch.optim.AdamW(params, lr=LR)"]
    assert tool_results(provider, smoked) == ["ok: true\nsmoke run passed"]
    for request in server.requests:
        auth = request.headers.get("authorization", "") + request.headers.get("x-api-key", "")
        assert KEY in auth
    assert KEY not in repr(p) and KEY not in repr(proposer)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_prompt_holds_context_and_keeps_a_stable_prefix(provider, root):
    with FakeLLM([call("list_files"), call("list_files"), submit()]) as server:
        proposer, _ = make_proposer(provider, server)
        assert proposer.propose(make_context(root)).error == ""
    first = server.requests[0]
    text = sent(first)
    for expected in ("RULE-7", "CPU: 2 cores", "17.25", "4.1234", "Fused AdamW", "faster (p=0.001)", "+4.2%",
                     "Drop the warmup", "val loss 4.35 above target", "calibrated automatically",
                     "<<<<<<< SEARCH", "return torch.optim.AdamW(params, lr=LR)"):
        assert expected in text, expected
    assert "run_smoke" not in text  # no smoke check in this context: the tool is not offered
    if provider == "anthropic":  # cache breakpoints: the system prompt and the newest turn
        for request in server.requests:
            assert request.body["system"][0]["cache_control"] == {"type": "ephemeral"}
            assert request.body["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
            marks = sent(request).count("cache_control")
            assert marks == 2, marks
    else:  # OpenAI caches prefixes: the system message and the context message never change
        prefixes = {json.dumps(r.body["messages"][:2]) for r in server.requests}
        assert len(prefixes) == 1 and server.requests[0].body["messages"][0]["role"] == "system"
        assert "max_tokens" in first.body and "max_completion_tokens" not in first.body  # a base_url server


def test_large_files_are_indexed_not_inlined(root):
    context = make_context(root)
    context.files = {"nanomodel/train.py": TRAIN, "nanomodel/big.py": "x = 1\n" * 20_000}
    prompt = system_prompt(context, tools=True, inline_files_bytes=60_000)
    assert "## nanomodel/train.py" in prompt and "x = 1" not in prompt
    assert "Not shown (read them with read_file):\n- nanomodel/big.py (120,000 bytes)" in prompt
    assert "too large to show here" in system_prompt(context, tools=False, inline_files_bytes=60_000)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_malformed_tool_calls_and_bad_edits_go_back_as_errors(provider, root):
    bad_search = EDIT.replace("LR = 3e-4", "LR = 1e-3")
    protected = "agent/measure/evaluate.py\n<<<<<<< SEARCH\nVAL_TOKENS = 1024\n=======\nVAL_TOKENS = 8\n>>>>>>> REPLACE\n"
    script = [Step(calls=[Call("read_file", "{not json"), Call("frobnicate", {}), Call("read_file", {}),
                          Call("read_file", {"path": "nanomodel/train.py", "start_line": "3", "end_line": "3"})]),
              submit(bad_search), submit(protected), submit()]
    with FakeLLM(script) as server:
        proposer, _ = make_proposer(provider, server)
        p = proposer.propose(make_context(root))
    assert p.error == "" and "LR = 6e-4" in p.text
    malformed, unknown, missing, fine = tool_results(provider, server.requests[1])
    assert "read_file: " in malformed and ("not valid JSON" in malformed or "JSON object" in malformed)
    assert "unknown tool 'frobnicate'" in unknown
    assert "missing argument(s) path" in missing
    assert fine.endswith("lines 3-3 of 8\nLR = 3e-4")  # integers sent as strings are accepted
    [not_found] = tool_results(provider, server.requests[2])
    assert "SEARCH text not found" in not_found and "LR = 3e-4" in not_found  # the nearest text helps the fix
    [refused] = tool_results(provider, server.requests[3])
    assert "protected path agent/measure/evaluate.py" in refused
    if provider == "anthropic":
        flags = [b["is_error"] for b in server.requests[1].body["messages"][-1]["content"]]
        assert flags == [True, True, True, False]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_read_tools_stay_inside_the_worktree(provider, root):
    script = [Step(calls=[Call("read_file", {"path": "../outside.txt"}),
                          Call("read_file", {"path": "nanomodel/leak.py"}),
                          Call("grep", {"pattern": "secret", "path_glob": "../*"}), Call("grep", {"pattern": "secret"}),
                          Call("list_files", {"glob": "../*"})]),
              submit()]
    with FakeLLM(script) as server:
        proposer, _ = make_proposer(provider, server)
        assert proposer.propose(make_context(root)).error == ""
    escaped, linked, grep_up, grep_all, listed = tool_results(provider, server.requests[1])
    assert "outside the repository" in escaped and "outside the repository" in linked
    assert grep_up.startswith("no match") and grep_all.startswith("no match")
    assert listed.startswith("no files match")
    assert "outside secret" not in sent(server.requests[1])


def test_worktree_refuses_escaping_paths(root):
    tree = Worktree(root)
    for path in ("../outside.txt", "nanomodel/../../outside.txt", str(root.parent / "outside.txt"),
                 "nanomodel/leak.py", ".git/config"):
        with pytest.raises(ToolError):
            tree.read_file(path)
    assert tree.read_file("nanomodel/../nanomodel/train.py").endswith("lr=LR)")


# ---------------------------------------------------------------------------------------------------
# plain-text mode

@pytest.mark.parametrize("provider", PROVIDERS)
def test_plain_text_mode_reads_the_edit_from_the_reply(provider, root):
    with FakeLLM([reply(f"Sure, here it is.\n```\n{GOOD_REPLY}```\nGood luck!")]) as server:
        proposer, _ = make_proposer(provider, server, tools=False)
        p = proposer.propose(make_context(root))
    assert p.error == "" and len(server.requests) == 1 and "tools" not in server.requests[0].body
    assert p.hypothesis == "Double the learning rate" and "LR = 6e-4" in parse_edit(p.text).body
    assert p.text == GOOD_REPLY  # the prose and fences around the edit are gone


@pytest.mark.parametrize("provider", PROVIDERS)
def test_unified_diff_edits_are_checked_and_accepted(provider, root):
    diff = ("diff --git a/nanomodel/train.py b/nanomodel/train.py\n--- a/nanomodel/train.py\n"
            "+++ b/nanomodel/train.py\n@@ -3,2 +3,2 @@\n-LR = 3e-4\n+LR = 6e-4\n BATCH = 8\n")
    stale = diff.replace("-LR = 3e-4", "-LR = 1e-3")
    with FakeLLM([submit(stale), submit(diff)]) as server:
        proposer, _ = make_proposer(provider, server)
        p = proposer.propose(make_context(root))
    assert p.error == "" and parse_edit(p.text).format == "diff" and p.text.endswith(diff)
    [refused] = tool_results(provider, server.requests[1])
    assert "hunk #1" in refused and "does not apply" in refused


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("second", [GOOD_REPLY, "Still no edit, sorry."])
def test_plain_text_unparseable_reply_gets_one_correction(provider, second, root):
    with FakeLLM([reply("I would raise the learning rate."), reply(second)]) as server:
        proposer, _ = make_proposer(provider, server, tools=False)
        p = proposer.propose(make_context(root))
    assert len(server.requests) == 2 and not server.overrun
    assert "neither SEARCH/REPLACE blocks nor a unified diff" in sent(server.requests[1])
    if second == GOOD_REPLY:
        assert p.error == "" and "LR = 6e-4" in p.text
    else:
        assert p.text == "" and p.error.startswith("no valid edit after a reply without a usable edit")


# ---------------------------------------------------------------------------------------------------
# retries and API errors

@pytest.mark.parametrize("provider", PROVIDERS)
def test_rate_limit_waits_as_long_as_the_server_asks(provider, root):
    script = [error(429, {"retry-after": "7"}), error(429, {"retry-after-ms": "1500"}), reply(GOOD_REPLY)]
    with FakeLLM(script) as server:
        proposer, sleeps = make_proposer(provider, server, tools=False)
        p = proposer.propose(make_context(root))
    assert p.error == "" and sleeps == [7.0, 1.5] and len(server.requests) == 3
    assert p.usage.calls == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_server_errors_back_off_exponentially_then_succeed(provider, root):
    with FakeLLM([error(500), error(529), error(503), reply(GOOD_REPLY)]) as server:
        proposer, sleeps = make_proposer(provider, server, tools=False)
        p = proposer.propose(make_context(root))
    assert p.error == "" and len(server.requests) == 4
    # the SDKs' backoff: 0.5 s doubled per retry, less a jitter of up to 25%
    assert [lo <= s <= hi for s, (lo, hi) in zip(sleeps, [(0.375, 0.5), (0.75, 1), (1.5, 2)])] == [True] * 3


@pytest.mark.parametrize("provider", PROVIDERS)
def test_timeout_is_retried(provider, root):
    with FakeLLM([stall(10), reply(GOOD_REPLY)]) as server:
        proposer, sleeps = make_proposer(provider, server, tools=False, request_timeout_s=0.3)
        p = proposer.propose(make_context(root))
    assert p.error == "" and len(server.requests) == 2 and len(sleeps) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_persistent_rate_limit_is_a_recorded_error(provider, root):
    with FakeLLM([error(429, {"retry-after": "1"}, "slow down")] * 4) as server:
        proposer, sleeps = make_proposer(provider, server, max_attempts=4)
        p = proposer.propose(make_context(root))
    assert p.text == "" and p.error.startswith("rate limited: 429 slow down (gave up after 4 attempts")
    assert sleeps == [1.0, 1.0, 1.0] and len(server.requests) == 4


@pytest.mark.parametrize("provider", PROVIDERS)
def test_retry_after_beyond_the_wait_budget_gives_up_at_once(provider, root):
    with FakeLLM([error(429, {"retry-after": "3600"})]) as server:
        proposer, sleeps = make_proposer(provider, server)
        p = proposer.propose(make_context(root))
    assert p.error.startswith("rate limited: 429") and sleeps == [] and len(server.requests) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_auth_error_is_fatal_at_once_and_never_shows_the_key(provider, root):
    with FakeLLM([error(401, message=f"invalid key {KEY}")]) as server:
        proposer, sleeps = make_proposer(provider, server)
        with pytest.raises(ProposerFatal) as fatal:
            proposer.propose(make_context(root))
    message = str(fatal.value)
    assert f"the key in {proposer.default_key_env} was refused (API error 401: invalid key [redacted])" in message
    assert KEY not in message and sleeps == [] and len(server.requests) == 1


# ---------------------------------------------------------------------------------------------------
# smoke / debug

@pytest.mark.parametrize("provider", PROVIDERS)
def test_smoke_failure_log_goes_back_and_the_fix_passes(provider, root):
    smoke = Smoke(failing=[EDIT])
    with FakeLLM([submit(EDIT), submit(EDIT_B, "Larger batch")]) as server:
        proposer, _ = make_proposer(provider, server)
        p = proposer.propose(make_context(root, smoke))
    assert p.error == "" and p.hypothesis == "Larger batch" and "BATCH = 16" in p.text
    assert [(a["ok"], a["log_tail"]) for a in p.attempts] == [(False, "RuntimeError: shape mismatch in attn"),
                                                               (True, "smoke run passed")]
    assert "LR = 6e-4" in p.attempts[0]["edit"] and p.attempts[1]["edit"] == p.text
    fix_request = sent(server.requests[1])
    assert "shape mismatch in attn" in fix_request and "fix 1 of 2" in fix_request
    assert tool_results(provider, server.requests[1]) == ["Edit received."]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_fixes_run_out_and_the_last_attempt_is_returned(provider, root):
    edit_c = EDIT.replace("6e-4", "5e-4")
    smoke = Smoke(failing=[EDIT, EDIT_B, edit_c])
    with FakeLLM([submit(EDIT), submit(EDIT_B), submit(edit_c)]) as server:
        proposer, _ = make_proposer(provider, server, fix_attempts=2)
        p = proposer.propose(make_context(root, smoke))
    assert p.error == "" and "LR = 5e-4" in p.text and not server.overrun
    assert [a["ok"] for a in p.attempts] == [False, False, False] and len(smoke.ran) == 3


# ---------------------------------------------------------------------------------------------------
# bounds

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("last", ["I need more time.", GOOD_REPLY])
def test_turn_limit_ends_with_one_plain_text_ask(provider, last, root):
    with FakeLLM([call("list_files")] * 3 + [reply(last)]) as server:
        proposer, _ = make_proposer(provider, server, max_turns=3)
        p = proposer.propose(make_context(root))
    assert len(server.requests) == 4 and not server.overrun
    assert tool_choice_is_none(provider, server.requests[3]) and "turn limit (3 calls)" in sent(server.requests[3])
    if last == GOOD_REPLY:
        assert p.error == "" and "LR = 6e-4" in p.text
    else:
        assert p.text == "" and p.error.startswith("no valid edit after turn limit (3 calls)")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("bound", [{"max_total_tokens": 200}, {"max_cost_usd_per_proposal": 0.02}])
def test_token_and_cost_budgets_cut_the_loop(provider, bound, root):
    # each call: 100 uncached input + 20 output tokens; priced at $100/M both: $0.012 a call
    with FakeLLM([call("list_files")] * 2 + [reply(GOOD_REPLY)]) as server:
        proposer, _ = make_proposer(provider, server, prices={"gpt-5-mini": {"input": 100, "output": 100},
                                                              "claude-sonnet-5-5": {"input": 100, "output": 100}},
                                    **bound)
        p = proposer.propose(make_context(root))
    assert p.error == "" and len(server.requests) == 3
    assert tool_choice_is_none(provider, server.requests[2])
    assert ("token budget" if "max_total_tokens" in bound else "cost budget") in sent(server.requests[2])


# ---------------------------------------------------------------------------------------------------
# usage, cost, keys

@pytest.mark.parametrize("provider", PROVIDERS)
def test_usage_and_cost_are_summed_over_calls(provider, root):
    price = {"input": 2.0, "output": 10.0, "cache_read": 0.2, "cache_write": 2.5}
    script = [call("list_files", usage=(1000, 200, 5000, 300)), submit(usage=(500, 100, 6000, 0))]
    with FakeLLM(script) as server:
        proposer, _ = make_proposer(provider, server, model="my-model", prices={"my-model": price})
        p = proposer.propose(make_context(root))
    written = 300 if provider == "anthropic" else 0  # OpenAI reports no cache writes
    u = p.usage
    assert (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.calls) == \
        (1500, 300, 11000, written, 2)
    expected = (1500 * 2.0 + 300 * 10.0 + 11000 * 0.2 + written * 2.5) / 1e6
    assert u.cost_usd == pytest.approx(expected)


def test_price_table_matches_snapshots_and_takes_overrides():
    assert price_for("claude-sonnet-4-5-20250929") == PRICES["claude-sonnet-4-5"]
    assert price_for("gpt-5-mini-2025-08-07") == PRICES["gpt-5-mini"]
    assert price_for("gpt-5-mini") != price_for("gpt-5")
    assert price_for("qwen3-coder-30b") is None
    override = price_for("gpt-5", {"gpt-5": {"input": 1, "output": 2}})
    assert override == Price(1.0, 2.0, 1.0, 1.0)
    sonnet = PRICES["claude-sonnet-4-5"]
    assert sonnet.cache_read < sonnet.input < sonnet.cache_write  # Anthropic: reads discounted, writes dearer
    with pytest.raises(PriceError, match="gpt-5"):
        price_for("gpt-5", {"gpt-5": {"input": "cheap"}})


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_openai_compatible_server_needs_no_key(via, root, monkeypatch, caplog):
    monkeypatch.delenv("OPENAI_API_KEY")
    with FakeLLM([reply(GOOD_REPLY)]) as server:
        if via == "environment":  # the SDK reads OPENAI_BASE_URL itself
            monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        proposer = OpenAIProposer(model="qwen3-coder", base_url=server.url + "/v1" if via == "argument" else None,
                                  tools=False)
        p = proposer.propose(make_context(root))
    assert p.error == "" and p.proposer == "openai:qwen3-coder" and len(server.requests) == 1
    assert server.requests[0].headers["authorization"] == "Bearer none"
    assert p.usage.cost_usd == 0 and "no price for model 'qwen3-coder'" in caplog.text


def test_missing_key_without_base_url_is_fatal(root, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(ProposerFatal, match="^ANTHROPIC_API_KEY is not set"):
        AnthropicProposer().propose(make_context(root))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_api_key_env_names_another_variable(provider, root, monkeypatch):
    monkeypatch.setenv("RATCHET_LLM_PASS", "pass-0123456789")  # a name the generic redaction does not know
    with FakeLLM([error(401, message="bad pass-0123456789")]) as server:
        proposer, _ = make_proposer(provider, server, api_key_env="RATCHET_LLM_PASS")
        with pytest.raises(ProposerFatal) as fatal:
            proposer.propose(make_context(root))
    assert "pass-0123456789" in server.requests[0].headers["authorization"]
    message = str(fatal.value)
    assert "the key in RATCHET_LLM_PASS was refused" in message
    assert "pass-0123456789" not in message and "[redacted]" in message


def test_a_smoke_check_that_raises_is_a_recorded_failure(root):
    def smoke(text):
        raise RuntimeError("scratch worktree vanished")

    with FakeLLM([submit()]) as server:
        proposer, _ = make_proposer("openai", server, fix_attempts=0)
        p = proposer.propose(make_context(root, smoke))
    assert p.error == "" and "LR = 6e-4" in p.text  # returned for the harness to reject with the reason
    assert p.attempts == [{"edit": p.text, "ok": False,
                           "log_tail": "smoke check raised RuntimeError: scratch worktree vanished"}]
