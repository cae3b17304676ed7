"""The LLM proposers' conversation: from a Context to one checked edit, through tools, smoke runs and fixes.

  tool loop   list_files / read_file / grep over the incumbent, show_experiment, run_smoke, profile, and
              submit_edit, which ends the loop; bounded by turns, tokens and cost, then one plain-text ask
  plain mode  one request, the reply is the edit; one corrective follow-up if it does not parse
  smoke/fix   a submitted edit that fails the smoke check goes back with its log, at most `fix_attempts` times
  rebase      a queued edit that an accepted one made stale goes back with the error, for the same idea rewritten

One edit per reply: a second submit_edit call, or a second edit in a plain reply, is not taken, and the model is
told so. A reply cut at max_output_tokens is named as such; two refusals or empty replies in a row end the
proposal. propose() raises only ProposerFatal (a refused key, an unknown model: no later request would do
better); every other failure is a Proposal with `error` set, its text scrubbed of keys. The wire format and the
requests are the provider's (chat_api.py); the wording is in prompts/ (prompt.py).
"""
import logging
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from agent.edit.parse import EditError, parse_edit
from agent.propose.answers import check_edit, compose_edit, edit_body, edit_from_reply
from agent.propose.base import Context, Proposal, SmokeResult, Usage
from agent.propose.chat_api import (MAX_TOKENS, REFUSAL, Ask, ChatAPI, ProposalFailed, ProposerFatal, Reply, ToolCall,
                                    ToolResult)
from agent.propose.prices import price_for
from agent.propose.prompt import context_message, prompt_text, system_prompt
from agent.propose.tools import READ_TOOLS, ToolError, Worktree, check_arguments, tool_specs

log = logging.getLogger(__name__)

LOG_TAIL_CHARS = 4_000  # smoke log tail kept in attempts and sent back to the model
THINKING = ("auto", "on", "off")
SILENCES_IN_A_ROW = 2   # refusals or empty replies in a row that end a proposal: asking again gets the same


