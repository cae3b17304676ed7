"""What the LLM proposers share: the prompt, the tools, one conversation loop, smoke/debug, retries, usage.

A provider (anthropic_proposer.py, openai_proposer.py) adds only its wire format: build a client, send one
request and read the reply into text + tool calls + usage (`_send`), and write a user turn with tool results
(`_user_turn`). Everything else lives here, once:

  prompt      stable part first (instructions, rules, hardware, format, files: cacheable), then the incumbent
              and the history in the first user message
  tool loop   list_files / read_file / grep over the incumbent (read-only, confined to it), run_smoke, and
              submit_edit, which ends the loop; bounded by turns, tokens and cost, then one plain-text ask
  plain mode  one request, the reply is the edit; one corrective follow-up if it does not parse
  smoke/fix   a submitted edit that fails the smoke check goes back with its log, at most `fix_attempts` times
  retries     429 (retry-after honoured), 408/409/5xx, timeouts, connection errors: backoff with jitter, bounded

propose() never raises: every failure is a Proposal with `error` set. API keys come from the environment
only and never appear in a Proposal, a log line or a prompt.
"""
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, ClassVar

from agent import guard
from agent.edits import FENCE, REPLACE_MARKER, Edit, EditError, apply_edit, parse_edit
from agent.propose.base import Context, Proposal, SmokeResult, Usage
from agent.propose.prices import price_for
from agent.redaction import redact

log = logging.getLogger(__name__)

# tool output limits: each result is resent with every later request of the conversation, so keep them short
MAX_TOOL_OUTPUT_CHARS = 20_000  # one tool result; longer ones are cut with a note saying how to read on
MAX_LISTED_FILES = 500          # list_files entries
MAX_GREP_MATCHES = 200          # grep hits
MAX_GREP_FILE_BYTES = 2_000_000  # grep skips larger files (data, weights)
MAX_LINE_CHARS = 300            # a grep hit's line is cut here
# history in the prompt: enough to learn from, bounded so a long night does not outgrow the context window
HISTORY_ROWS = 150              # newest ledger rows shown
HISTORY_FIELD_CHARS = 240       # a row's hypothesis or reason is cut here
HISTORY_DIFF_CHARS = 6_000      # an accepted experiment's diff is cut here
LOG_TAIL_CHARS = 4_000          # smoke log tail kept in attempts and sent back to the model
RETRY_STATUSES = {408, 409, 429}  # plus every 5xx (529: Anthropic overloaded)
EPHEMERAL = {"type": "ephemeral"}  # Anthropic prompt-cache marker

EDIT_FORMAT = """\
Write the edit as a HYPOTHESIS line, a RATIONALE, then one or more SEARCH/REPLACE blocks: the file's path
alone on a line, then the exact lines to find and the lines to put there:

HYPOTHESIS: <one line: the change, and why it cuts wall-clock time to the target loss>
RATIONALE: <a few lines: the mechanism, what you expect, what could go wrong>

path/to/file.py
<<<<<<< SEARCH
<lines copied exactly from the file>
=======
<the lines that replace them>
>>>>>>> REPLACE

The SEARCH text must match the current file exactly and only once: copy it, with a few lines of context.
Use one block per place you change. An empty SEARCH section creates a new file. A unified diff (as
`git diff` writes it) is accepted instead of blocks."""

TOOL_INSTRUCTIONS = """\
# Tools
Look at the code with list_files, read_file and grep (paths relative to the repository root).{smoke}
Hand in your edit with submit_edit; that ends your turn. Submit one edit per proposal."""
SMOKE_INSTRUCTIONS = """ run_smoke
applies an edit to a scratch copy and trains a few steps: use it when you are unsure the edit runs."""

PLAIN_INSTRUCTIONS = """\
# Reply
No tools are available. Reply with the edit only, in the format above."""

NO_EDIT_IN_TEXT = ("Your reply has no usable edit ({error}). Call submit_edit with your edit, or use the tools "
                   "to look further.")
