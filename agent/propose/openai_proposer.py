"""OpenAI Chat Completions proposer, for OpenAI and any compatible server (vLLM, llama.cpp, Ollama) via
base_url: the wire format only; the loop and tools are in llm_proposer.py, requests and retries (the SDK's) in
chat_api.py.

OpenAI caches long prompt prefixes by itself; the stable system message comes first so the prefix holds.
Thinking is the reasoning models' `reasoning_effort`; their reasoning tokens count against max_output_tokens.
"""
import json
from dataclasses import dataclass

import openai

from agent.propose.base import Usage
from agent.propose.chat_api import END, MAX_TOKENS, REFUSAL, TOOL_USE, Ask, Reply, ToolCall, ToolResult
from agent.propose.llm_proposer import LLMProposer

APIS = ("chat",)  # Chat Completions: the API that OpenAI-compatible servers speak
REASONING_EFFORTS = ("minimal", "low", "medium", "high")
# finish_reason -> ours (others: END); a content filter is the server refusing the answer
STOPS = {"length": MAX_TOKENS, "content_filter": REFUSAL, "tool_calls": TOOL_USE, "function_call": TOOL_USE}


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
    reasoning_effort: str = "high"    # sent when thinking is on

    provider = "openai"
    default_key_env = "OPENAI_API_KEY"
    base_url_env = "OPENAI_BASE_URL"
    sdk_error = openai.OpenAIError
    status_error = openai.APIStatusError
    connection_error = openai.APIConnectionError
    thinking_models = ("gpt-5", "o1", "o3", "o4")  # the reasoning models: others refuse reasoning_effort

    def __post_init__(self):
        if self.api not in APIS:
            raise ValueError(f"openai proposer: api {self.api!r} is not supported; use one of {', '.join(APIS)}")
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(f"openai proposer: reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                             f"got {self.reasoning_effort!r}")
        super().__post_init__()

    def _make_client(self, **options):
        return openai.OpenAI(**options)  # its SDK gives up on its own when a retry-after exceeds two minutes

    def _send(self, client, ask: Ask) -> Reply:
        # OpenAI's reasoning models refuse max_tokens; compatible servers may know only it
        tokens_field = self.max_tokens_field or (
            "max_completion_tokens" if client.base_url.host == "api.openai.com" else "max_tokens")
        request = {"model": self.model, "messages": [{"role": "system", "content": ask.system}, *ask.messages],
                   tokens_field: ask.max_tokens}
        if ask.think:
            request["reasoning_effort"] = self.reasoning_effort
        if ask.tools:
            request["tools"] = [{"type": "function", "function": t} for t in ask.tools]
            request["tool_choice"] = "auto" if ask.tools_allowed else "none"
        response = client.chat.completions.create(**request)
        choice = response.choices[0] if response.choices else None
        message = choice.message if choice else None
        text = (message.content or "") if message else ""
        raw_calls = [c for c in (message.tool_calls or []) if c.type == "function"] if message else []
        calls = [ToolCall(c.id, c.function.name, *_arguments(c.function.arguments)) for c in raw_calls]
        turn = {"role": "assistant", "content": text}
        if raw_calls:
            turn["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.function.name, "arguments": c.function.arguments or "{}"}}
                                  for c in raw_calls]
        refused = message is not None and bool(message.refusal)  # a refusal comes as its own field, content empty
        stop = REFUSAL if refused else STOPS.get(choice.finish_reason if choice else "", END)
        return Reply(text, calls, self._usage(response.usage), turn, stop)

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
