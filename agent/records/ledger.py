"""runs/<tag>/, the one store of a tag: the ledger (one JSON row per experiment), results.tsv, state.json (the
baseline, the incumbent, the experiment in flight), loop.json (the loop's budgets used and its queue of proposals)
and each experiment's journal of finished runs, for resume.

Crash safety: a row is one `write` on an O_APPEND descriptor followed by fsync, so a kill -9 leaves
either the whole row or a torn last line, which `rows()` ignores. state.json and loop.json are replaced atomically.
One lock (`lock`) holds every read-modify-write of them: the loop's proposer thread queues a proposal while the
main thread records an experiment.
Nothing written here may contain a secret: rows pass through `redaction.redact`.
"""
import json
import os
import threading
from pathlib import Path
from typing import Callable

from agent.guard.redaction import redact

JOURNAL = "runs.jsonl"  # exp-<id>/runs.jsonl: the finished runs of an experiment (or baseline) in flight
TSV_COLUMNS = ["id", "kind", "decision", "reason", "speedup", "candidate_s", "incumbent_s", "p_value", "val_loss",
               "proposer", "hypothesis"]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _append_line(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("\t", " ").replace("\n", " ")


class Ledger:
    def __init__(self, tag_dir: Path):
        self.dir = Path(tag_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "ledger.jsonl"
        self.tsv = self.dir / "results.tsv"
        self.state_path = self.dir / "state.json"
        self.loop_path = self.dir / "loop.json"
        self.lock = threading.RLock()

    def rows(self) -> list[dict]:
        return _read_lines(self.path)

    def row(self, exp_id: str) -> dict | None:
        return next((r for r in self.rows() if r["id"] == exp_id), None)

    def append(self, row: dict) -> None:
        _append_json_line(self.path, row)
        if not self.tsv.exists():
            _append_line(self.tsv, "\t".join(TSV_COLUMNS) + "\n")
        _append_line(self.tsv, redact("\t".join(_cell(row.get(c)) for c in TSV_COLUMNS)) + "\n")

    def next_id(self) -> str:
        ids = [int(r["id"]) for r in self.rows() if r["id"].isdigit()]
        return f"{max(ids, default=0) + 1:04d}"

    def load_state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def save_state(self, state: dict) -> None:
        _atomic_write(self.state_path, redact(json.dumps(state, indent=2, sort_keys=True)))

    def update_state(self, change: Callable[[dict], None]) -> dict:
        """state.json changed by `change(state)` under the lock; -> the new state."""
        with self.lock:
            state = self.load_state()
            change(state)
            self.save_state(state)
            return state

    def load_loop(self, fresh: dict) -> dict:
        """loop.json, or `fresh` (the state of a loop that has not started)."""
        with self.lock:
            return json.loads(self.loop_path.read_text()) if self.loop_path.exists() else fresh

    def update_loop(self, change: Callable[[dict], None], fresh: dict) -> None:
        """loop.json changed by `change(loop)` under the lock."""
        with self.lock:
            loop = self.load_loop(fresh)
            change(loop)
            self.write_json(self.loop_path, loop)

    def exp_dir(self, exp_id: str) -> Path:
        return self.dir / f"exp-{exp_id}"

    def write_json(self, path: Path, obj) -> None:
        _atomic_write(path, redact(json.dumps(obj, indent=2, sort_keys=True)))

    # each finished run of the experiment in flight, durable the moment it is measured: a resume re-runs none of them
    def journal(self, exp_id: str) -> list[dict]:
        return _read_lines(self.exp_dir(exp_id) / JOURNAL)

    def add_to_journal(self, exp_id: str, entry: dict) -> None:
        _append_json_line(self.exp_dir(exp_id) / JOURNAL, entry)


def _append_json_line(path: Path, obj) -> None:
    """One JSON line, redacted; a torn last line from a kill -9 is closed first, so this one starts on its own."""
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        _append_line(path, "\n")
    _append_line(path, redact(json.dumps(obj, sort_keys=True)) + "\n")


def _read_lines(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file, skipping a torn last line from a kill -9 mid-write."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
