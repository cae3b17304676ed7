"""Apply a parsed edit to a worktree, all or nothing: SEARCH/REPLACE blocks in memory then written, a diff with
`git apply --check` before `git apply`.

A block or hunk that does not apply raises EditError naming the file, the block, and the nearest text found
(agent/edit/nearest.py), so the proposer can correct it. Every path is resolved against the worktree first:
a symlink out of it, or into .git, is refused before anything is read or written. `dry_run` asks whether an edit
applies without touching the tree: it applies the edit to a copy.
"""
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.edit.nearest import nearest_region
from agent.edit.parse import Block, Diff, Edit, EditError, parse_blocks, parse_diff, parse_edit

SEARCH_PREVIEW_LINES = 3   # lines of a failing SEARCH quoted in the error
GIT_TIMEOUT_S = 60         # git apply on a small repo takes milliseconds; this only guards against a hang


def apply_edit(edit: Edit, root: Path) -> list[str]:
    """Apply edit to the working tree at root (a git worktree); returns the changed repo-relative paths.
    All or nothing: when any block or hunk fails, EditError is raised and no file is modified."""
    root = Path(root)
    if edit.format == "diff":
        return _apply_diff(edit.body, root)
    return _apply_blocks(parse_blocks(edit.body), root)


def _resolve_inside(root: Path, path: str) -> Path:
    """root/path after resolving symlinks; EditError if that leaves root or lands inside .git."""
    base = root.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(base):
        raise EditError(f"{path}: resolves to {target}, outside the repository {base}")
    if ".git" in target.relative_to(base).parts:
        raise EditError(f"{path}: resolves into .git; edits may only touch the working tree")
    return target


def _apply_diff(body: str, root: Path) -> list[str]:
    diff = parse_diff(body)
    for path in diff.paths:
        _resolve_inside(root, path)
    command = ["git", "apply", "--recount", "--whitespace=nowarn", f"-p{diff.strip}"]
    for extra in (["--check"], []):
        result = subprocess.run(command + extra, input=diff.text.encode("utf-8"), cwd=root,
                                capture_output=True, timeout=GIT_TIMEOUT_S)
        if result.returncode != 0:
            raise _diff_error(result.stderr.decode("utf-8", "replace"), diff, root)
    return diff.paths


def _diff_error(stderr: str, diff: Diff, root: Path) -> EditError:
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
    region = nearest_region(file_lines, hunk.old_lines)
    n = len(hunk.old_lines)
    hint = ""
    if n and not hunk.trailing_context and any(file_lines[i:i + n] == hunk.old_lines for i in range(len(file_lines))):
        hint = (" Its lines are in the file, but a hunk with no context lines after its last change must"
                " match at the end of the file: add the lines that follow.")
    return EditError(f"{path}: hunk #{hunk.number} ({hunk.header}) does not apply: {complaint}.{hint} "
                     f"Nearest text in {path}, {region}")


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


def _apply_blocks(blocks: list[Block], root: Path) -> list[str]:
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


def _create(text_file: _TextFile, block: Block):
    if text_file.exists and text_file.lines:
        raise EditError(f"{block.path}: block #{block.number} has an empty SEARCH section but the file exists "
                        "and is not empty: quote the lines to replace")
    text_file.replace(0, len(text_file.lines), block.replace)
    text_file.final_newline = text_file.exists = True


def _replace_once(text_file: _TextFile, block: Block):
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
        region = nearest_region(text_file.lines, block.search)
        raise EditError(f"{block.path}: block #{block.number}: SEARCH text not found. It begins:\n{preview}\n"
                        f"Nearest text in {block.path}, {region}")
    start, replacement = matches[0]
    text_file.replace(start, n, replacement)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _reindented(window: list[str], block: Block) -> list[str] | None:
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


def dry_run(edit: Edit | str, tree: Path, scratch: Path | None = None) -> list[str]:
    """Does this edit apply to `tree`? It is applied to a copy, never to tree itself: to a temporary copy of just
    the files it touches, gone afterwards, or with `scratch` (a path that does not exist yet) to a full copy of
    tree made there and left for the caller, e.g. for a smoke run. Returns the changed repo-relative paths ([] for
    an edit that changes nothing); EditError says why it does not parse or apply."""
    edit = parse_edit(edit) if isinstance(edit, str) else edit
    tree = Path(tree)
    if scratch is not None:
        shutil.copytree(tree, scratch)
        return apply_edit(edit, Path(scratch))
    with tempfile.TemporaryDirectory(prefix="ratchet-dry-run-") as tmp:
        for path in edit.paths():
            source = _resolve_inside(tree, path)
            if source.is_file():
                target = Path(tmp, path)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        return apply_edit(edit, Path(tmp))
