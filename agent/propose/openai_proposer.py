"""OpenAI Chat Completions proposer, for OpenAI and any compatible server (vLLM, llama.cpp, Ollama) via
base_url: the wire format only; the loop and tools are in llm_proposer.py, requests and retries (the SDK's) in
chat_api.py.

OpenAI caches long prompt prefixes by itself; the stable system message comes first so the prefix holds.
"""
import json
from dataclasses import dataclass

import openai

from agent.propose.base import Usage
from agent.propose.chat_api import Reply, ToolCall, ToolResult
from agent.propose.llm_proposer import LLMProposer

APIS = ("chat",)  # Chat Completions: the API that OpenAI-compatible servers speak


def _arguments(raw: str | None) -> tuple[dict | None, str]:
    """A tool call's JSON-string arguments as (dict, "") or (None, why not)."""
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError as e:
        return None, f"arguments are not valid JSON ({e}): {raw[:200]!r}"
    if not isinstance(value, dict):
        return None, f"arguments must be a JSON object, got {raw[:200]!r}"
    return value, ""


@dataclass
class OpenAIProposer(LLMProposer):
    model: str = "gpt-5-mini"
    api: str = "chat"                 # the only API implemented; kept as a field so configs can name it
    max_tokens_field: str = ""        # "" = max_completion_tokens on api.openai.com, max_tokens elsewhere

    provider = "openai"
    default_key_env = "OPENAI_API_KEY"
    base_url_env = "OPENAI_BASE_URL"
    sdk_error = openai.OpenAIError
    status_error = openai.APIStatusError
    connection_error = openai.APIConnectionError

    def __post_init__(self):
        if self.api not in APIS:
            raise ValueError(f"openai proposer: api {self.api!r} is not supported; use one of {', '.join(APIS)}")
        super().__post_init__()

    def _make_client(self, **options):
        return openai.OpenAI(**options)  # its SDK gives up on its own when a retry-after exceeds two minutes

    def _send(self, client, system: str, messages: list, tools: list[dict] | None, tools_allowed: bool) -> Reply:
        # OpenAI's reasoning models refuse max_tokens; compatible servers may know only it
        tokens_field = self.max_tokens_field or (
            "max_completion_tokens" if client.base_url.host == "api.openai.com" else "max_tokens")
        request = {"model": self.model, "messages": [{"role": "system", "content": system}, *messages],
                   tokens_field: self.max_output_tokens}
        if tools:
            request["tools"] = [{"type": "function", "function": t} for t in tools]
            request["tool_choice"] = "auto" if tools_allowed else "none"
        response = client.chat.completions.create(**request)
        message = response.choices[0].message if response.choices else None
        text = (message.content or "") if message else ""
        raw_calls = [c for c in (message.tool_calls or []) if c.type == "function"] if message else []
        calls = [ToolCall(c.id, c.function.name, *_arguments(c.function.arguments)) for c in raw_calls]
        turn = {"role": "assistant", "content": text}
        if raw_calls:
            turn["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.function.name, "arguments": c.function.arguments or "{}"}}
                                  for c in raw_calls]
        return Reply(text, calls, self._usage(response.usage), turn)

    @staticmethod
    def _usage(u) -> Usage:
        """prompt_tokens includes the cached ones: split them out, so each is priced at its rate."""
        if u is None:  # some compatible servers report none
            return Usage(calls=1)
        details = u.prompt_tokens_details
        cached = (details.cached_tokens or 0) if details else 0
        written = (getattr(details, "cache_write_tokens", None) or 0) if details else 0
        return Usage(input_tokens=max(0, (u.prompt_tokens or 0) - cached - written),
                     output_tokens=u.completion_tokens or 0, cache_read_tokens=cached, cache_write_tokens=written,
                     calls=1)

    def _user_turn(self, results: list[ToolResult], text: str) -> list[dict]:
        turns = [{"role": "tool", "tool_call_id": r.call_id, "content": r.content} for r in results]
        if text:
            turns.append({"role": "user", "content": text})
        return turns