@dataclass
class Session:
    """One proposal's conversation and tallies."""
    context: Context
    system: str
    tools: list[dict] | None   # tool specs offered; None in plain-text mode
    think: bool = False        # extended thinking / reasoning effort on for this conversation
    messages: list = field(default_factory=list)
    outbox: list[str] = field(default_factory=list)          # user text for the next request
    results: list[ToolResult] = field(default_factory=list)  # answers to the last reply's tool calls
    usage: Usage = field(default_factory=Usage)
    attempts: list[dict] = field(default_factory=list)
    smoked: dict[str, SmokeResult] = field(default_factory=dict)  # edit body -> result, to run each edit once
    tool_errors: int = 0       # malformed tool calls (bad JSON, missing fields, unknown tool)
    silences: list[str] = field(default_factory=list)  # the latest replies in a row that said nothing: why
    notes: str = ""            # submit_edit's notes with the edit taken


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
    thinking: str = "auto"             # "on", "off", or "auto": on for models that think when runs are long
    # "auto" thinks when the incumbent's run takes this long: an experiment then costs many runs of it, far more
    # than the thinking's tokens and minutes, so a better proposal pays
    think_above_s: float = 600.0

    thinking_models: ClassVar[tuple[str, ...]] = ()  # model-name prefixes that take the provider's thinking setting
    reads_profile: ClassVar[bool] = True  # the loop profiles the incumbent for it (the catalog reads no evidence)

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_turns", "max_total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.provider} proposer: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("fix_attempts", "max_cost_usd_per_proposal", "inline_files_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{self.provider} proposer: {name} must be >= 0, got {getattr(self, name)}")
        if self.thinking not in THINKING:
            raise ValueError(f"{self.provider} proposer: thinking must be one of {', '.join(THINKING)}, "
                             f"got {self.thinking!r}")
        self._price = price_for(self.model, self.prices)  # PriceError on a malformed override
        if self._price is None:
            log.warning("%s: no price for model %r, its cost is counted as 0 (add it to prices)", self.name, self.model)

    @property
    def priced(self) -> bool:
        """Whether this model's spend is counted: without a price, spend budgets cannot work."""
        return self._price is not None

    def propose(self, context: Context) -> Proposal:
        return self._converse(context, context_message(context, self.tools))

    def rebase(self, proposal: Proposal, context: Context, problem: str) -> Proposal:
        """`proposal` rewritten for the current head, which an accepted edit has changed since it was made
        (`problem`: why it no longer passes the check there): one short conversation given the old edit and the
        error, whose edit is checked and smoke-tested like a new proposal's."""
        how = "call submit_edit with it" if self.tools else "reply with the edit only"
        return self._converse(context, prompt_text("rebase", edit=proposal.text.strip(), error=problem, how=how))

    def _converse(self, context: Context, first: str) -> Proposal:
        """The conversation that starts with `first`, to a checked (and smoke-tested) edit, or a failed Proposal."""
        session = Session(context, system_prompt(context, self.tools, self.inline_files_bytes),
                          tool_specs(context) if self.tools else None, self._thinks(context))
        try:
            text = self._ask(session, first)
            text = self._smoke_and_fix(session, text)
            return Proposal(text=text, proposer=self.name, hypothesis=parse_edit(text).hypothesis,
                            usage=session.usage, attempts=session.attempts, notes=session.notes)
        except ProposalFailed as e:
            error = self.scrub(str(e))
        except ProposerFatal:
            raise  # the loop's to stop on
        except Exception as e:  # a bug or an SDK surprise must not end the night: record it
            log.exception("%s: propose failed", self.name)
            error = self.scrub(f"proposer crashed: {type(e).__name__}: {e}")
        log.warning("%s: no proposal: %s", self.name, error)
        return Proposal(text="", proposer=self.name, usage=session.usage, attempts=session.attempts, error=error)

    def _thinks(self, context: Context) -> bool:
        if self.thinking != "auto":
            return self.thinking == "on"
        seconds = context.incumbent.get("seconds") or 0.0
        return seconds >= self.think_above_s and self.model.startswith(self.thinking_models)

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
                self._name_the_cut(s, reply)
                continue
            try:
                return self._edit_in_text(s, reply)
            except EditError as e:
                self._name_the_cut(s, reply)
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
            cut = f" (cut at max_output_tokens={self.max_output_tokens})" if reply.stop == MAX_TOKENS else ""
            raise ProposalFailed(f"no valid edit after {why}{malformed}; last reply{cut}: {e}") from e

    def _name_the_cut(self, s: Session, reply: Reply) -> None:
        """A reply that stopped at the output limit without a usable edit: say so, or the model sends the same
        long reply again and is cut at the same place."""
        if reply.stop == MAX_TOKENS:
            s.outbox.append(prompt_text("truncated", limit=self.max_output_tokens))

    def _edit_in_text(self, s: Session, reply: Reply) -> str:
        for call in reply.calls:  # a tool call we will not run still needs an answer in the next user turn
            s.results.append(ToolResult(call.id, "not run: tools are off now", is_error=True))
        text, more = edit_from_reply(reply.text)
        check_edit(text, s.context)
        if more:  # told in the next message, if the conversation goes on (a smoke failure)
            s.outbox.append(prompt_text("one_edit", more=more))
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
        """Answer each call (into s.results); the edit of the first valid submit_edit, or ""."""
        specs = {spec["name"]: spec for spec in s.tools}
        edit = ""
        for call in calls:
            if edit and call.name == "submit_edit":  # one idea per edit: each is judged on its own
                s.results.append(ToolResult(call.id, prompt_text("one_edit", more=1), is_error=True))
                continue
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
                edit, s.notes = content, arguments.get("notes", "")
                content = "Edit received."
            s.results.append(ToolResult(call.id, content))
        return edit

    def _run_tool(self, s: Session, name: str, arguments: dict) -> str:
        if name in READ_TOOLS:
            return Worktree(s.context.root).run(name, arguments)
        if name == "show_experiment":
            return self._service(name, s.context.show_experiment, arguments["id"])
        if name == "run_smoke":
            parse_edit(arguments["edit"])  # a malformed edit costs no smoke run
            result = self._smoke(s, arguments["edit"])
            return f"ok: {str(result.ok).lower()}\n{result.log_tail}"
        if name == "profile":
            if arguments["edit"].strip():  # empty: the incumbent's own profile
                parse_edit(arguments["edit"])  # a malformed edit costs no profile run
            return self._service(name, s.context.profile, arguments["edit"])
        text = compose_edit(arguments["hypothesis"], arguments["rationale"], arguments["edit"])  # submit_edit
        check_edit(text, s.context)
        return text

    def _service(self, name: str, service: Callable[[str], str], argument: str) -> str:
        """One of the loop's services (show_experiment, profile); its failure is a tool error the model can work
        around, its text scrubbed: it goes to the provider."""
        try:
            return service(argument)
        except Exception as e:
            raise ToolError(self.scrub(f"{name} failed: {type(e).__name__}: {e}")) from e

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
        reply = self.request(Ask(s.system, s.messages, s.tools, tools_allowed, self.max_output_tokens, s.think))
        if self._price is not None:
            reply.usage.cost_usd = self._price.cost(reply.usage)
        s.usage.add(reply.usage)
        s.messages.append(reply.message)
        self._count_silence(s, reply)
        return reply

    @staticmethod
    def _count_silence(s: Session, reply: Reply) -> None:
        """ProposalFailed at the second refusal or empty reply in a row: a model that declines declines again,
        and every further call costs the whole conversation's input."""
        if reply.stop != REFUSAL and (reply.text.strip() or reply.calls):
            s.silences.clear()
            return
        s.silences.append("a refusal" if reply.stop == REFUSAL else "an empty reply")
        if len(s.silences) >= SILENCES_IN_A_ROW:
            raise ProposalFailed(f"no edit: {' then '.join(s.silences)}, in a row")
