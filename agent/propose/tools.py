"""The tools an LLM proposer may call, and the read-only view of the incumbent they work on.

list_files / read_file / grep read the incumbent's tree, confined to it (no '..', no symlinks out, nothing in
.git); show_experiment, run_smoke, profile and submit_edit are answered by the proposer's loop (llm_proposer.py)
with the services the Context carries. The specs the model sees
are data, in prompts/tool_specs.json. A mistake in a call (bad path, bad pattern, wrong argument) is a ToolError,
whose message goes back to the model so it can correct itself.
"""
import json
import re
from pathlib import Path

from agent.propose.base import Context
from agent.propose.history_text import cut
from agent.propose.prompt import PROMPTS

# tool output limits: each result is resent with every later request of the conversation, so keep them short
MAX_TOOL_OUTPUT_CHARS = 20_000  # one tool result; longer ones are cut with a note saying how to read on
MAX_LISTED_FILES = 500          # list_files entries
MAX_GREP_MATCHES = 200          # grep hits
MAX_GREP_FILE_BYTES = 2_000_000  # grep skips larger files (data, weights)
MAX_LINE_CHARS = 300            # a grep hit's line is cut here
TOOL_SPECS: list[dict] = json.loads((PROMPTS / "tool_specs.json").read_text(encoding="utf-8"))
TOOL_TYPES = {"string": str, "integer": int}
READ_TOOLS = ("list_files", "read_file", "grep")  # answered by Worktree.run; the others by the proposer's loop


class ToolError(Exception):
    """A tool call the model got wrong (bad path, bad pattern); its message goes back to the model."""


def tool_specs(context: Context) -> list[dict]:
    """The tools offered: run_smoke, profile and show_experiment only when the loop gave the context their service."""
    services = {"run_smoke": context.smoke, "profile": context.profile, "show_experiment": context.show_experiment}
    return [spec for spec in TOOL_SPECS if services.get(spec["name"], True) is not None]


def check_arguments(spec: dict, arguments: dict) -> dict:
    """The arguments the tool takes, with integers given as strings converted and nulls and unknown names
    dropped; ToolError for a missing or mistyped one."""
    properties, required = spec["parameters"]["properties"], spec["parameters"]["required"]
    checked = {name: value for name, value in arguments.items() if name in properties and value is not None}
    missing = [name for name in required if name not in checked]
    if missing:
        raise ToolError(f"{spec['name']}: missing argument(s) {', '.join(missing)}; "
                        f"expected {json.dumps(properties)}")
    for name, value in checked.items():
        want = properties[name]["type"]
        if want == "integer" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            checked[name] = value = int(value)
        if not isinstance(value, TOOL_TYPES[want]) or isinstance(value, bool):
            raise ToolError(f"{spec['name']}: argument {name!r} must be a {want}, got {value!r:.80}")
    return checked


def _cut_output(text: str, hint: str) -> str:
    if len(text) <= MAX_TOOL_OUTPUT_CHARS:
        return text
    return text[:MAX_TOOL_OUTPUT_CHARS] + f"\n... (output cut at {MAX_TOOL_OUTPUT_CHARS:,} characters; {hint})"


class Worktree:
    """Read-only views of the incumbent's files for the model, confined to root (no '..', no symlinks out)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def resolve(self, path: str) -> Path:
        if not path.strip():
            raise ToolError("empty path")
        target = (self.root / path).resolve()
        if not target.is_relative_to(self.root):
            raise ToolError(f"{path}: outside the repository; paths are relative to its root")
        if ".git" in target.relative_to(self.root).parts:
            raise ToolError(f"{path}: inside .git")
        return target

    def files(self, pattern: str) -> list[Path]:
        """Files matching a glob, inside root after resolving symlinks, in path order."""
        try:
            candidates = sorted(self.root.glob(pattern or "**/*"))
        except (ValueError, NotImplementedError) as e:
            raise ToolError(f"bad glob {pattern!r}: {e}") from e
        found = []
        for path in candidates:
            real = path.resolve()
            if path.is_file() and real.is_relative_to(self.root) and ".git" not in real.relative_to(self.root).parts:
                found.append(path)
        return found

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def list_files(self, glob: str = "**/*") -> str:
        files = self.files(glob)
        lines = [f"{self.relative(p)} ({p.stat().st_size:,} bytes)" for p in files[:MAX_LISTED_FILES]]
        if len(files) > MAX_LISTED_FILES:
            lines.append(f"... {len(files) - MAX_LISTED_FILES} more: use a narrower glob")
        return "\n".join(lines) or f"no files match {glob!r}"

    def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        target = self.resolve(path)
        if not target.is_file():
            raise ToolError(f"{path}: no such file")
        data = target.read_bytes()
        if b"\0" in data[:8192]:
            raise ToolError(f"{path}: a binary file")
        lines = data.decode("utf-8", "replace").splitlines()
        start = max(1, start_line or 1)
        end = min(len(lines), end_line or len(lines))
        if start > end and lines:
            raise ToolError(f"{path}: lines {start}..{end} are empty; the file has {len(lines)} lines")
        body = "\n".join(lines[start - 1:end])
        return _cut_output(f"{path}: lines {start}-{end} of {len(lines)}\n{body}",
                           "read on with start_line")

    def grep(self, pattern: str, path_glob: str = "**/*") -> str:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ToolError(f"bad regular expression {pattern!r}: {e}") from e
        hits = []
        for path in self.files(path_glob):
            if path.stat().st_size > MAX_GREP_FILE_BYTES:
                continue
            data = path.read_bytes()
            if b"\0" in data[:8192]:
                continue
            for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
                if regex.search(line):
                    hits.append(f"{self.relative(path)}:{number}: {cut(line, MAX_LINE_CHARS)}")
                    if len(hits) > MAX_GREP_MATCHES:
                        hits[-1] = f"... more than {MAX_GREP_MATCHES} matches: narrow the pattern or path_glob"
                        return "\n".join(hits)
        return _cut_output("\n".join(hits) or f"no match for {pattern!r}", "narrow the pattern")

    def run(self, name: str, arguments: dict) -> str:
        """One of READ_TOOLS, called with checked arguments."""
        return getattr(self, name)(**arguments)
