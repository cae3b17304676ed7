"""One request to an LLM API, the same for every provider: the key, the client, the reply, the failure.

A provider (anthropic_proposer.py, openai_proposer.py) adds only its wire format: build the SDK's client
(`_make_client`), send one request and read the reply into text + tool calls + usage (`_send`), and write a user
turn with tool results (`_user_turn`).

Retries are the SDK's own (its `max_retries` is max_attempts - 1, its timeout request_timeout_s per attempt): 408,
409, 429, 5xx, timeouts and connection errors are tried again after the server's retry-after or an exponential
backoff. A retry-after over two minutes, and any other error (a bad key, 401 or 403, first of all), fail at once.
What is left when the SDK gives up becomes a ProposalFailed with a one-line reason.
API keys come from the environment only, and `scrub` keeps them out of every message this module makes.
"""
import os
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import ClassVar

from agent.guard.redaction import redact
from agent.propose.base import Usage
from agent.propose.prompt import cut

MESSAGE_CHARS = 300  # an API error's message is cut here
LONGEST_RETRY_AFTER_S = 120.0  # the OpenAI SDK's limit; no_long_waits sets it for Anthropic's


class ProposalFailed(Exception):
    """No edit this time (API error, bounds reached, nothing parseable): becomes Proposal.error."""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict | None     # None when the model's arguments were not a JSON object
    problem: str = ""          # why arguments is None


@dataclass
class ToolResult:
    call_id: str
    content: str
    is_error: bool = False


@dataclass
class Reply:
    """One model reply, read from the provider's wire format."""
    text: str
    calls: list[ToolCall]
    usage: Usage               # tokens of this call; cost is added by the proposer
    message: dict              # the assistant turn, in the provider's format, to append to the conversation


def retry_after(headers) -> float | None:
    """Seconds to wait from retry-after-ms, or retry-after in seconds or as an HTTP date; None if absent."""
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def no_long_waits(request, call_next):
    """SDK middleware: the Anthropic SDK waits as long as any retry-after asks (an hour, if the server says so),
    which would hold the loop's proposer thread that long; the OpenAI SDK gives up above two minutes. Same here:
    such a response is marked not to be retried, and the SDK raises its error at once."""
    response = call_next(request)
    wait = retry_after(response.headers) if response.status_code >= 400 else None
    if wait is not None and wait > LONGEST_RETRY_AFTER_S:
        response.headers["x-should-retry"] = "false"
    return response


def _attempts(request) -> str:
    """' (gave up after N attempts)' when the SDK retried, read from the retry count it sends with each request."""
    retries = int(request.headers.get("x-stainless-retry-count", "0"))
    return f" (gave up after {retries + 1} attempts)" if retries else ""


@dataclass
class ChatAPI:
    """The provider-neutral client. Subclasses set the ClassVars and implement the three provider hooks."""
    model: str = ""
    base_url: str | None = None        # None: the provider's (or $ANTHROPIC_BASE_URL / $OPENAI_BASE_URL)
    api_key_env: str = ""              # variable holding the key; "" = the provider's usual one
    max_output_tokens: int = 16_384    # per call; OpenAI reasoning tokens count against it
    request_timeout_s: float = 600.0   # one HTTP attempt; a long reasoning reply takes minutes
    max_attempts: int = 6              # tries of one request (the SDK's max_retries + 1)
    _client: object = field(default=None, init=False, repr=False)

    provider: ClassVar[str] = ""           # "anthropic", "openai": the name's prefix
    default_key_env: ClassVar[str] = ""
    base_url_env: ClassVar[str] = ""
    sdk_error: ClassVar[type] = Exception  # the SDK's base error, its status error, its connection error
    status_error: ClassVar[type] = Exception
    connection_error: ClassVar[type] = Exception

    def __post_init__(self):
        for name in ("max_output_tokens", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.provider} proposer: {name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"{self.provider} proposer: request_timeout_s must be > 0, got {self.request_timeout_s}")

    @property
    def name(self) -> str:
        return f"{self.provider}:{self.model}"

    # ------------------------------------------------------------------ provider hooks
    def _make_client(self, **options):
        """The SDK's client, given api_key, base_url, max_retries and timeout."""
        raise NotImplementedError

    def _send(self, client, system: str, messages: list, tools: list[dict] | None, tools_allowed: bool) -> Reply:
        """One request (the SDK retries it); SDK errors propagate."""
        raise NotImplementedError

    def _user_turn(self, results: list[ToolResult], text: str) -> list[dict]:
        """Message(s) carrying the tool results, then the text (either may be empty)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ requests
    def request(self, system: str, messages: list, tools: list[dict] | None, tools_allowed: bool) -> Reply:
        """One reply; ProposalFailed once the SDK has given up (or at once, for an error not worth retrying)."""
        client = self._client_or_fail()
        try:
            return self._send(client, system, messages, tools, tools_allowed)
        except self.sdk_error as e:
            raise ProposalFailed(self._failure(e)) from e

    def _client_or_fail(self):
        if self._client is None:
            key_env = self.api_key_env or self.default_key_env
            key = os.environ.get(key_env, "")
            base_url = self.base_url or os.environ.get(self.base_url_env) or None
            if not key:
                if base_url is None:
                    raise ProposalFailed(f"{key_env} is not set: export it, or name another variable with "
                                         "--api-key-env")
                key = "none"  # OpenAI-compatible servers (vLLM, llama.cpp, Ollama) need none; the SDKs want one
            self._client = self._make_client(api_key=key, base_url=base_url, max_retries=self.max_attempts - 1,
                                             timeout=self.request_timeout_s)
        return self._client

    def _failure(self, e: Exception) -> str:
        """What failed, in one line: the status and the server's message, or the connection error."""
        if isinstance(e, self.status_error):
            body = e.body if isinstance(e.body, dict) else {}
            detail = body["error"] if isinstance(body.get("error"), dict) else body  # Anthropic nests it, OpenAI not
            message = cut(detail.get("message") or e.message, MESSAGE_CHARS)
            status = e.status_code
            failure = f"rate limited: 429 {message}" if status == 429 else f"API error {status}: {message}"
        elif isinstance(e, self.connection_error):  # timeouts are connection errors in both SDKs
            failure = f"API {type(e).__name__}: {cut(str(e), MESSAGE_CHARS)}"
        else:
            return f"API client error {type(e).__name__}: {cut(str(e), MESSAGE_CHARS)}"
        return failure + _attempts(e.request)

    def scrub(self, text: str) -> str:
        """text without the API key (this proposer's variable, whatever its name) or any secret variable's value."""
        key = os.environ.get(self.api_key_env or self.default_key_env, "")
        if len(key) >= 4:
            text = text.replace(key, "[redacted]")
        return redact(text)
