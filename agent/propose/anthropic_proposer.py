"""Anthropic Messages API proposer: the wire format only; the loop and tools are in llm_proposer.py, requests
and retries (the SDK's) in chat_api.py.

Prompt caching: the system prompt (instructions, rules, files) carries a cache breakpoint, and so does the
newest user turn, so each call of the tool loop reads everything before it from the cache.
"""
from dataclasses import dataclass

import anthropic

from agent.propose.base import Usage
from agent.propose.chat_api import Reply, ToolCall, ToolResult, no_long_waits
from agent.propose.llm_proposer import LLMProposer

EPHEMERAL = {"type": "ephemeral"}  # Anthropic prompt-cache marker


def _with_cache_breakpoint(messages: list[dict]) -> list[dict]:
    """messages with the last block of the last message marked for caching (a copy: the stored conversation
    keeps no marks, so a request never carries more than Anthropic's limit of four breakpoints)."""
    if not messages:
        return messages
    last = messages[-1]
    blocks = [{"type": "text", "text": last["content"]}] if isinstance(last["content"], str) else list(last["content"])
    blocks[-1] = {**blocks[-1], "cache_control": EPHEMERAL}
    return messages[:-1] + [{**last, "content": blocks}]


@dataclass
class AnthropicProposer(LLMProposer):
    model: str = "claude-sonnet-4-5"

    provider = "anthropic"
    default_key_env = "ANTHROPIC_API_KEY"
    base_url_env = "ANTHROPIC_BASE_URL"
    sdk_error = anthropic.AnthropicError
    status_error = anthropic.APIStatusError
    connection_error = anthropic.APIConnectionError

    def _make_client(self, **options):
        return anthropic.Anthropic(**options, middleware=[no_long_waits])

    def _send(self, client, system: str, messages: list, tools: list[dict] | None, tools_allowed: bool) -> Reply:
        request = {"model": self.model, "max_tokens": self.max_output_tokens,
                   "system": [{"type": "text", "text": system, "cache_control": EPHEMERAL}],
                   "messages": _with_cache_breakpoint(messages)}
        if tools:  # offered even when not allowed: a conversation holding tool_use blocks must define its tools
            request["tools"] = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                                for t in tools]
            request["tool_choice"] = {"type": "auto" if tools_allowed else "none"}
        response = client.messages.create(**request)
        blocks, text, calls = [], [], []
        for block in response.content:
            if block.type == "text" and block.text:
                blocks.append({"type": "text", "text": block.text})
                text.append(block.text)
            elif block.type == "tool_use":
                blocks.append({"type": "tool_use", "id": block.id, "name": block.name, "input": block.input})
                ok = isinstance(block.input, dict)
                calls.append(ToolCall(block.id, block.name, block.input if ok else None,
                                      "" if ok else "arguments must be a JSON object"))
        u = response.usage
        usage = Usage(input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                      cache_read_tokens=u.cache_read_input_tokens or 0,
                      cache_write_tokens=u.cache_creation_input_tokens or 0, calls=1)
        # the API refuses an empty assistant turn; an empty reply is kept as a placeholder
        message = {"role": "assistant", "content": blocks or [{"type": "text", "text": "(empty reply)"}]}
        return Reply("\n".join(text), calls, usage, message)

    def _user_turn(self, results: list[ToolResult], text: str) -> list[dict]:
        content = [{"type": "tool_result", "tool_use_id": r.call_id, "content": r.content, "is_error": r.is_error}
                   for r in results]  # tool results first: the API requires them at the start of the turn
        if text:
            content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]
