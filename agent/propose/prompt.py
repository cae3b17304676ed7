"""What an LLM proposer is told: the texts in prompts/, filled from a Context.

The prompt has a stable part first (the task, the rules, the hardware, the edit format, the editable files: it
changes only when an edit is accepted, so providers can cache it) and then, in the first user message, what
changes from one proposal to the next (the incumbent's numbers, the history, the edits being tried now).
The wording lives in prompts/*.txt, beside this code, so it can be read and changed as text.
"""
import functools
import re
from importlib import resources

from agent.propose.base import Context
from agent.propose.history_text import FIELD_CHARS, cut, history_lines

PROMPTS = resources.files(__package__) / "prompts"  # shipped as package data (pyproject.toml)
# history in the prompt: enough to learn from, bounded so a long night does not outgrow the context window
HISTORY_ROWS = 150              # newest ledger rows shown
NOTES_SHOWN = 5                 # the model's latest notes shown
SUMMARY_EVERY = 10              # every this many experiments the model is asked to sum up what was learned


@functools.cache
def _read(name: str) -> str:
    return (PROMPTS / f"{name}.txt").read_text(encoding="utf-8").removesuffix("\n")


EDIT_FORMAT = _read("edit_format")


def prompt_text(name: str, **fields) -> str:
    """prompts/<name>.txt without its final newline, its {fields} filled in ({edit_format}: the edit format)."""
    return _read(name).format(edit_format=EDIT_FORMAT, **fields)


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
    if tools:
        smoke = " " + prompt_text("smoke_tool") if context.smoke else ""
        reply = prompt_text("tool_instructions", smoke=smoke)
    else:
        reply = prompt_text("plain_instructions")
    parts = [prompt_text("system", rules=context.rules.strip(), hardware=context.hardware.strip(),
                         editable=", ".join(context.editable), protected=", ".join(context.protected), reply=reply)]
    shown, listed = _shown_files(context.files, inline_files_bytes)
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


def _hint_line(hint: dict) -> str:
    tried = f" [tried: {hint['tried']}]" if hint.get("tried") else ""
    effect = f" ({cut(hint['effect'], FIELD_CHARS)})" if hint.get("effect") else ""
    return f"- {hint['name']}: {cut(hint['idea'], FIELD_CHARS)}{effect}{tried}"


def context_message(context: Context, tools: bool) -> str:
    """The first user message: what changes from one proposal to the next: the incumbent and the evidence on it,
    known ideas, the history, the model's notes, the edits being tried now."""
    incumbent = "\n".join(f"{key}: {_value(value)}" for key, value in context.incumbent.items()
                          if value not in (None, "", []))
    parts = [f"# The incumbent\n{incumbent or '(no measurements yet)'}"]
    parts += [f"# {title}\n{text.strip()}" for title, text in context.evidence.items() if text.strip()]
    if context.hints:
        parts.append("# Known ideas (the NanoGPT speedrun's; effects measured elsewhere unless said)\n"
                     + "\n".join(_hint_line(hint) for hint in context.hints))
    rows = context.history[-HISTORY_ROWS:]
    if rows:
        older = len(context.history) - len(rows)
        head = f"# Experiments so far, oldest first ({older} older ones not shown)" if older else \
            "# Experiments so far, oldest first"
        parts.append(head + "\n" + "\n".join(history_lines(rows)))
        parts.append(prompt_text("learn_from_history"))
    else:
        parts.append("# Experiments so far\nNone yet.")
    if context.notes:
        parts.append("# Your notes from earlier proposals, oldest first\n"
                     + "\n".join(f"- {cut(note, 4 * FIELD_CHARS)}" for note in context.notes[-NOTES_SHOWN:]))
    if context.pending:
        parts.append("# Being tried now (do not propose these again)\n" + "\n".join(
            f"- {cut(p.get('hypothesis'), FIELD_CHARS)}" for p in context.pending))
    ask = prompt_text("ask_with_tools" if tools else "ask_plain")
    if tools and context.history and len(context.history) % SUMMARY_EVERY == 0:
        ask += " " + prompt_text("ask_for_summary")
    parts.append(ask)
    return "\n\n".join(parts)
