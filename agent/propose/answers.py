"""A model's answer made into the contract's edit text, and checked before it is handed in.

Models wrap edits in prose and fences, or split them into submit_edit's fields; every answer is recomposed into
one form (HYPOTHESIS, RATIONALE, the blocks or diff) and checked against the incumbent at once, so the model hears
about a protected path or a SEARCH that is not found while it can still fix it.
"""
from pathlib import Path

from agent.edit.apply import dry_run
from agent.edit.parse import FENCE, REPLACE_MARKER, Edit, EditError, parse_edit
from agent.guard import integrity
from agent.propose.base import Context


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
    """EditError unless the edit stays on editable paths and applies to the incumbent (a dry run)."""
    edit = parse_edit(text)
    violation = integrity.path_violation(edit.paths(), context.editable, context.protected)
    if violation:
        raise EditError(violation)
    dry_run(edit, Path(context.root))
