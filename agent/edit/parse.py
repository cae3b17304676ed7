"""The edit format: proposer text parsed into an Edit, SEARCH/REPLACE blocks or a unified diff, with every path
checked lexically before anything touches a file.

An edit is text. It may open with `HYPOTHESIS: <one line>` and `RATIONALE: <text>`, then either
  - SEARCH/REPLACE blocks: a file path alone on a line, then
        <<<<<<< SEARCH / exact lines to find / ======= / lines to put there / >>>>>>> REPLACE
    (markdown fences around a block, and the path inside the fence, are tolerated), or
  - a unified diff as `git diff` writes it, applied with `git apply`.
LLMs write both loosely (fences, prose between files, labels in markdown), so parsing tolerates that and raises
EditError, with what to write instead, only for what it cannot read. Applying is agent/edit/apply.py's job.
"""
import ast
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

SEARCH_MARKER = re.compile(r"^<{5,9} ?SEARCH\s*$")
DIVIDER_MARKER = re.compile(r"^={5,9}\s*$")
REPLACE_MARKER = re.compile(r"^>{5,9} ?REPLACE\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
# "HYPOTHESIS: ..." also written by LLMs as "**Hypothesis:** ..." or "## Rationale: ..."
HEADER_LABEL = re.compile(r"^[\s*_#>]*(hypothesis|rationale)[\s*_]*:[\s*_]*(.*?)\s*$", re.IGNORECASE)
DIFF_HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@")
# lines git apply reads in a patch; anything else (LLM prose between or after files) is dropped
DIFF_LINE_PREFIXES = (" ", "+", "-", "\\", "@@", "diff --git ", "index ", "old mode ", "new mode ",
                      "new file mode ", "deleted file mode ", "similarity index ", "dissimilarity index ",
                      "rename from ", "rename to ", "copy from ", "copy to ", "Binary files ")


class EditError(ValueError):
    """An edit that cannot be parsed or applied; the message names the file, the block and the nearest text."""


@dataclass
class Edit:
    hypothesis: str  # one line, "" if the proposer gave none
    rationale: str   # free text, "" if none
    body: str        # the SEARCH/REPLACE text or the diff, without the HYPOTHESIS/RATIONALE header
    format: str      # "search_replace" | "diff"

    def paths(self) -> list[str]:
        """Repo-relative paths the edit touches (old and new names of renames), checked lexically, in order."""
        if self.format == "diff":
            return parse_diff(self.body).paths
        return list(dict.fromkeys(block.path for block in parse_blocks(self.body)))


@dataclass
class Block:
    number: int          # 1-based position among all blocks of the edit, as the proposer wrote them
    path: str
    search: list[str]    # lines without line endings
    replace: list[str]


@dataclass
class _Hunk:
    paths: tuple[str, str]  # (old, new) path of the file it belongs to; "/dev/null" for a missing side
    number: int             # 1-based within its file, as git and patch count hunks
    header: str             # the "@@ -a,b +c,d @@" line
    old_start: int          # line number in the hunk header, which git quotes when the hunk fails
    old_lines: list[str] = field(default_factory=list)  # context and removed lines: what git searches for
    trailing_context: int = 0  # context lines after the last change; 0 means git anchors the hunk at the file end


@dataclass
class Diff:
    text: str             # the patch fed to git apply (fences and prose removed)
    strip: int            # -p level: 1 when names carry a/ b/ prefixes, else 0
    paths: list[str]
    hunks: list[_Hunk]


def parse_edit(text: str) -> Edit:
    """Split a proposer's text into hypothesis, rationale and body; validate the body's blocks and paths."""
    lines = text.replace("\r\n", "\n").split("\n")
    fmt, body_start = _find_body(lines)
    hypothesis, rationale = _parse_header(lines[:body_start])
    # keep the diff's own line endings: a CRLF file's diff has "\r" in its content lines
    raw_lines = text.split("\n")
    edit = Edit(hypothesis, rationale, "\n".join(raw_lines[body_start:]), fmt)
    edit.paths()  # raises EditError for unterminated blocks, missing or unsafe paths
    return edit


def _find_body(lines: list[str]) -> tuple[str, int]:
    """The format of the edit and the index of its first line (a path, a fence around it, or a diff header)."""
    first_block = next((i for i, line in enumerate(lines) if SEARCH_MARKER.match(line)), None)
    first_diff = next((i for i, line in enumerate(lines) if _is_file_header(lines, i)), None)
    if first_diff is not None and (first_block is None or first_diff < first_block):
        above = _previous_content_line(lines, first_diff)
        return "diff", above if above is not None and FENCE.match(lines[above]) else first_diff
    if first_block is None:
        if any(DIFF_HUNK.match(line) for line in lines):
            raise EditError("edit has diff hunks (@@ lines) but no file header: "
                            "start each file with 'diff --git a/PATH b/PATH' or '--- a/PATH' and '+++ b/PATH'")
        raise EditError("edit has neither SEARCH/REPLACE blocks nor a unified diff: expected a file path line "
                        "followed by '<<<<<<< SEARCH', '=======', '>>>>>>> REPLACE', or a 'diff --git' header")
    # walk up from the first SEARCH over: [fence] path [fence], the placements LLMs use
    start = first_block
    above = _previous_content_line(lines, start)
    fence_below_path = above is not None and bool(FENCE.match(lines[above]))
    if fence_below_path:
        start, above = above, _previous_content_line(lines, above)
    if above is not None:
        start, above = above, _previous_content_line(lines, above)  # the path line
        if not fence_below_path and above is not None and FENCE.match(lines[above]):
            start = above  # the path sits inside the fence
    return "search_replace", start


def _previous_content_line(lines: list[str], index: int) -> int | None:
    """Index of the nearest non-blank line above lines[index], or None."""
    for i in range(index - 1, -1, -1):
        if lines[i].strip():
            return i
    return None


def _parse_header(lines: list[str]) -> tuple[str, str]:
    """HYPOTHESIS (one line) and RATIONALE (until the body) from the lines before the body."""
    hypothesis, rationale, in_rationale = "", [], False
    for line in lines:
        label = HEADER_LABEL.match(line)
        if label and label.group(1).lower() == "hypothesis":
            hypothesis, in_rationale = label.group(2), False
        elif label:
            rationale, in_rationale = [label.group(2)], True
        elif in_rationale:
            rationale.append(line)
    return hypothesis, "\n".join(rationale).strip()


def parse_blocks(body: str) -> list[Block]:
    """SEARCH/REPLACE blocks in order; a block with no path line of its own reuses the previous block's path."""
    blocks: list[Block] = []
    path_line: str | None = None  # nearest non-blank, non-fence line since the last block
    lines = [line.removesuffix("\r") for line in body.split("\n")]
    i = 0
    while i < len(lines):
        line = lines[i]
        if not SEARCH_MARKER.match(line):
            if line.strip() and not FENCE.match(line):
                path_line = line
            i += 1
            continue
        number = len(blocks) + 1
        path = _block_path(path_line, blocks, number)
        search, i = _block_section(lines, i + 1, DIVIDER_MARKER, path, number, "=======")
        replace, i = _block_section(lines, i + 1, REPLACE_MARKER, path, number, ">>>>>>> REPLACE")
        blocks.append(Block(number, path, search, replace))
        path_line = None
        i += 1
    return blocks


def _block_path(path_line: str | None, blocks: list[Block], number: int) -> str:
    if path_line is None:
        if not blocks:
            raise EditError(f"block #{number} has no file path: put the path alone on the line before "
                            "'<<<<<<< SEARCH'")
        return blocks[-1].path
    # tolerate `path`, **path**, path:, and "# path" as the first line inside a fence
    path = path_line.strip().strip("`*").rstrip(":").lstrip("#").strip()
    if not path or any(c.isspace() for c in path):
        raise EditError(f"block #{number} has no file path: the line before '<<<<<<< SEARCH' is "
                        f"{path_line.strip()!r}; put the path alone on that line")
    return _check_path(path, f"block #{number}")


def _block_section(lines: list[str], start: int, end_marker: re.Pattern, path: str, number: int,
                   end_name: str) -> tuple[list[str], int]:
    """Lines from start up to end_marker, and the marker's index; raises for a block that never ends."""
    for i in range(start, len(lines)):
        if end_marker.match(lines[i]):
            return lines[start:i], i
        if SEARCH_MARKER.match(lines[i]) or (end_marker is DIVIDER_MARKER and REPLACE_MARKER.match(lines[i])):
            break
    raise EditError(f"{path}: block #{number} is unterminated: no '{end_name}' line where one was expected")


def _check_path(path: str, where: str) -> str:
    """The path in canonical form (no ./ or //), or EditError when absolute, with '..', or inside .git."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("~") or re.match(r"^[A-Za-z]:[\\/]", path):
        raise EditError(f"{where}: path {path!r} is absolute; use a path relative to the repository root")
    if ".." in pure.parts:
        raise EditError(f"{where}: path {path!r} contains '..'; paths must stay inside the repository")
    if ".git" in pure.parts:
        raise EditError(f"{where}: path {path!r} is inside .git; edits may only touch the working tree")
    if str(pure) == ".":
        raise EditError(f"{where}: empty path {path!r}")
    return str(pure)


def _is_file_header(lines: list[str], i: int) -> bool:
    """A 'diff --git' line, or a '--- ' line directly followed by '+++ ' (a traditional unified diff)."""
    line = lines[i].removesuffix("\r")
    if line.startswith("diff --git "):
        return True
    return line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")


def _clean_diff(body: str) -> list[str]:
    """The patch lines git should see: fences and prose dropped, blank lines kept only inside hunks."""
    lines = body.split("\n")
    kept: list[str] = []

    def drop_trailing_blanks():
        while kept and not kept[-1].strip():
            kept.pop()

    for i, line in enumerate(lines):
        if FENCE.match(line):
            continue
        if not line.strip():
            kept.append(line)  # an empty context line, if a hunk line follows
        elif _is_file_header(lines, i):
            drop_trailing_blanks()
            kept.append(line)
        elif line.startswith(DIFF_LINE_PREFIXES):
            kept.append(line)
        else:
            drop_trailing_blanks()
    drop_trailing_blanks()
    return kept


def parse_diff(body: str) -> Diff:
    """File names (all of them: old and new sides, renames, copies) and hunks of a unified diff."""
    lines = _clean_diff(body)
    names: list[str] = []  # names as written, with their a/ b/ prefixes, in order
    bare_names: list[str] = []  # names from rename/copy lines, which git writes without prefixes
    hunks: list[_Hunk] = []
    old = new = "/dev/null"
    hunk: _Hunk | None = None
    hunks_in_file = 0
    for i, raw in enumerate(lines):
        line = raw.removesuffix("\r")
        if _is_file_header(lines, i):
            hunk, hunks_in_file = None, 0
            if line.startswith("diff --git "):
                old, new = _git_header_names(line[len("diff --git "):])
            else:
                old, new = _diff_name(line[4:]), _diff_name(lines[i + 1].removesuffix("\r")[4:])
            names += [old, new]
        elif line.startswith("+++ ") and hunk is None:
            continue  # the second line of a '--- ' header
        elif line.startswith(("rename from ", "rename to ", "copy from ", "copy to ")) and hunk is None:
            bare_names.append(_diff_name(line.split(" ", 2)[2]))
        elif header := DIFF_HUNK.match(line):
            hunks_in_file += 1
            hunk = _Hunk((old, new), hunks_in_file, line, int(header.group(1)))
            hunks.append(hunk)
        elif hunk is not None and line[:1] in (" ", "", "-"):
            hunk.old_lines.append(line[1:])
            hunk.trailing_context = hunk.trailing_context + 1 if line[:1] != "-" else 0
        elif hunk is not None and line[:1] == "+":
            hunk.trailing_context = 0
    named = [name for name in names if name != "/dev/null"]
    if not named:
        raise EditError("diff names no file: expected 'diff --git a/PATH b/PATH' or '--- a/PATH' / '+++ b/PATH'")
    strip = 1 if all(name.startswith(("a/", "b/")) for name in named) else 0
    paths = [_check_path(path, "diff") for path in [_strip_components(n, strip) for n in named] + bare_names]
    for h in hunks:
        h.paths = tuple(n if n == "/dev/null" else _strip_components(n, strip) for n in h.paths)
    return Diff("\n".join(lines) + "\n", strip, list(dict.fromkeys(paths)), hunks)


def _git_header_names(rest: str) -> tuple[str, str]:
    """The two names of a 'diff --git' line; unquoted names with spaces are split where both halves agree."""
    quoted = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', rest)
    if rest.startswith('"') or rest.endswith('"') or len(quoted) == 2:
        if len(quoted) != 2:
            raise EditError(f"diff: cannot read the file names of 'diff --git {rest}'")
        return _diff_name(quoted[0]), _diff_name(quoted[1])
    spaces = [m.start() for m in re.finditer(" ", rest)]
    for s in spaces:  # "a/x y b/x y": both sides name the same file in all but renames
        if _strip_components(rest[:s], 1) == _strip_components(rest[s + 1:], 1):
            return rest[:s], rest[s + 1:]
    middle = rest.find(" b/")
    if middle < 0:
        raise EditError(f"diff: cannot read the file names of 'diff --git {rest}'")
    return rest[:middle], rest[middle + 1:]


def _diff_name(text: str) -> str:
    """A name from a ---/+++/rename line: C-quoted names unquoted, a tab-separated timestamp dropped."""
    text = text.removesuffix("\r")
    if text.startswith('"'):
        end = re.match(r'"(?:[^"\\]|\\.)*"', text)
        try:
            return ast.literal_eval("b" + end.group(0)).decode("utf-8")
        except (AttributeError, SyntaxError, ValueError) as e:
            raise EditError(f"diff: cannot read the quoted file name {text!r}") from e
    return text.split("\t")[0].strip()


def _strip_components(name: str, count: int) -> str:
    parts = name.split("/", count)
    return parts[-1] if len(parts) > count else name
