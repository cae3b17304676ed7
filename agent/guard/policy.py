"""The static policy: AST checks on the Python files an edit changed, before anything runs.

One layer of three (the sandbox and the out-of-process evaluator are the others). It reads the candidate's code
and catches the common reward hacks (patching the timer or a library the evaluator uses, caching weights in
/tmp, reading validation data, spawning processes, falling back to the kernel reference) with a reason the LLM
can act on, before any GPU time is spent. It keeps false positives low on purpose: paths it cannot resolve are
left to the sandbox, and what has legitimate uses (threads, exec, hooks) is flagged, not rejected.

This module is the entry: files and sources in, findings out, only those an edit introduced. The parts:
policy_rules (RULES, the table of what it checks, and Finding), policy_names (what a name stands for),
policy_paths (where a path points), policy_checker and policy_access (the rules applied in one walk).
"""
import ast
import difflib
from pathlib import Path

from agent.guard.policy_checker import Checker
from agent.guard.policy_rules import Finding, finding


def check_source(path: str, source: str, *, old_source: str | None = None) -> list[Finding]:
    """Findings for one file's new contents. With `old_source`, only findings that the edit introduced: a finding
    on a line the edit left alone is dropped when the old file had the same finding there."""
    hits = _hits(path, source)
    if old_source is not None:
        hits = _introduced(hits, _hits(path, old_source), old_source, source)
    return sorted((f for f, _ in hits), key=lambda f: (f.line, f.rule))


def check_files(root: Path, paths: list[str], *, old_root: Path | None = None) -> list[Finding]:
    """check_source on each .py file of `paths` (repo-relative) under `root`, against its old version under
    `old_root` when that exists. Other files, and files the edit deleted, are skipped."""
    findings = []
    for rel in paths:
        new = Path(root) / rel
        if not rel.endswith(".py") or not new.is_file():
            continue
        old = Path(old_root) / rel if old_root is not None else None
        try:
            source = new.read_text(encoding="utf-8")
            old_source = old.read_text(encoding="utf-8") if old is not None and old.is_file() else None
        except UnicodeDecodeError as e:
            findings.append(finding("syntax", rel, 1, f"not UTF-8 text ({e.reason})"))
            continue
        findings += check_source(rel, source, old_source=old_source)
    return findings


def rejecting(findings) -> list[Finding]:
    return [f for f in findings if f.severity == "reject"]


def format_findings(findings) -> str:
    """One line per finding, `path:line: severity [rule] message`; empty when there are none."""
    return "\n".join(f"{f.path}:{f.line}: {f.severity} [{f.rule}] {f.message}" for f in findings)


def _hits(path: str, source: str) -> list[tuple[Finding, int]]:
    """(finding, last line of the code it points at) for one file; a file that does not parse is one finding."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        line = e.lineno or 1
        return [(finding("syntax", path, line, f"does not parse: {e.msg}"), line)]
    except (ValueError, RecursionError) as e:  # null bytes; nesting past the parser's limit
        return [(finding("syntax", path, 1, f"does not parse: {e}"), 1)]
    try:
        return Checker(path, tree).run()
    except RecursionError:  # code nested past what the checker can follow must not pass unread
        return [(finding("syntax", path, 1, "nested too deeply for the policy to read"), 1)]


def _introduced(hits, old_hits, old_source: str, source: str) -> list[tuple[Finding, int]]:
    matcher = difflib.SequenceMatcher(None, old_source.splitlines(), source.splitlines(), autojunk=False)
    old_line = {}  # new line number -> old line number, for the lines the edit left alone
    for old_start, new_start, size in matcher.get_matching_blocks():
        for k in range(size):
            old_line[new_start + k + 1] = old_start + k + 1
    before = {(f.rule, f.line, f.message) for f, _ in old_hits}
    return [(f, end) for f, end in hits
            if not (all(line in old_line for line in range(f.line, end + 1))
                    and (f.rule, old_line[f.line], f.message) in before)]