CORRECTION = "Your reply could not be used as an edit: {error}\nReply again with the whole edit in this format:\n\n" \
             + EDIT_FORMAT
FINAL_ASK = ("You have reached the {why}. Tools are off now: reply with your final edit as plain text, in this "
             "format:\n\n" + EDIT_FORMAT)
SMOKE_FAILED = ("The smoke check of your edit failed (fix {n} of {total}). The end of its log:\n```\n{tail}\n```\n"
                "Find the cause and submit a fixed edit: the whole edit, written against the incumbent files "
                "(not on top of your previous edit).")


class ToolError(Exception):
    """A tool call the model got wrong (bad path, bad pattern); its message goes back to the model."""


class ProposalFailed(Exception):
    """No edit this time (API error, bounds reached, nothing parseable): becomes Proposal.error."""


# ---------------------------------------------------------------------------------------------------
# the prompt

def _fence(text: str) -> str:
    """A markdown fence longer than any backtick run inside text, so the file cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _shown_files(files: dict[str, str], budget_bytes: int) -> tuple[list[str], list[str]]:
    """(paths shown in full, paths listed by size only): smallest first until the byte budget is spent."""
    shown, used = set(), 0
    for path in sorted(files, key=lambda p: (len(files[p].encode()), p)):
        size = len(files[path].encode())
        if used + size > budget_bytes:
            break
        shown.add(path)
        used += size
    return sorted(shown), sorted(set(files) - shown)


def system_prompt(context: Context, tools: bool, inline_files_bytes: int) -> str:
    """The stable part of the prompt (it changes only when an edit is accepted): the task, the rules, the
    hardware, the format and the editable files. Sent first, so providers can cache it."""
    shown, listed = _shown_files(context.files, inline_files_bytes)
    parts = [
        "You are a research engineer in an automated speedrun. You propose one code change at a time to make a "
        "small GPT training run reach its target validation loss in less wall-clock time. Each edit is applied to "
        "the current best version (the incumbent), smoke-tested, then timed against the incumbent in interleaved "
        "runs; it is kept only if it is significantly faster and its validation loss still meets the target.",
        "The number of training steps is calibrated automatically to reach the target loss, so an edit that lowers "
        "the loss reached per step (optimizer, schedule, initialization, architecture) is as welcome as one that "
        "makes each step faster: both cut the time to the target. One idea per edit, so each is judged on its own.",
        f"# Rules\n{context.rules.strip()}",
        f"# Hardware\n{context.hardware.strip()}",
        f"# Paths\nEditable: {', '.join(context.editable)}\nProtected (never edit): {', '.join(context.protected)}",
        f"# Edit format\n{EDIT_FORMAT}",
        TOOL_INSTRUCTIONS.format(smoke=SMOKE_INSTRUCTIONS if context.smoke else "") if tools else PLAIN_INSTRUCTIONS,
        "# Files of the incumbent",
    ]
    for path in shown:
        content = context.files[path]
        fence = _fence(content)
        parts.append(f"## {path}\n{fence}\n{content.rstrip()}\n{fence}")
    if listed:
        how = "read them with read_file" if tools else "too large to show here"
        parts.append(f"Not shown ({how}):\n" + "\n".join(f"- {p} ({len(context.files[p].encode()):,} bytes)"
                                                         for p in listed))
    return "\n\n".join(parts)


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def _cut(text: str, limit: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _history_line(row: dict) -> str:
    line = f"- {row.get('id', '?')} {row.get('decision', '?')}: {_cut(row.get('hypothesis'), HISTORY_FIELD_CHARS)}"
    if row.get("reason"):
        line += f" | {_cut(row['reason'], HISTORY_FIELD_CHARS)}"
    if isinstance(row.get("speedup"), (int, float)):
        line += f" | speedup {row['speedup']:+.1%}"
    if isinstance(row.get("val_loss"), (int, float)):
        line += f" | val loss {row['val_loss']:.4f}"
    return line


def context_message(context: Context, tools: bool) -> str:
    """The first user message: what changes from one proposal to the next (the incumbent, the history)."""
    incumbent = "\n".join(f"{key}: {_value(value)}" for key, value in context.incumbent.items()
                          if value not in (None, "", []))
    parts = [f"# The incumbent\n{incumbent or '(no measurements yet)'}"]
    rows = context.history[-HISTORY_ROWS:]
    if rows:
        older = len(context.history) - len(rows)
        head = f"# Experiments so far, oldest first ({older} older ones not shown)" if older else \
            "# Experiments so far, oldest first"
        parts.append(head + "\n" + "\n".join(_history_line(row) for row in rows))
        for row in rows:
            if row.get("decision") == "accepted" and row.get("diff"):
                diff = row["diff"] if len(row["diff"]) <= HISTORY_DIFF_CHARS else \
                    row["diff"][:HISTORY_DIFF_CHARS] + "\n... (diff cut)"
                fence = _fence(diff)
                parts.append(f"## Accepted {row.get('id', '?')}: {_cut(row.get('hypothesis'), HISTORY_FIELD_CHARS)}"
                             f"\n{fence}diff\n{diff.rstrip()}\n{fence}")
        parts.append("Do not repeat an experiment above; learn from why the rejected ones failed. Accepted edits "
                     "are already in the files you see.")
    else:
        parts.append("# Experiments so far\nNone yet.")
    if context.pending:
        parts.append("# Being tried now (do not propose these again)\n" + "\n".join(
            f"- {_cut(p.get('hypothesis'), HISTORY_FIELD_CHARS)}" for p in context.pending))
    parts.append("Propose your next edit." + (" Look at the code as you need, then call submit_edit." if tools
                                              else " Reply with the edit only."))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------
# tools

TOOL_SPECS = [
    {"name": "list_files",
     "description": "List the incumbent's files that match a glob (relative to the repository root), with sizes.",
     "parameters": {"type": "object", "properties": {
         "glob": {"type": "string", "description": "e.g. 'nanomodel/*.py' or '**/*.py'; default: every file"}},
         "required": []}},
    {"name": "read_file",
     "description": "Read one of the incumbent's files, whole or lines start_line..end_line (1-based, inclusive).",
     "parameters": {"type": "object", "properties": {
         "path": {"type": "string", "description": "relative to the repository root"},
         "start_line": {"type": "integer"}, "end_line": {"type": "integer"}},
         "required": ["path"]}},
    {"name": "grep",
     "description": "Search the incumbent's files for a Python regular expression; returns path:line: text per match.",
     "parameters": {"type": "object", "properties": {
         "pattern": {"type": "string"},
         "path_glob": {"type": "string", "description": "files to search, e.g. 'kernels/*.py'; default: every file"}},
         "required": ["pattern"]}},
    {"name": "run_smoke",
     "description": "Apply an edit (SEARCH/REPLACE blocks or a unified diff) to a scratch copy of the incumbent and "
                    "train a few steps. Returns whether it ran and the end of its log. Takes a while.",
     "parameters": {"type": "object", "properties": {"edit": {"type": "string"}}, "required": ["edit"]}},
    {"name": "submit_edit",
     "description": "Hand in your edit; this ends your turn.",
     "parameters": {"type": "object", "properties": {
         "hypothesis": {"type": "string", "description": "one line: the change, and why it is faster"},
         "rationale": {"type": "string", "description": "a few lines: the mechanism, what could go wrong"},
         "edit": {"type": "string", "description": "SEARCH/REPLACE blocks or a unified diff"}},
         "required": ["hypothesis", "rationale", "edit"]}},
]
TOOL_TYPES = {"string": str, "integer": int}


def tool_specs(smoke: bool) -> list[dict]:
    """The tools offered: run_smoke only when the loop gave us a smoke check."""
    return [spec for spec in TOOL_SPECS if smoke or spec["name"] != "run_smoke"]


def check_arguments(spec: dict, arguments: dict) -> dict:
    """The arguments the tool takes, with integers given as strings converted and nulls and unknown names
    dropped; ToolError for a missing or mistyped one."""
    properties, required = spec["parameters"]["properties"], spec["parameters"]["required"]
    checked = {name: value for name, value in arguments.items() if name in properties and value is not None}
    missing = [name for name in required if name not in checked]
    if missing:
        raise ToolError(f"{spec['name']}: missing argument(s) {', '.join(missing)}; "
                        f"expected {json.dumps(properties)}")
    for name, value in checked.items():
        want = properties[name]["type"]
        if want == "integer" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            checked[name] = value = int(value)
        if not isinstance(value, TOOL_TYPES[want]) or isinstance(value, bool):
            raise ToolError(f"{spec['name']}: argument {name!r} must be a {want}, got {value!r:.80}")
    return checked


def _cut_output(text: str, hint: str) -> str:
    if len(text) <= MAX_TOOL_OUTPUT_CHARS:
        return text
    return text[:MAX_TOOL_OUTPUT_CHARS] + f"\n... (output cut at {MAX_TOOL_OUTPUT_CHARS:,} characters; {hint})"


class Worktree:
    """Read-only views of the incumbent's files for the model, confined to root (no '..', no symlinks out)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def resolve(self, path: str) -> Path:
        if not path.strip():
            raise ToolError("empty path")
        target = (self.root / path).resolve()
        if not target.is_relative_to(self.root):
            raise ToolError(f"{path}: outside the repository; paths are relative to its root")
        if ".git" in target.relative_to(self.root).parts:
            raise ToolError(f"{path}: inside .git")
        return target

    def files(self, pattern: str) -> list[Path]:
        """Files matching a glob, inside root after resolving symlinks, in path order."""
        try:
            candidates = sorted(self.root.glob(pattern or "**/*"))
        except (ValueError, NotImplementedError) as e:
            raise ToolError(f"bad glob {pattern!r}: {e}") from e
        found = []
        for path in candidates:
            real = path.resolve()
            if path.is_file() and real.is_relative_to(self.root) and ".git" not in real.relative_to(self.root).parts:
                found.append(path)
        return found

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def list_files(self, glob: str = "**/*") -> str:
        files = self.files(glob)
        lines = [f"{self.relative(p)} ({p.stat().st_size:,} bytes)" for p in files[:MAX_LISTED_FILES]]
        if len(files) > MAX_LISTED_FILES:
            lines.append(f"... {len(files) - MAX_LISTED_FILES} more: use a narrower glob")
        return "\n".join(lines) or f"no files match {glob!r}"

    def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        target = self.resolve(path)
        if not target.is_file():
            raise ToolError(f"{path}: no such file")
        data = target.read_bytes()
        if b"\0" in data[:8192]:
            raise ToolError(f"{path}: a binary file")
        lines = data.decode("utf-8", "replace").splitlines()
        start = max(1, start_line or 1)
        end = min(len(lines), end_line or len(lines))
        if start > end and lines:
            raise ToolError(f"{path}: lines {start}..{end} are empty; the file has {len(lines)} lines")
        body = "\n".join(lines[start - 1:end])
        return _cut_output(f"{path}: lines {start}-{end} of {len(lines)}\n{body}",
                           "read on with start_line")

    def grep(self, pattern: str, path_glob: str = "**/*") -> str:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ToolError(f"bad regular expression {pattern!r}: {e}") from e
        hits = []
        for path in self.files(path_glob):
            if path.stat().st_size > MAX_GREP_FILE_BYTES:
                continue
            data = path.read_bytes()
            if b"\0" in data[:8192]:
                continue
            for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
                if regex.search(line):
                    hits.append(f"{self.relative(path)}:{number}: {_cut(line, MAX_LINE_CHARS)}")
                    if len(hits) > MAX_GREP_MATCHES:
                        hits[-1] = f"... more than {MAX_GREP_MATCHES} matches: narrow the pattern or path_glob"
                        return "\n".join(hits)
        return _cut_output("\n".join(hits) or f"no match for {pattern!r}", "narrow the pattern")


