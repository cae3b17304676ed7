"""Proposer edits: parse SEARCH/REPLACE blocks or unified diffs, and apply them all-or-nothing.

An edit is text. It may open with `HYPOTHESIS: <one line>` and `RATIONALE: <text>`, then either
  - SEARCH/REPLACE blocks: a file path alone on a line, then
        <<<<<<< SEARCH / exact lines to find / ======= / lines to put there / >>>>>>> REPLACE
    (markdown fences around a block, and the path inside the fence, are tolerated), or
  - a unified diff as `git diff` writes it, applied with `git apply`.
A block or hunk that does not apply raises EditError naming the file, the block, and the nearest text found.
"""

import ast
import difflib
import hashlib
import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

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
SEARCH_PREVIEW_LINES = 3   # lines of a failing SEARCH quoted in the error
NEAREST_MAX_LINES = 30     # lines of the nearest region shown in an error; longer regions are cut
NEAREST_MAX_RATIOS = 50    # exact similarity computations per search; bounds the time when nothing is close
TOKEN = re.compile(r"\w+|[^\w\s]")  # words and punctuation: what "similar text" compares, whitespace aside
GIT_TIMEOUT_S = 60         # git apply on a small repo takes milliseconds; this only guards against a hang


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
            return _parse_diff(self.body).paths
        return list(dict.fromkeys(block.path for block in _parse_blocks(self.body)))


@dataclass
class _Block:
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
class _Diff:
    text: str             # the patch fed to git apply (fences and prose removed)
    strip: int            # -p level: 1 when names carry a/ b/ prefixes, else 0
    paths: list[str]
    hunks: list[_Hunk]


# ---------------------------------------------------------------------------------------------------
# parsing

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


def _parse_blocks(body: str) -> list[_Block]:
    """SEARCH/REPLACE blocks in order; a block with no path line of its own reuses the previous block's path."""
    blocks: list[_Block] = []
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
        blocks.append(_Block(number, path, search, replace))
        path_line = None
        i += 1
    return blocks


def _block_path(path_line: str | None, blocks: list[_Block], number: int) -> str:
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


# ---------------------------------------------------------------------------------------------------
# unified diffs

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


def _parse_diff(body: str) -> _Diff:
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
    return _Diff("\n".join(lines) + "\n", strip, list(dict.fromkeys(paths)), hunks)


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


def _apply_diff(body: str, root: Path) -> list[str]:
    diff = _parse_diff(body)
    for path in diff.paths:
        _resolve_inside(root, path)
    command = ["git", "apply", "--recount", "--whitespace=nowarn", f"-p{diff.strip}"]
    for extra in (["--check"], []):
        result = subprocess.run(command + extra, input=diff.text.encode("utf-8"), cwd=root,
                                capture_output=True, timeout=GIT_TIMEOUT_S)
        if result.returncode != 0:
            raise _diff_error(result.stderr.decode("utf-8", "replace"), diff, root)
    return diff.paths


def _diff_error(stderr: str, diff: _Diff, root: Path) -> EditError:
    """git apply's complaint, with the failing hunk and the nearest text in its file."""
    errors = [line.removeprefix("error: ") for line in stderr.splitlines()
              if line.startswith("error: ") and "while searching for" not in line]
    complaint = "; ".join(errors) or stderr.strip() or "git apply failed"
    failed = re.search(r"^error: patch failed: (.+):(\d+)$", stderr, re.MULTILINE)
    if not failed:
        return EditError(f"diff does not apply: {complaint}")
    path, line = failed.group(1), int(failed.group(2))
    in_file = [h for h in diff.hunks if path in h.paths]
    hunk = next((h for h in in_file if h.old_start == line), in_file[0] if in_file else None)
    if hunk is None:
        return EditError(f"{path}: diff does not apply: {complaint}")
    file_lines = _TextFile.read(root, path).lines
    region = _nearest_region(file_lines, hunk.old_lines)
    n = len(hunk.old_lines)
    hint = ""
    if n and not hunk.trailing_context and any(file_lines[i:i + n] == hunk.old_lines for i in range(len(file_lines))):
        hint = (" Its lines are in the file, but a hunk with no context lines after its last change must"
                " match at the end of the file: add the lines that follow.")
    return EditError(f"{path}: hunk #{hunk.number} ({hunk.header}) does not apply: {complaint}.{hint} "
                     f"Nearest text in {path}, {region}")


# ---------------------------------------------------------------------------------------------------
# SEARCH/REPLACE application

