"""Fingerprints of a change, for near-duplicate detection: the same change gives the same digest however it was
written (SEARCH/REPLACE or diff, line numbers, whitespace) and wherever it was made."""
import difflib
import hashlib
from pathlib import Path


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