# ---------------------------------------------------------------------------------------------------
# edits

def edit_body(edit: Edit) -> str:
    """The edit's blocks or diff, without prose after the last SEARCH/REPLACE block or a fence before the first."""
    lines = edit.body.rstrip("\n").split("\n")  # only newlines: a diff's last context line may be a lone space
    if edit.format == "search_replace":
        last = max(i for i, line in enumerate(lines) if REPLACE_MARKER.match(line.removesuffix("\r")))
        lines = lines[1:last + 1] if FENCE.match(lines[0]) else lines[:last + 1]
    return "\n".join(lines) + "\n"


def compose_edit(hypothesis: str, rationale: str, edit: str) -> str:
    """The contract's text: HYPOTHESIS (one line) + RATIONALE + the edit's body. EditError if it does not parse."""
    parsed = parse_edit(edit)
    hypothesis = " ".join((hypothesis or parsed.hypothesis).split())
    rationale = (rationale or parsed.rationale).strip()
    text = f"HYPOTHESIS: {hypothesis}\nRATIONALE: {rationale}\n\n{edit_body(parsed)}"
    parse_edit(text)  # a rationale that itself holds SEARCH markers would change the meaning
    return text


def edit_from_reply(reply: str) -> str:
    """The edit in a plain-text reply (prose and code fences around it are tolerated), recomposed."""
    edit = parse_edit(reply)
    return compose_edit(edit.hypothesis, edit.rationale, edit.body)