@dataclass
class _TextFile:
    """A text file as lines, each with its own ending, so untouched lines keep CRLF or LF as they were."""
    lines: list[str]
    endings: list[str]     # ending of each line; the last one is written only if final_newline
    final_newline: bool
    original: bytes | None  # None when the file did not exist
    exists: bool            # on disk, or created by an earlier block of the edit

    @classmethod
    def read(cls, root: Path, path: str) -> "_TextFile":
        target = root / path
        if not target.exists():
            return cls([], [], True, None, exists=False)
        if not target.is_file():
            raise EditError(f"{path}: not a regular file")
        data = target.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EditError(f"{path}: not UTF-8 text; edits apply to text files only") from e
        pieces = text.split("\n")
        final_newline = pieces[-1] == ""
        if final_newline:
            pieces.pop()
        lines = [p.removesuffix("\r") for p in pieces]
        endings = ["\r\n" if p.endswith("\r") else "\n" for p in pieces]
        return cls(lines, endings, final_newline, data, exists=True)

    @property
    def newline(self) -> str:
        """The file's usual line ending, given to replaced lines."""
        return "\r\n" if self.endings.count("\r\n") > len(self.endings) / 2 else "\n"

    def replace(self, start: int, count: int, new_lines: list[str]):
        newline = self.newline
        self.lines[start:start + count] = new_lines
        self.endings[start:start + count] = [newline] * len(new_lines)

    def to_bytes(self) -> bytes:
        text = "".join(line + ending for line, ending in zip(self.lines, self.endings))
        if self.lines and not self.final_newline:
            text = text.removesuffix(self.endings[-1])
        return text.encode("utf-8")


def _apply_blocks(blocks: list[_Block], root: Path) -> list[str]:
    files: dict[str, _TextFile] = {}
    for block in blocks:
        if block.path not in files:
            _resolve_inside(root, block.path)
            files[block.path] = _TextFile.read(root, block.path)
        text_file = files[block.path]
        if not block.search:
            _create(text_file, block)
        elif not text_file.exists:
            raise EditError(f"{block.path}: block #{block.number}: file does not exist "
                            "(an empty SEARCH section creates a new file)")
        else:
            _replace_once(text_file, block)
    changed = [path for path, f in files.items() if f.to_bytes() != f.original]
    for path in changed:  # every block applied in memory first, so a failure above leaves no file modified
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[path].to_bytes())
    return changed


def _create(text_file: _TextFile, block: _Block):
    if text_file.exists and text_file.lines:
        raise EditError(f"{block.path}: block #{block.number} has an empty SEARCH section but the file exists "
                        "and is not empty: quote the lines to replace")
    text_file.replace(0, len(text_file.lines), block.replace)
    text_file.final_newline = text_file.exists = True


def _replace_once(text_file: _TextFile, block: _Block):
    """Replace the one region matching block.search: exactly, else ignoring trailing spaces and indentation."""
    n = len(block.search)
    starts = range(len(text_file.lines) - n + 1)
    matches = [(i, block.replace) for i in starts if text_file.lines[i:i + n] == block.search]
    if not matches:
        matches = [(i, replacement) for i in starts
                   if (replacement := _reindented(text_file.lines[i:i + n], block)) is not None]
    if len(matches) > 1:
        where = ", ".join(str(i + 1) for i, _ in matches)
        raise EditError(f"{block.path}: block #{block.number}: SEARCH matches {len(matches)} places "
                        f"(lines {where}): add context lines so that it matches once")
    if not matches:
        preview = "\n".join("    " + line for line in block.search[:SEARCH_PREVIEW_LINES])
        region = _nearest_region(text_file.lines, block.search)
        raise EditError(f"{block.path}: block #{block.number}: SEARCH text not found. It begins:\n{preview}\n"
                        f"Nearest text in {block.path}, {region}")
    start, replacement = matches[0]
    text_file.replace(start, n, replacement)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _reindented(window: list[str], block: _Block) -> list[str] | None:
    """block.replace re-indented to the window, if the window equals block.search up to trailing
    whitespace and one indentation offset shared by all its non-blank lines (as aider matches); else None."""
    search = [line.rstrip() for line in block.search]
    depth = min((_indent(line) for line in search if line), default=0)
    prefix = None
    for have, want in zip((line.rstrip() for line in window), (line[depth:] for line in search)):
        if not want or not have:
            if want or have:
                return None
            continue
        offset = have[:len(have) - len(want)]
        if not have.endswith(want) or offset.strip() or (prefix is not None and offset != prefix):
            return None
        prefix = offset
    prefix = prefix or ""
    return [prefix + line[min(depth, _indent(line)):] if line.strip() else "" for line in block.replace]


