"""One request to an LLM API, the same for every provider: the key, the client, the reply, the failure.

A provider (anthropic_proposer.py, openai_proposer.py) adds only its wire format: build the SDK's client
(`_make_client`), send one request and read the reply into text + tool calls + usage (`_send`), and write a user
turn with tool results (`_user_turn`).

Retries are the SDK's own (its `max_retries` is max_attempts - 1, its timeout request_timeout_s per attempt): 408,
409, 429, 5xx, timeouts and connection errors are tried again after the server's retry-after or an exponential
backoff. A retry-after over two minutes, and any other error, fail at once. What is left when the SDK gives up
becomes a ProposalFailed with a one-line reason, except what no later request can get past: a refused key (401,
403), an unknown model (404) or no key at all are a ProposerFatal, which stops the loop (`preflight` asks once
before the night starts, so they stop it before the baseline).
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
KEY_REFUSED = (401, 403)   # the same key gets the same answer next time
NOT_FOUND = 404            # the model (or the endpoint) does not exist there
# why a reply ended, the same for every provider (each maps its own stop reasons onto these)
END, TOOL_USE, MAX_TOKENS, REFUSAL = "end", "tool_use", "max_tokens", "refusal"
PROBE_SYSTEM = "Reply with one word."  # the pre-flight request's system prompt


class ProposalFailed(Exception):
    """No edit this time (API error, bounds reached, nothing parseable): becomes Proposal.error."""


class ProposerFatal(Exception):
    """No proposal can ever succeed (the key refused or missing, the model unknown): the loop stops with this message
    instead of recording a failure every few milliseconds until a budget ends. propose() lets it through."""


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
class Ask:
    """One request, provider-neutral; each provider writes it in its wire format (`_send`)."""
    system: str
    messages: list
    tools: list[dict] | None   # tool specs offered; None: none
    tools_allowed: bool        # False: offered (a conversation holding tool calls must define them) but not to call
    max_tokens: int            # the answer's limit; thinking, when on, gets its own budget on top (Anthropic)
    think: bool = False        # extended thinking (Anthropic) or the reasoning effort set (OpenAI)


@dataclass
class Reply:
    """One model reply, read from the provider's wire format."""
    text: str
    calls: list[ToolCall]
    usage: Usage               # tokens of this call; cost is added by the proposer
    message: dict              # the assistant turn, in the provider's format, to append to the conversation
    stop: str = END            # why it ended: END, TOOL_USE, MAX_TOKENS (cut at max_tokens) or REFUSAL


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

    def _send(self, client, ask: Ask) -> Reply:
        """One request (the SDK retries it); SDK errors propagate."""
        raise NotImplementedError

    def _user_turn(self, results: list[ToolResult], text: str) -> list[dict]:
        """Message(s) carrying the tool results, then the text (either may be empty)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ requests
    def request(self, ask: Ask) -> Reply:
        """One reply; ProposalFailed once the SDK has given up (or at once, for an error not worth retrying);
        ProposerFatal for an error that every later request would get too."""
        client = self._client_or_fail()
        try:
            return self._send(client, ask)
        except self.sdk_error as e:
            if fatal := self._fatal(e):
                raise ProposerFatal(self.scrub(fatal)) from e
            raise ProposalFailed(self.scrub(self._failure(e))) from e

    def preflight(self) -> None:
        """One tiny request (one output token, no tools, no thinking) before the night starts: a refused key or an
        unknown model is a ProposerFatal now, before the baseline is measured, not a failed proposal later."""
        self.request(Ask(PROBE_SYSTEM, [{"role": "user", "content": "ping"}], None, False, max_tokens=1))

    @property
    def key_env(self) -> str:
        return self.api_key_env or self.default_key_env

    def _client_or_fail(self):
        if self._client is None:
            key_env = self.key_env
            key = os.environ.get(key_env, "")
            base_url = self.base_url or os.environ.get(self.base_url_env) or None
            if not key:
                if base_url is None:
                    raise ProposerFatal(f"{key_env} is not set: export it, or name another variable with "
                                        "--api-key-env")
                key = "none"  # OpenAI-compatible servers (vLLM, llama.cpp, Ollama) need none; the SDKs want one
            self._client = self._make_client(api_key=key, base_url=base_url, max_retries=self.max_attempts - 1,
                                             timeout=self.request_timeout_s)
        return self._client

    def _fatal(self, e: Exception) -> str:
        """The loop's last words for an error no later request can get past, naming what to fix; "" for others."""
        if not isinstance(e, self.status_error) or e.status_code not in (*KEY_REFUSED, NOT_FOUND):
            return ""
        failure = self._failure(e)
        if e.status_code in KEY_REFUSED:
            return (f"{self.provider}: the key in {self.key_env} was refused ({failure}): export a valid key in "
                    f"{self.key_env}, or name another variable with --api-key-env")
        where = self.base_url or os.environ.get(self.base_url_env) or f"the {self.provider} API"
        return (f"{self.provider}: model {self.model!r} not found at {where} ({failure}): check --model "
                "(and --base-url)")

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
        key = os.environ.get(self.key_env, "")
        if len(key) >= 4:
            text = text.replace(key, "[redacted]")
        return redact(text)