def check_edit(text: str, context: Context) -> None:
    """EditError unless the edit stays on editable paths and applies to the incumbent (tried on copies of
    the files it touches), so the model hears at once about a SEARCH that is not found."""
    edit = parse_edit(text)
    paths = edit.paths()
    violation = guard.path_violation(paths, context.editable, context.protected)
    if violation:
        raise EditError(violation)
    tree = Worktree(context.root)
    with tempfile.TemporaryDirectory(prefix="ratchet-check-") as scratch:
        for path in paths:
            try:
                source = tree.resolve(path)
            except ToolError as e:
                raise EditError(str(e)) from e
            if source.is_file():
                target = Path(scratch, path)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        apply_edit(edit, Path(scratch))


# ---------------------------------------------------------------------------------------------------
# the conversation

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


@dataclass
class _Session:
    """One proposal's conversation and tallies."""
    context: Context
    system: str
    tools: list[dict] | None   # tool specs offered; None in plain-text mode
    messages: list = field(default_factory=list)
    outbox: list[str] = field(default_factory=list)          # user text for the next request
    results: list[ToolResult] = field(default_factory=list)  # answers to the last reply's tool calls
    usage: Usage = field(default_factory=Usage)
    attempts: list[dict] = field(default_factory=list)
    smoked: dict[str, SmokeResult] = field(default_factory=dict)  # edit body -> result, to run each edit once
    tool_errors: int = 0       # malformed tool calls (bad JSON, missing fields, unknown tool)


