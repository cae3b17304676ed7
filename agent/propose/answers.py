"""A model's answer made into the contract's edit text, and checked before it is handed in.

Models wrap edits in prose and fences, or split them into submit_edit's fields; every answer is recomposed into
one form (HYPOTHESIS, RATIONALE, the blocks or diff) and checked against the incumbent at once, so the model hears
about a protected path, a SEARCH that is not found, an edit that changes nothing or one the static policy rejects
while it can still fix it, instead of spending an experiment on it.
"""
import tempfile
from pathlib import Path

from agent.edit.apply import dry_run
from agent.edit.parse import FENCE, HEADER_LABEL, REPLACE_MARKER, Edit, EditError, parse_edit
from agent.guard import integrity, policy
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


def _holds_edit(text: str) -> bool:
    try:
        parse_edit(text)
    except EditError:
        return False
    return True


def edits_in_reply(reply: str) -> list[str]:
    """The reply split into the edits it holds, one per HYPOTHESIS line that opens a part with blocks or a diff of
    its own: parse_edit would merge them all under the first hypothesis. A part without an edit (a hypothesis
    stated in prose first) stays with the edit after it, trailing prose with the edit before it; a reply with no
    part that parses on its own is returned whole, for parse_edit to say what is wrong with it."""
    lines = reply.split("\n")
    starts = [i for i, line in enumerate(lines)
              if (label := HEADER_LABEL.match(line)) and label.group(1).lower() == "hypothesis"]
    bounds = [0, *[i for i in starts if i > 0], len(lines)]
    edits, pending = [], []
    for begin, end in zip(bounds, bounds[1:]):
        pending += lines[begin:end]
        if _holds_edit("\n".join(lines[begin:end])):
            edits.append("\n".join(pending))
            pending = []
    if not edits:
        return [reply]
    if pending:
        edits[-1] += "\n" + "\n".join(pending)
    return edits


def edit_from_reply(reply: str) -> tuple[str, int]:
    """The first edit in a plain-text reply (prose and code fences around it are tolerated), recomposed, and how
    many more edits the reply held (not taken: one idea per edit, so each is judged on its own)."""
    first, *more = edits_in_reply(reply)
    edit = parse_edit(first)
    return compose_edit(edit.hypothesis, edit.rationale, edit.body), len(more)


def check_edit(text: str, context: Context) -> None:
    """EditError unless the edit stays on editable paths, applies to the incumbent, changes something there, and
    passes the static policy (the harness's own checks, run on a scratch copy)."""
    edit = parse_edit(text)
    violation = integrity.path_violation(edit.paths(), context.editable, context.protected)
    if violation:
        raise EditError(violation)
    incumbent = Path(context.root)
    with tempfile.TemporaryDirectory(prefix="ratchet-check-") as tmp:
        scratch = Path(tmp) / "tree"
        changed = [path for path in dry_run(edit, incumbent, scratch) if _differs(incumbent, scratch, path)]
        if not changed:
            raise EditError("this edit changes nothing: every file it touches comes out as it was (the new text "
                            "equals the old)")
        rejected = policy.rejecting(policy.check_files(scratch, changed, old_root=incumbent))
    if rejected:
        raise EditError("the static policy rejects it:\n" + policy.format_findings(rejected))


def _differs(old_root: Path, new_root: Path, path: str) -> bool:
    """Whether path's bytes differ between the trees (a missing file reads as none): a diff that applies may still
    put back what it takes out."""
    old, new = old_root / path, new_root / path
    return (old.read_bytes() if old.is_file() else None) != (new.read_bytes() if new.is_file() else None)
