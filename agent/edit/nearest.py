"""The text in a file nearest to what an edit expected there, for the error when a SEARCH or a hunk does not apply:
the proposer sees what the file really says and can quote it."""
import difflib
import re
from collections import Counter

NEAREST_MAX_LINES = 30     # lines of the nearest region shown in an error; longer regions are cut
NEAREST_MAX_RATIOS = 50    # exact similarity computations per search; bounds the time when nothing is close
TOKEN = re.compile(r"\w+|[^\w\s]")  # words and punctuation: what "similar text" compares, whitespace aside


def nearest_region(file_lines: list[str], wanted: list[str]) -> str:
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
