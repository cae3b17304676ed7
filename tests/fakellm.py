"""Fake LLM API servers on 127.0.0.1 for tests: Anthropic Messages and OpenAI Chat Completions, driven by a script.

Each request takes the next Step of the script and answers it in the wire format of the path it came to
(`POST /v1/messages` or `POST /v1/chat/completions`), so one script drives either provider. Every request is
recorded (method, path, headers, JSON body) so tests can assert what the SDK sent. When the script is used up,
requests get a 400 "script exhausted" (which no client retries): a runaway loop ends at once, and `overrun`
says so. Use it as a context manager; leaving the block stops the server and wakes any delayed reply.

A proposer's pre-flight request (one output token, no tools: ChatAPI.preflight) is answered "ok" outside the script
and recorded in `probes`, not `requests`, unless answer_probes=False (then it takes the script's next step).
"""
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANTHROPIC_PATH = "/v1/messages"
OPENAI_PATH = "/v1/chat/completions"
# error.type in Anthropic's error bodies, by status
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


@dataclass
class Call:
    name: str
    arguments: dict | str   # a dict, or a string sent as is (OpenAI's arguments are a JSON string: send bad JSON)


@dataclass
class Step:
    """One scripted answer."""
    text: str = ""
    calls: list[Call] = field(default_factory=list)
    status: int = 200                          # not 200: an error body with `message`, and `headers`
    message: str = ""                          # the error's message
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0                       # wait before answering; longer than the client's timeout: a timeout
    usage: tuple[int, int, int, int] = (100, 20, 0, 0)  # uncached input, output, cache read, cache write tokens
    truncated: bool = False                    # the reply stopped at max tokens
    refusal: str = ""                          # the model refuses, saying this (Anthropic: stop_reason "refusal";
                                               # OpenAI: message.refusal)
    thinking: str = ""                         # Anthropic: a thinking block (with a signature) before the answer


def reply(text: str, **kw) -> Step:
    return Step(text=text, **kw)


def call(name: str, arguments: dict | str | None = None, **kw) -> Step:
    """A reply with one tool call."""
    return Step(calls=[Call(name, {} if arguments is None else arguments)], **kw)


def error(status: int, headers: dict[str, str] | None = None, message: str = "scripted error") -> Step:
    return Step(status=status, headers=headers or {}, message=message)


def refuse(text: str = "I can't help with that.", **kw) -> Step:
    return Step(refusal=text, **kw)


def stall(seconds: float) -> Step:
    """A reply that comes too late: the client times out first."""
    return Step(text="too late", delay_s=seconds)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]                    # lower-cased names
    body: dict


def anthropic_body(step: Step, n: int) -> dict:
    content = [{"type": "thinking", "thinking": step.thinking, "signature": f"sig_{n}"}] if step.thinking else []
    content += [{"type": "text", "text": text} for text in (step.text, step.refusal) if text]
    content += [{"type": "tool_use", "id": f"toolu_{n}_{i}", "name": c.name, "input": c.arguments}
                for i, c in enumerate(step.calls)]
    stop = ("refusal" if step.refusal else "max_tokens" if step.truncated else "tool_use" if step.calls
            else "end_turn")
    uncached, output, cache_read, cache_write = step.usage
    return {"id": f"msg_{n}", "type": "message", "role": "assistant", "model": "fake", "content": content,
            "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": uncached, "output_tokens": output, "cache_read_input_tokens": cache_read,
                      "cache_creation_input_tokens": cache_write}}


def openai_body(step: Step, n: int) -> dict:
    message = {"role": "assistant", "content": step.text or None, "refusal": step.refusal or None}
    if step.calls:
        message["tool_calls"] = [
            {"id": f"call_{n}_{i}", "type": "function",
             "function": {"name": c.name,
                          "arguments": c.arguments if isinstance(c.arguments, str) else json.dumps(c.arguments)}}
            for i, c in enumerate(step.calls)]
    finish = "length" if step.truncated else "tool_calls" if step.calls else "stop"
    uncached, output, cache_read, _ = step.usage  # OpenAI bills no cache writes; prompt_tokens includes cached ones
    return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": uncached + cache_read, "completion_tokens": output,
                      "total_tokens": uncached + cache_read + output,
                      "prompt_tokens_details": {"cached_tokens": cache_read}}}


def error_body(path: str, step: Step) -> dict:
    if path == ANTHROPIC_PATH:
        kind = ANTHROPIC_ERROR_TYPES.get(step.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": step.message}}
    return {"error": {"message": step.message, "type": "server_error" if step.status >= 500 else "invalid_request",
                      "code": None}}


def is_probe(body: dict) -> bool:
    """A pre-flight request: one output token and no tools."""
    return body.get("max_tokens", body.get("max_completion_tokens")) == 1 and "tools" not in body


class FakeLLM:
    def __init__(self, script: list[Step], answer_probes: bool = True):
        self.script = list(script)
        self.requests: list[Request] = []
        self.answer_probes = answer_probes
        self.probes: list[Request] = []        # pre-flight requests answered outside the script
        self.overrun = False                   # a request came after the script was used up
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True     # a handler still writing to a gone client never blocks the exit
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        """Base URL for Anthropic(base_url=...); OpenAI's is url + "/v1"."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def remaining(self) -> int:
        return len(self.script)

    def __enter__(self) -> "FakeLLM":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next(self, request: Request) -> tuple[Step | None, int]:
        with self._lock:
            self.requests.append(request)
            if not self.script:
                self.overrun = True
                return None, len(self.requests)
            return self.script.pop(0), len(self.requests)

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"      # keep-alive with Content-Length, as the SDKs' clients expect

            def log_message(self, *args):      # no stderr noise in test output
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"unparsed": raw.decode("utf-8", "replace")}
                request = Request("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                if self.path not in (ANTHROPIC_PATH, OPENAI_PATH):
                    fake.requests.append(request)
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                render = anthropic_body if self.path == ANTHROPIC_PATH else openai_body
                if fake.answer_probes and is_probe(body):
                    fake.probes.append(request)
                    return self._send(200, render(Step(text="ok"), len(fake.probes)))
                step, n = fake._next(request)
                if step is None:
                    return self._send(400, error_body(self.path, Step(status=400, message="script exhausted")))
                if step.delay_s and fake._stopping.wait(step.delay_s):
                    return                             # the test ended while this reply was held back
                if step.status != 200:
                    return self._send(step.status, error_body(self.path, step), step.headers)
                self._send(200, render(step, n))

            def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass                               # the client timed out and left: expected in timeout tests

        return Handler
