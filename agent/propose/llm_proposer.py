"""The LLM proposers' conversation: from a Context to one checked edit, through tools, smoke runs and fixes.

  tool loop   list_files / read_file / grep over the incumbent, run_smoke, and submit_edit, which ends the loop;
              bounded by turns, tokens and cost, then one plain-text ask
  plain mode  one request, the reply is the edit; one corrective follow-up if it does not parse
  smoke/fix   a submitted edit that fails the smoke check goes back with its log, at most `fix_attempts` times

propose() never raises: every failure is a Proposal with `error` set, its text scrubbed of keys. The wire format
and the requests are the provider's (chat_api.py); the wording is in prompts/ (prompt.py).
"""
import logging
from dataclasses import dataclass, field

from agent.edit.parse import EditError, parse_edit
from agent.propose.answers import check_edit, compose_edit, edit_body, edit_from_reply
from agent.propose.base import Context, Proposal, SmokeResult, Usage
from agent.propose.chat_api import ChatAPI, ProposalFailed, Reply, ToolCall, ToolResult
from agent.propose.prices import price_for
from agent.propose.prompt import context_message, prompt_text, system_prompt
from agent.propose.tools import READ_TOOLS, ToolError, Worktree, check_arguments, tool_specs

log = logging.getLogger(__name__)

LOG_TAIL_CHARS = 4_000  # smoke log tail kept in attempts and sent back to the model


@dataclass
class Session:
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


@dataclass
class LLMProposer(ChatAPI):
    """The shared loop. Providers subclass it through ChatAPI's hooks."""
    tools: bool = True                 # False: plain-text mode for models without tool support
    max_turns: int = 12                # model calls to reach one edit (the first, and each fix); then one last ask
    max_total_tokens: int = 1_500_000  # per proposal: input (cached too) + output over all calls
    max_cost_usd_per_proposal: float = 2.0  # per proposal; models without a price count as free
    fix_attempts: int = 2              # smoke failures sent back for a fixed edit
    inline_files_bytes: int = 60_000   # editable files shown in the prompt up to this total; the rest by name
    prices: dict | None = None         # per-model price overrides, USD per million tokens (see prices.py)

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_turns", "max_total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.provider} proposer: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("fix_attempts", "max_cost_usd_per_proposal", "inline_files_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{self.provider} proposer: {name} must be >= 0, got {getattr(self, name)}")
        self._price = price_for(self.model, self.prices)  # PriceError on a malformed override
        if self._price is None:
            log.warning("%s: no price for model %r, its cost is counted as 0 (add it to prices)", self.name, self.model)

    def propose(self, context: Context) -> Proposal:
        session = Session(context, system_prompt(context, self.tools, self.inline_files_bytes),
                          tool_specs(context.smoke is not None) if self.tools else None)
        try:
            text = self._ask(session, context_message(context, self.tools))
            text = self._smoke_and_fix(session, text)
            return Proposal(text=text, proposer=self.name, hypothesis=parse_edit(text).hypothesis,
                            usage=session.usage, attempts=session.attempts)
        except ProposalFailed as e:
            error = self.scrub(str(e))
        except Exception as e:  # a bug or an SDK surprise must not end the night: record it
            log.exception("%s: propose failed", self.name)
            error = self.scrub(f"proposer crashed: {type(e).__name__}: {e}")
        log.warning("%s: no proposal: %s", self.name, error)
        return Proposal(text="", proposer=self.name, usage=session.usage, attempts=session.attempts, error=error)

    def _ask(self, s: Session, text: str) -> str:
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
                problem, nudge = str(e), prompt_text("no_edit_in_text", error=e)
        if s.tools:
            why = why or f"turn limit ({self.max_turns} calls)"
            s.outbox.append(prompt_text("final_ask", why=why))
        elif problem:
            why = "a reply without a usable edit"
            s.outbox.append(prompt_text("correction", error=problem))
        else:
            raise ProposalFailed(f"no edit: {why}")
        reply = self._call(s, tools_allowed=False)
        try:
            return self._edit_in_text(s, reply)
        except EditError as e:
            malformed = f", {s.tool_errors} malformed tool calls" if s.tool_errors else ""
            raise ProposalFailed(f"no valid edit after {why}{malformed}; last reply: {e}") from e

    def _edit_in_text(self, s: Session, reply: Reply) -> str:
        for call in reply.calls:  # a tool call we will not run still needs an answer in the next user turn
            s.results.append(ToolResult(call.id, "not run: tools are off now", is_error=True))
        text = edit_from_reply(reply.text)
        check_edit(text, s.context)
        return text

    def _smoke_and_fix(self, s: Session, text: str) -> str:
        """The last edit that passed the smoke check, or the last one tried (its failure is in attempts)."""
        if s.context.smoke is None:
            return text
        for fix in range(self.fix_attempts + 1):
            result = self._smoke(s, text)
            if result.ok or fix == self.fix_attempts or self._over_budget(s):
                return text
            try:
                text = self._ask(s, prompt_text("smoke_failed", n=fix + 1, total=self.fix_attempts,
                                                tail=result.log_tail))
            except ProposalFailed as e:
                log.warning("%s: no fixed edit: %s", self.name, self.scrub(str(e)))
                return text
        return text

    def _smoke(self, s: Session, text: str) -> SmokeResult:
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

    def _run_calls(self, s: Session, calls: list[ToolCall]) -> str:
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

    def _run_tool(self, s: Session, name: str, arguments: dict) -> str:
        if name in READ_TOOLS:
            return Worktree(s.context.root).run(name, arguments)
        if name == "run_smoke":
            parse_edit(arguments["edit"])  # a malformed edit costs no smoke run
            result = self._smoke(s, arguments["edit"])
            return f"ok: {str(result.ok).lower()}\n{result.log_tail}"
        text = compose_edit(arguments["hypothesis"], arguments["rationale"], arguments["edit"])  # submit_edit
        check_edit(text, s.context)
        return text

    def _over_budget(self, s: Session) -> str:
        u = s.usage
        tokens = u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens
        if tokens >= self.max_total_tokens:
            return f"token budget ({tokens:,} of {self.max_total_tokens:,} tokens)"
        if self.max_cost_usd_per_proposal and u.cost_usd >= self.max_cost_usd_per_proposal:
            return f"cost budget (${u.cost_usd:.2f} of ${self.max_cost_usd_per_proposal:.2f})"
        return ""

    def _call(self, s: Session, tools_allowed: bool) -> Reply:
        """Send the pending tool results and text, get one reply, and tally its usage and cost."""
        if s.results or s.outbox:
            s.messages += self._user_turn(s.results, "\n\n".join(s.outbox))
            s.results, s.outbox = [], []
        reply = self.request(s.system, s.messages, s.tools, tools_allowed)
        if self._price is not None:
            reply.usage.cost_usd = self._price.cost(reply.usage)
        s.usage.add(reply.usage)
        s.messages.append(reply.message)
        return reply