def parse_retry_after(headers) -> float | None:
    """Seconds to wait from retry-after-ms, or retry-after in seconds or as an HTTP date; None if absent."""
    if headers is None:
        return None
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


@dataclass
class LLMProposer:
    """The shared loop. Subclasses set the ClassVars and implement _make_client, _send and _user_turn."""
    model: str = ""
    base_url: str | None = None        # None: the provider's (or $ANTHROPIC_BASE_URL / $OPENAI_BASE_URL)
    tools: bool = True                 # False: plain-text mode for models without tool support
    api_key_env: str = ""              # variable holding the key; "" = the provider's usual one
    max_turns: int = 12                # model calls to reach one edit (the first, and each fix); then one last ask
    max_output_tokens: int = 16_384    # per call; OpenAI reasoning tokens count against it
    max_total_tokens: int = 1_500_000  # per proposal: input (cached too) + output over all calls
    max_cost_usd_per_proposal: float = 2.0  # per proposal; models without a price count as free
    fix_attempts: int = 2              # smoke failures sent back for a fixed edit
    request_timeout_s: float = 600.0   # one HTTP request; a long reasoning reply takes minutes
    max_attempts: int = 6              # tries of one request, on 429 / 408 / 409 / 5xx / timeouts / connection errors
    max_retry_wait_s: float = 300.0    # total sleep across one request's retries; a longer retry-after gives up
    backoff_s: float = 2.0             # first backoff, doubled per retry, times a jitter in [0.5, 1]
    inline_files_bytes: int = 60_000   # editable files shown in the prompt up to this total; the rest by name
    prices: dict | None = None         # per-model price overrides, USD per million tokens (see prices.py)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)  # injectable for tests
    rng: random.Random = field(default_factory=random.Random, repr=False)  # backoff jitter
    _client: object = field(default=None, init=False, repr=False)

    provider: ClassVar[str] = ""           # "anthropic", "openai": the name's prefix
    default_key_env: ClassVar[str] = ""
    base_url_env: ClassVar[str] = ""
    sdk_error: ClassVar[type] = Exception  # the SDK's base error, its status error, its connection error
    status_error: ClassVar[type] = Exception
    connection_error: ClassVar[type] = Exception

    def __post_init__(self):
        for name in ("max_turns", "max_output_tokens", "max_total_tokens", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.provider} proposer: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("fix_attempts", "max_cost_usd_per_proposal", "max_retry_wait_s", "backoff_s",
                     "inline_files_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{self.provider} proposer: {name} must be >= 0, got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"{self.provider} proposer: request_timeout_s must be > 0, got {self.request_timeout_s}")
        self._price = price_for(self.model, self.prices)  # PriceError on a malformed override
        if self._price is None:
            log.warning("%s: no price for model %r, its cost is counted as 0 (add it to prices)", self.name, self.model)

    @property
    def name(self) -> str:
        return f"{self.provider}:{self.model}"

    # ------------------------------------------------------------------ provider hooks
    def _make_client(self, api_key: str, base_url: str | None):
        raise NotImplementedError

    def _send(self, client, system: str, messages: list, tools: list[dict] | None, tools_allowed: bool) -> Reply:
        """One request, no retries; SDK errors propagate."""
        raise NotImplementedError

    def _user_turn(self, results: list[ToolResult], text: str) -> list[dict]:
        """Message(s) carrying the tool results, then the text (either may be empty)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ propose
    def propose(self, context: Context) -> Proposal:
        session = _Session(context, system_prompt(context, self.tools, self.inline_files_bytes),
                           tool_specs(context.smoke is not None) if self.tools else None)
        try:
            text = self._ask(session, context_message(context, self.tools))
            text = self._smoke_and_fix(session, text)
            return Proposal(text=text, proposer=self.name, hypothesis=parse_edit(text).hypothesis,
                            usage=session.usage, attempts=session.attempts)
        except ProposalFailed as e:
            error = self._scrub(str(e))
        except Exception as e:  # a bug or an SDK surprise must not end the night: record it
            log.exception("%s: propose failed", self.name)
            error = self._scrub(f"proposer crashed: {type(e).__name__}: {e}")
        log.warning("%s: no proposal: %s", self.name, error)
        return Proposal(text="", proposer=self.name, usage=session.usage, attempts=session.attempts, error=error)

    def _ask(self, s: _Session, text: str) -> str:
        """Say text and converse until the model hands in an edit that parses and applies. In tool mode the
        model gets max_turns calls, then one plain-text ask; in plain mode one reply, then one correction."""
        s.outbox.append(text)
        why, problem, nudge = "", "", ""
        for _ in range(self.max_turns if s.tools else 1):
            if why := self._over_budget(s):
                break
            if nudge:  # sent only if the loop goes on, so it never contradicts the final ask
                s.outbox.append(nudge)
                nudge = ""
            reply = self._call(s, tools_allowed=True)
            if s.tools and reply.calls:
                if edit := self._run_calls(s, reply.calls):
                    return edit
                continue
            try:
                return self._edit_in_text(s, reply)
            except EditError as e:
                problem, nudge = str(e), NO_EDIT_IN_TEXT.format(error=e)
        if s.tools:
            why = why or f"turn limit ({self.max_turns} calls)"
            s.outbox.append(FINAL_ASK.format(why=why))
        elif problem:
            why = "a reply without a usable edit"
            s.outbox.append(CORRECTION.format(error=problem))
        else:
            raise ProposalFailed(f"no edit: {why}")
        reply = self._call(s, tools_allowed=False)
        try:
            return self._edit_in_text(s, reply)
        except EditError as e:
            malformed = f", {s.tool_errors} malformed tool calls" if s.tool_errors else ""
            raise ProposalFailed(f"no valid edit after {why}{malformed}; last reply: {e}") from e

    def _edit_in_text(self, s: _Session, reply: Reply) -> str:
        for call in reply.calls:  # a tool call we will not run still needs an answer in the next user turn
            s.results.append(ToolResult(call.id, "not run: tools are off now", is_error=True))
        text = edit_from_reply(reply.text)
        check_edit(text, s.context)
        return text

    def _smoke_and_fix(self, s: _Session, text: str) -> str:
        """The last edit that passed the smoke check, or the last one tried (its failure is in attempts)."""
        if s.context.smoke is None:
            return text
        for fix in range(self.fix_attempts + 1):
            result = self._smoke(s, text)
            if result.ok or fix == self.fix_attempts or self._over_budget(s):
                return text
            try:
                text = self._ask(s, SMOKE_FAILED.format(n=fix + 1, total=self.fix_attempts, tail=result.log_tail))
            except ProposalFailed as e:
                log.warning("%s: no fixed edit: %s", self.name, self._scrub(str(e)))
                return text
        return text

    def _smoke(self, s: _Session, text: str) -> SmokeResult:
        """Run the loop's smoke check once per distinct edit; every run is recorded in attempts."""
        key = edit_body(parse_edit(text))  # the same edit with other prose around it is not run again
        if key not in s.smoked:
            try:
                result = s.context.smoke(text)
            except Exception as e:  # the check is the harness's code; its failure is this edit's failure
                result = SmokeResult(False, f"smoke check raised {type(e).__name__}: {e}")
            result = SmokeResult(result.ok, result.log_tail[-LOG_TAIL_CHARS:])
            s.smoked[key] = result
            s.attempts.append({"edit": text, "ok": result.ok, "log_tail": result.log_tail})
        return s.smoked[key]

    # ------------------------------------------------------------------ tools
    def _run_calls(self, s: _Session, calls: list[ToolCall]) -> str:
        """Answer each call (into s.results); the edit of a valid submit_edit, or ""."""
        specs = {spec["name"]: spec for spec in s.tools}
        edit = ""
        for call in calls:
            try:
                if call.arguments is None:
                    raise ToolError(f"{call.name}: {call.problem}")
                if call.name not in specs:
                    raise ToolError(f"unknown tool {call.name!r}; the tools are {', '.join(specs)}")
                arguments = check_arguments(specs[call.name], call.arguments)
            except ToolError as e:
                s.tool_errors += 1
                s.results.append(ToolResult(call.id, f"error: {e}", is_error=True))
                continue
            try:
                content = self._run_tool(s, call.name, arguments)
            except (ToolError, EditError) as e:
                s.results.append(ToolResult(call.id, f"error: {e}", is_error=True))
                continue
            if call.name == "submit_edit":
                edit = content
                content = "Edit received."
            s.results.append(ToolResult(call.id, content))
        return edit

    def _run_tool(self, s: _Session, name: str, arguments: dict) -> str:
        tree = Worktree(s.context.root)
        if name == "list_files":
            return tree.list_files(**arguments)
        if name == "read_file":
            return tree.read_file(**arguments)
        if name == "grep":
            return tree.grep(**arguments)
        if name == "run_smoke":
            parse_edit(arguments["edit"])  # a malformed edit costs no smoke run
            result = self._smoke(s, arguments["edit"])
            return f"ok: {str(result.ok).lower()}\n{result.log_tail}"
        text = compose_edit(arguments["hypothesis"], arguments["rationale"], arguments["edit"])  # submit_edit
        check_edit(text, s.context)
        return text

    # ------------------------------------------------------------------ requests
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
            self._client = self._make_client(key, base_url)
        return self._client

    def _scrub(self, text: str) -> str:
        """text without the API key (this proposer's variable, whatever its name) or any secret variable's value."""
        key = os.environ.get(self.api_key_env or self.default_key_env, "")
        if len(key) >= 4:
            text = text.replace(key, "[redacted]")
        return redact(text)

    def _over_budget(self, s: _Session) -> str:
        u = s.usage
        tokens = u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens
        if tokens >= self.max_total_tokens:
            return f"token budget ({tokens:,} of {self.max_total_tokens:,} tokens)"
        if self.max_cost_usd_per_proposal and u.cost_usd >= self.max_cost_usd_per_proposal:
            return f"cost budget (${u.cost_usd:.2f} of ${self.max_cost_usd_per_proposal:.2f})"
        return ""

    def _call(self, s: _Session, tools_allowed: bool) -> Reply:
        """Send the pending tool results and text, get one reply (with retries), and tally its usage."""
        if s.results or s.outbox:
            s.messages += self._user_turn(s.results, "\n\n".join(s.outbox))
            s.results, s.outbox = [], []
        client = self._client_or_fail()
        reply = self._with_retries(lambda: self._send(client, s.system, s.messages, s.tools, tools_allowed))
        if self._price is not None:
            reply.usage.cost_usd = self._price.cost(reply.usage)
        s.usage.add(reply.usage)
        s.messages.append(reply.message)
        return reply

    def _with_retries(self, send: Callable[[], Reply]) -> Reply:
        waited = 0.0
        for attempt in range(1, self.max_attempts + 1):
            try:
                return send()
            except self.sdk_error as e:
                failure, retry_after = self._classify(e)
            wait = retry_after if retry_after is not None else \
                self.backoff_s * 2 ** (attempt - 1) * self.rng.uniform(0.5, 1.0)
            if attempt == self.max_attempts or waited + wait > self.max_retry_wait_s:
                raise ProposalFailed(f"{failure} (gave up after {attempt} attempts and {waited:.1f}s of waiting)")
            log.warning("%s: %s; retry %d of %d in %.1fs", self.name, self._scrub(failure), attempt,
                        self.max_attempts - 1, wait)
            self.sleep(wait)
            waited += wait

    def _classify(self, e: Exception) -> tuple[str, float | None]:
        """(what failed, the server's retry-after) for a retryable error; ProposalFailed for any other."""
        if isinstance(e, self.status_error):
            status = e.status_code
            body = e.body if isinstance(e.body, dict) else {}
            detail = body["error"] if isinstance(body.get("error"), dict) else body  # Anthropic nests it, OpenAI not
            message = _cut(detail.get("message") or e.message, 300)
            failure = f"rate limited: 429 {message}" if status == 429 else f"API error {status}: {message}"
            if status not in RETRY_STATUSES and status < 500:
                raise ProposalFailed(failure) from e
            return failure, parse_retry_after(e.response.headers)
        if isinstance(e, self.connection_error):  # timeouts are connection errors in both SDKs
            return f"API {type(e).__name__}: {_cut(str(e), 300)}", None
        raise ProposalFailed(f"API client error {type(e).__name__}: {_cut(str(e), 300)}") from e
