"""The `catalog` proposer: the NanoGPT speedrun's known speedups, offline, one untried entry at a time.

Entries (catalog_entries.py) are edits against the baseline nanomodel, ordered by their expected value on the
target hardware. `propose` returns the first entry that
  - targets this hardware ("any", or "cpu"/"gpu" as detected from the context's hardware line),
  - was never tried and is not pending: its key or its hypothesis is in no history row (the ledger survives
    resumes) and in none of the context's pending proposals (the loop proposes the next edit while the current
    one trains; an entry made against a head that has since moved is dropped from the queue and comes back),
  - applies to the incumbent's files, checked by a dry run (apply.dry_run); entries that do not apply, or change
    nothing, are recorded in `self.skipped` and passed over.
"""
import re
import tempfile
import textwrap
from pathlib import Path

from agent.edit.apply import dry_run
from agent.edit.parse import EditError
from agent.propose.base import Context, Proposal
from agent.propose.catalog_entries import CPU_ORDER, ENTRIES, GPU_ORDER, Entry

CONFIG_PATH = "nanomodel/config.py"
# a field's default in the Config dataclass, e.g. `    steps: int = 300                 # total optimizer steps`
DEFAULT_LINE = re.compile(
    r"^(?P<head>    (?P<name>\w+): (?:int|float) = )(?P<value>[-+.\w]+)(?P<pad> *)(?P<comment>#.*)?$")
# a numeric override in a named config, e.g. `steps=40` in `"cpu-test": Config(..., steps=40, lr=3e-3)`
OVERRIDE = re.compile(r"(?<![\w.])(?P<name>\w+)=(?P<value>[-+.\d][-+.\w]*)")


class CatalogError(ValueError):
    """An entry that cannot be rendered against the given files: a config field it changes is set nowhere, or
    every value it assigns is already in place."""


def detect_hardware(description: str) -> str:
    """'gpu' when the context's hardware line names a GPU ("GPU: 8x NVIDIA H100 ..."), 'cpu' otherwise."""
    text = description.lower()
    if re.search(r"\bno (gpu|cuda)\b", text):
        return "cpu"
    return "gpu" if re.search(r"\b(gpu|cuda|nvidia|h100|h200|a100|rocm)\b", text) else "cpu"


def order_for(hardware: str) -> list[str]:
    """Entry keys in proposal order for 'cpu' or 'gpu'."""
    if hardware not in ("cpu", "gpu"):
        raise ValueError(f"hardware must be 'cpu' or 'gpu', got {hardware!r}")
    return CPU_ORDER if hardware == "cpu" else GPU_ORDER


def hints(history: list[dict], hardware_line: str) -> list[dict]:
    """The entries for this hardware as known ideas for an LLM proposer, in the catalog's order: {"name", "idea",
    "effect" (what the rationale says was measured, else its speedrun record), "tried" (this ledger's verdict on
    it, by key or hypothesis; "" if never tried)}."""
    entries = {entry.key: entry for entry in ENTRIES}
    found = []
    for key in order_for(detect_hardware(hardware_line)):
        entry = entries[key]
        rows = [r for r in history if r.get("key") == key or (r.get("hypothesis") or "").strip() == entry.hypothesis]
        tried = ", ".join(f"{r['id']} {r.get('decision', '?')}"
                          + (f" {r['speedup']:+.1%}" if isinstance(r.get("speedup"), float) else "") for r in rows)
        found.append({"name": key, "idea": entry.hypothesis, "effect": measured_effect(entry.rationale), "tried": tried})
    return found


def measured_effect(rationale: str) -> str:
    """The sentences of a rationale that report a measurement (ours on cpu-tiny, or the speedrun record's)."""
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(rationale.split()))
    measured = [s for s in sentences if re.search(r"\b(measured|on cpu-tiny|speedrun \[\d+\])", s, re.I)]
    return " ".join(measured)


def render(entry: Entry, files: dict[str, str]) -> str:
    """The entry's full edit text: header, static blocks, and its config changes against files[CONFIG_PATH]."""
    blocks = entry.blocks
    if entry.scale or entry.assign:
        blocks += config_blocks(files.get(CONFIG_PATH, ""), entry.scale, entry.assign)
    if not blocks.strip():
        raise CatalogError("changes nothing: already in place")
    rationale = textwrap.fill(" ".join(entry.rationale.split()), width=110, initial_indent="RATIONALE: ")
    return f"HYPOTHESIS: {entry.hypothesis}\n{rationale}\n\n{blocks}"


