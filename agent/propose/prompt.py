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

PROMPTS = resources.files(__package__) / "prompts"  # shipped as package data (pyproject.toml)
# history in the prompt: enough to learn from, bounded so a long night does not outgrow the context window
HISTORY_ROWS = 150              # newest ledger rows shown
HISTORY_FIELD_CHARS = 240       # a row's hypothesis or reason is cut here
HISTORY_DIFF_CHARS = 6_000      # an accepted experiment's diff is cut here


@functools.cache
def _read(name: str) -> str:
    return (PROMPTS / f"{name}.txt").read_text(encoding="utf-8").removesuffix("\n")


EDIT_FORMAT = _read("edit_format")


def prompt_text(name: str, **fields) -> str:
    """prompts/<name>.txt without its final newline, its {fields} filled in ({edit_format}: the edit format)."""
    return _read(name).format(edit_format=EDIT_FORMAT, **fields)


def cut(text: str, limit: int) -> str:
    """text on one line (whitespace runs made single spaces), at most limit characters."""
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


def _history_line(row: dict) -> str:
    line = f"- {row.get('id', '?')} {row.get('decision', '?')}: {cut(row.get('hypothesis'), HISTORY_FIELD_CHARS)}"
    if row.get("reason"):
        line += f" | {cut(row['reason'], HISTORY_FIELD_CHARS)}"
    if isinstance(row.get("speedup"), (int, float)):
        line += f" | speedup {row['speedup']:+.1%}"
    if isinstance(row.get("val_loss"), (int, float)):
        line += f" | val loss {row['val_loss']:.4f}"
    return line


def _accepted_diff(row: dict) -> str:
    """An accepted experiment's diff, fenced, cut at HISTORY_DIFF_CHARS."""
    diff = row["diff"]
    if len(diff) > HISTORY_DIFF_CHARS:
        diff = diff[:HISTORY_DIFF_CHARS] + "\n... (diff cut)"
    fence = _fence(diff)
    return (f"## Accepted {row.get('id', '?')}: {cut(row.get('hypothesis'), HISTORY_FIELD_CHARS)}"
            f"\n{fence}diff\n{diff.rstrip()}\n{fence}")


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
        parts += [_accepted_diff(row) for row in rows if row.get("decision") == "accepted" and row.get("diff")]
        parts.append(prompt_text("learn_from_history"))
    else:
        parts.append("# Experiments so far\nNone yet.")
    if context.pending:
        parts.append("# Being tried now (do not propose these again)\n" + "\n".join(
            f"- {cut(p.get('hypothesis'), HISTORY_FIELD_CHARS)}" for p in context.pending))
    parts.append(prompt_text("ask_with_tools" if tools else "ask_plain"))
    return "\n\n".join(parts)