def _nearest_region(file_lines: list[str], wanted: list[str]) -> str:
    """The window of file_lines (as long as wanted) most similar to wanted, shown with 1-based line
    numbers and its similarity in [0, 1]. Serves both a SEARCH that is not found and a failing hunk.

    Similarity is difflib's ratio over tokens (words and punctuation, so indentation does not count).
    Windows are tried in order of an upper bound on that ratio (token multiset overlap, slid along the
    file in linear time) until no untried window can beat the best: exact, and a few ratios per call."""
    if not file_lines:
        return "which is empty"
    size = min(max(len(wanted), 1), len(file_lines))
    line_tokens = [TOKEN.findall(line) for line in file_lines]
    wanted_tokens = [token for line in wanted for token in TOKEN.findall(line)]
    bounds = _window_bounds(line_tokens, wanted_tokens, size)
    matcher = difflib.SequenceMatcher(None, autojunk=False)  # autojunk would ignore the common tokens
    matcher.set_seq2(wanted_tokens)  # seq2 is the side SequenceMatcher indexes: index it once
    best_start, best_ratio = 0, -1.0
    for start in sorted(range(len(bounds)), key=lambda s: -bounds[s])[:NEAREST_MAX_RATIOS]:
        if bounds[start] <= best_ratio:
            break
        matcher.set_seq1([token for tokens in line_tokens[start:start + size] for token in tokens])
        if (ratio := matcher.ratio()) > best_ratio:
            best_start, best_ratio = start, ratio
    shown = file_lines[best_start:best_start + min(size, NEAREST_MAX_LINES)]
    width = len(str(best_start + len(shown)))
    text = "\n".join(f"    {best_start + k + 1:>{width}} | {line}" for k, line in enumerate(shown))
    if size > len(shown):
        text += f"\n    ... ({size - len(shown)} more lines)"
    return f"lines {best_start + 1}-{best_start + size} (similarity {best_ratio:.2f}):\n{text}"


def _window_bounds(line_tokens: list[list[str]], wanted_tokens: list[str], size: int) -> list[float]:
    """For each window of `size` lines, 2 * |tokens in common as multisets| / |tokens of both|:
    difflib's quick_ratio, an upper bound on its ratio. One pass, adding a line and dropping one per step."""
    wanted = Counter(wanted_tokens)
    window: Counter = Counter()
    common = length = 0
    bounds = []
    for end, tokens in enumerate(line_tokens):
        for token in tokens:
            window[token] += 1
            common += window[token] <= wanted[token]
        length += len(tokens)
        if end >= size:
            for token in line_tokens[end - size]:
                common -= window[token] <= wanted[token]
                window[token] -= 1
            length -= len(line_tokens[end - size])
        if end >= size - 1:
            total = length + len(wanted_tokens)
            bounds.append(2 * common / total if total else 1.0)
    return bounds


# ---------------------------------------------------------------------------------------------------
# applying and fingerprinting

def _resolve_inside(root: Path, path: str) -> Path:
    """root/path after resolving symlinks; EditError if that leaves root or lands inside .git."""
    base = root.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(base):
        raise EditError(f"{path}: resolves to {target}, outside the repository {base}")
    if ".git" in target.relative_to(base).parts:
        raise EditError(f"{path}: resolves into .git; edits may only touch the working tree")
    return target


def apply_edit(edit: Edit, root: Path) -> list[str]:
    """Apply edit to the working tree at root (a git worktree); returns the changed repo-relative paths.
    All or nothing: when any block or hunk fails, EditError is raised and no file is modified."""
    root = Path(root)
    if edit.format == "diff":
        return _apply_diff(edit.body, root)
    return _apply_blocks(_parse_blocks(edit.body), root)


def normalized_diff(diff_text: str) -> str:
    """A `git diff` in canonical form for near-duplicate detection: no index lines, no hunk line numbers
    or section names, no trailing whitespace, no blank lines (added, removed or context)."""
    kept = []
    for line in diff_text.split("\n"):
        line = line.rstrip()
        if line.startswith("index "):
            continue
        if line.startswith("@@"):
            kept.append("@@")
        elif line[1:].strip():  # drops "", and +/-/space lines that carry only whitespace
            kept.append(line)
    return "\n".join(kept) + "\n"


def edit_fingerprint(diff_text: str) -> str:
    """sha256 hex digest of normalized_diff(diff_text)."""
    return hashlib.sha256(normalized_diff(diff_text).encode("utf-8")).hexdigest()


def tree_fingerprint(old_root: Path, new_root: Path, paths) -> str:
    """edit_fingerprint of the change from old_root to new_root in `paths` (repo-relative; a missing file is
    empty). One diff generator (difflib) for every caller: the harness on a candidate worktree and a proposer's
    smoke check on a scratch copy give the same fingerprint for the same change."""
    def lines(root: Path, rel: str) -> list[str]:
        path = Path(root) / rel
        return path.read_text(errors="replace").splitlines(keepends=True) if path.is_file() else []
    diff = "".join("".join(difflib.unified_diff(lines(old_root, rel), lines(new_root, rel), f"a/{rel}", f"b/{rel}"))
                   for rel in sorted(set(paths)))
    return edit_fingerprint(diff)