def config_blocks(config_text: str, scale: dict, assign: dict) -> str:
    """One-line SEARCH/REPLACE blocks that scale or set the given fields wherever config.py sets them: the Config
    dataclass defaults and every named config that overrides them. Integers stay integers (at least 1)."""
    def new_value(name: str, old: str) -> str:
        if name in assign:
            return _literal(assign[name])
        if re.fullmatch(r"[-+]?\d+", old):
            return str(max(1, round(int(old) * scale[name])))
        return _literal(float(old) * scale[name])

    fields, found = set(scale) | set(assign), set()

    def override(m: re.Match) -> str:
        if m["name"] not in fields:
            return m[0]
        found.add(m["name"])
        return f"{m['name']}={new_value(m['name'], m['value'])}"

    blocks, in_named = [], False  # in_named: inside the CONFIGS dict of named configs
    for line in config_text.split("\n"):
        in_named = line.startswith("CONFIGS") or (in_named and line != "}")
        if in_named:
            new = OVERRIDE.sub(override, line)
        elif (m := DEFAULT_LINE.match(line)) and m["name"] in fields:
            found.add(m["name"])
            value = new_value(m["name"], m["value"])
            pad = " " * max(1, len(m["value"]) + len(m["pad"]) - len(value)) if m["comment"] else ""
            new = m["head"] + value + pad + (m["comment"] or "")
        else:
            continue
        if new != line:
            blocks.append(f"\n{CONFIG_PATH}\n<<<<<<< SEARCH\n{line}\n=======\n{new}\n>>>>>>> REPLACE\n")
    if fields - found:
        raise CatalogError(f"{CONFIG_PATH}: no line sets {', '.join(sorted(fields - found))}")
    return "".join(blocks)


def _literal(value) -> str:
    """A Python literal for a config value: ints as they are, floats short but still floats (0.002, 1e-10, 0.0)."""
    if isinstance(value, int):
        return str(value)
    text = f"{value:.4g}"
    return text if any(c in text for c in ".en") else text + ".0"


def apply_problem(text: str, tree: Path) -> str | None:
    """Why `text` does not apply to `tree` (or changes nothing), found by a dry run; None if it applies."""
    try:
        changed = dry_run(text, tree)
    except EditError as e:
        return f"does not apply: {e}"
    return None if changed else "changes nothing: already in place"


def write_files(files: dict[str, str], root: Path) -> Path:
    """files (repo-relative path -> content) written under root: the context's view of the incumbent as a tree."""
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    return root


class CatalogProposer:
    name = "catalog"

    def __init__(self, hardware: str | None = None):
        """hardware: 'cpu' or 'gpu'; None detects it from each context's hardware line."""
        if hardware is not None:
            order_for(hardware)  # validates
        self.hardware = hardware
        self.entries = {entry.key: entry for entry in ENTRIES}
        self.skipped: list[tuple[str, str]] = []  # (key, reason), one per entry passed over

    def propose(self, context: Context) -> Proposal | None:
        hardware = self.hardware or detect_hardware(context.hardware)
        order = order_for(hardware)
        for entry in self.entries.values():
            if entry.key not in order:
                self._skip(entry.key, f"targets {entry.hardware}, the hardware is {hardware}")
        seen = context.history + context.pending
        tried_keys = {row.get("key") for row in seen}
        tried_hypotheses = {(row.get("hypothesis") or "").strip() for row in seen}
        with tempfile.TemporaryDirectory(prefix="ratchet-catalog-") as tmp:
            tree = write_files(context.files, Path(tmp))  # entries are rendered against these files: checked on them
            for key in order:
                entry = self.entries[key]
                if key in tried_keys or entry.hypothesis in tried_hypotheses:
                    continue
                try:
                    text = render(entry, context.files)
                except CatalogError as e:
                    self._skip(key, str(e))
                    continue
                problem = apply_problem(text, tree)
                if problem:
                    self._skip(key, problem)
                    continue
                return Proposal(text=text, proposer=self.name, hypothesis=entry.hypothesis, key=key)
        return None

    def _skip(self, key: str, reason: str) -> None:
        if all(key != skipped for skipped, _ in self.skipped):
            self.skipped.append((key, reason))
