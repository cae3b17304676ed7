"""Anthropic Messages API proposer: the wire format only; the loop and tools are in llm_proposer.py, requests
and retries (the SDK's) in chat_api.py.

Prompt caching: the system prompt (instructions, rules, files) carries a cache breakpoint, and so does the
newest user turn, so each call of the tool loop reads everything before it from the cache.

Thinking: the Claude 4 models take extended thinking, `thinking_budget` tokens on top of the answer's
max_output_tokens; the Claude 5 models think adaptively and answer a manual budget with a 400, so for them "on"
asks for adaptive thinking. The API wants each thinking block back, with its signature, in the assistant turns of
a conversation that uses tools: they are kept as received.
"""
from dataclasses import dataclass

import anthropic

from agent.propose.base import Usage
from agent.propose.chat_api import END, MAX_TOKENS, REFUSAL, TOOL_USE, Ask, Reply, ToolCall, ToolResult, no_long_waits
from agent.propose.llm_proposer import LLMProposer

EPHEMERAL = {"type": "ephemeral"}  # Anthropic prompt-cache marker
STOPS = {"max_tokens": MAX_TOKENS, "refusal": REFUSAL, "tool_use": TOOL_USE}  # stop_reason -> ours; others: END
MIN_THINKING_BUDGET = 1024  # the API's least budget_tokens
# model-name prefixes that think adaptively: a manual thinking budget is an error there (Claude Sonnet 5's notes)
ADAPTIVE_MODELS = ("claude-sonnet-5", "claude-opus-5", "claude-haiku-5", "claude-fable", "claude-mythos")


def _with_cache_breakpoint(messages: list[dict]) -> list[dict]:
    """messages with the last block of the last message marked for caching (a copy: the stored conversation
    keeps no marks, so a request never carries more than Anthropic's limit of four breakpoints)."""
    if not messages:
        return messages
    last = messages[-1]
    blocks = [{"type": "text", "text": last["content"]}] if isinstance(last["content"], str) else list(last["content"])
    blocks[-1] = {**blocks[-1], "cache_control": EPHEMERAL}
    return messages[:-1] + [{**last, "content": blocks}]


def _kept_block(block) -> dict | None:
    """A reply's content block as the conversation keeps it: text, tool calls, and thinking blocks as received (the
    API checks their signatures when they come back); None for an empty text block (the API refuses those)."""
    if block.type == "text":
        return {"type": "text", "text": block.text} if block.text else None
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    if block.type == "thinking":
        return {"type": "thinking", "thinking": block.thinking, "signature": block.signature}
    if block.type == "redacted_thinking":
        return {"type": "redacted_thinking", "data": block.data}
    return None


def _tool_call(block: dict) -> ToolCall:
    if isinstance(block["input"], dict):
        return ToolCall(block["id"], block["name"], block["input"])
    return ToolCall(block["id"], block["name"], None, "arguments must be a JSON object")


@dataclass
class AnthropicProposer(LLMProposer):
    model: str = "claude-sonnet-5-5"
    thinking_budget: int = 8_000       # extended thinking's tokens per call, when thinking is on

    provider = "anthropic"
    default_key_env = "ANTHROPIC_API_KEY"
    base_url_env = "ANTHROPIC_BASE_URL"
    sdk_error = anthropic.AnthropicError
    status_error = anthropic.APIStatusError
    connection_error = anthropic.APIConnectionError
    thinking_models = ("claude-opus-4", "claude-sonnet-4", "claude-haiku-4", "claude-3-7-sonnet", *ADAPTIVE_MODELS)

    def __post_init__(self):
        super().__post_init__()
        if self.thinking_budget < MIN_THINKING_BUDGET:
            raise ValueError(f"anthropic proposer: thinking_budget must be >= {MIN_THINKING_BUDGET}, "
                             f"got {self.thinking_budget}")

    def _make_client(self, **options):
        return anthropic.Anthropic(**options, middleware=[no_long_waits])

    def _send(self, client, ask: Ask) -> Reply:
        request = {"model": self.model, "max_tokens": ask.max_tokens,
                   "system": [{"type": "text", "text": ask.system, "cache_control": EPHEMERAL}],
                   "messages": _with_cache_breakpoint(ask.messages)}
        if ask.think and self.model.startswith(ADAPTIVE_MODELS):
            request["thinking"] = {"type": "adaptive"}
        elif ask.think:  # thinking counts against max_tokens: the answer keeps its own limit on top
            request["thinking"] = {"type": "enabled", "budget_tokens": self.thinking_budget}
            request["max_tokens"] += self.thinking_budget
        if ask.tools:  # offered even when not allowed: a conversation holding tool_use blocks must define its tools
            request["tools"] = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                                for t in ask.tools]
            request["tool_choice"] = {"type": "auto" if ask.tools_allowed else "none"}
        response = client.messages.create(**request)
        blocks = [kept for block in response.content if (kept := _kept_block(block)) is not None]
        text = [block["text"] for block in blocks if block["type"] == "text"]
        calls = [_tool_call(block) for block in blocks if block["type"] == "tool_use"]
        u = response.usage
        usage = Usage(input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                      cache_read_tokens=u.cache_read_input_tokens or 0,
                      cache_write_tokens=u.cache_creation_input_tokens or 0, calls=1)
        if not text and not calls:  # the API refuses an assistant turn without an answer: a placeholder keeps it
            blocks.append({"type": "text", "text": "(empty reply)"})
        return Reply("\n".join(text), calls, usage, {"role": "assistant", "content": blocks},
                     STOPS.get(response.stop_reason, END))

    def _user_turn(self, results: list[ToolResult], text: str) -> list[dict]:
        content = [{"type": "tool_result", "tool_use_id": r.call_id, "content": r.content, "is_error": r.is_error}
                   for r in results]  # tool results first: the API requires them at the start of the turn
        if text:
            content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]
