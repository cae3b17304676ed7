"""Experiments as records: which one is in flight, how a decision lands in git and the ledger, and how a crash is
finished.

Crash safety: each decision is saved in exp-<id>/result.json before the branch or ledger moves, so `recover()` can
finish it; an experiment without result.json stays in flight (state.json's "inflight") with its finished runs
(exp-<id>/runs.jsonl) and resumes from them when the same experiment is asked for again (`claim`).
One Ratchet process per tag (`lock`), held until the process exits: the kernel drops it even after kill -9.
"""
import fcntl
import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

from agent.edit.workspace import Workspace, trailers
from agent.records.ledger import Ledger
from agent.records.types import Arm, Decision, Stage
from agent.verdict.judge import CANDIDATE


class TagBusy(RuntimeError):
    """Another Ratchet process holds the tag."""


class Experiments:
    def __init__(self, ledger: Ledger, ws: Workspace):
        self.ledger, self.ws = ledger, ws

    def lock(self) -> None:
        """One Ratchet process per tag: held until this process exits (the kernel drops it even after kill -9)."""
        self._lock_file = open(self.ledger.dir / "lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            raise TagBusy(f"another ratchet process (pid {self._lock_file.read().strip() or '?'}) is working on "
                          f"tag {self.ws.tag!r}; wait for it or `ratchet stop --tag {self.ws.tag}`") from None
        self._lock_file.truncate(0)
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    def claim(self, key: str, parent: str) -> tuple[str, list]:
        """(id, finished runs) of the experiment `key` on `parent`, now in flight: the interrupted one when it is
        the same experiment (its runs as recorded in its journal), else a new one (an interrupted other is dropped)."""
        inflight = self.ledger.load_state().get("inflight")
        if inflight and inflight.get("key") == key and inflight["parent"] == parent:
            return inflight["id"], self.ledger.journal(inflight["id"])
        self.drop_inflight()
        state = self.ledger.load_state()
        exp_id = self.ledger.next_id()
        self.ledger.exp_dir(exp_id).mkdir(parents=True, exist_ok=True)
        state["inflight"] = {"id": exp_id, "parent": parent, "key": key}
        self.ledger.save_state(state)
        return exp_id, []

    def drop_inflight(self) -> None:
        """Forget the experiment in flight; its folder goes too unless the ledger already has its row."""
        state = self.ledger.load_state()
        inflight = state.pop("inflight", None)
        if inflight is None:
            return
        if self.ledger.row(inflight["id"]) is None:
            shutil.rmtree(self.ledger.exp_dir(inflight["id"]), ignore_errors=True)
        self.ledger.save_state(state)

    def finish(self, row: dict, exp_dir: Path, cand_wt: Path | None, decision: Decision, reason: str,
               stage: Stage) -> dict:
        """Record a decision. `stage`: what decided: edit, guard, policy, smoke, screen, run (a candidate run
        failed), judge."""
        record_decision(row, decision, reason)
        row["stage"] = stage
        if cand_wt is not None:
            row["commit"] = self.ws.amend_message(cand_wt, commit_message(row, self.ws.tag))
        self.ledger.write_json(exp_dir / "result.json", row)  # the point of no return: recover() finishes from here
        self.publish(row)
        return row

    def publish(self, row: dict) -> None:
        """Move git and the ledger to match a saved decision. Idempotent: recover() calls it again after a crash."""
        commit = row.get("commit")
        if commit and row["decision"] == Decision.ACCEPTED:
            if self.ws.head() == row["parent"]:
                self.ws.advance(commit, row["parent"])
        elif commit:
            row["ref"] = self.ws.keep_rejected(row["id"], commit)
        if self.ledger.row(row["id"]) is None:
            self.ledger.append(row)
        state = self.ledger.load_state()
        if row["decision"] == Decision.ACCEPTED:
            cand = [r for r in row["runs"] if r["arm"] == CANDIDATE]
            state["incumbent"] = Arm(commit, [r["seconds"] for r in cand], [r["val_loss"] for r in cand],
                                     cand[-1]["curve"]).to_state()
        state.pop("inflight", None)
        self.ledger.save_state(state)

    def recover(self) -> None:
        """After a crash or kill -9 (its orphaned runs killed by the caller): finish a saved decision. An experiment
        interrupted before its decision stays in flight with the runs it finished (its journal): `claim` resumes it
        when the same experiment is asked for again and discards it when another is."""
        inflight = self.ledger.load_state().get("inflight")
        if inflight:
            result = self.ledger.exp_dir(inflight["id"]) / "result.json"
            if result.exists():
                self.publish(json.loads(result.read_text()))
        self.ws.remove_all_worktrees()


def experiment_key(kind: str, text: str, length: int | None) -> str:
    """What makes two requests the same experiment, for resume: the edit's text, its kind and calibrated length."""
    return f"{kind}:{length}:" + hashlib.sha256(text.encode()).hexdigest()


def order_seed(tag: str, exp_id: str) -> int:
    """The seed of an experiment's run order (the judge's coin flip per block): fixed per experiment, so a resume
    re-runs the same order, and unrelated to anything the machine does (see agent/verdict/judge.py, Order)."""
    return zlib.crc32(f"{tag}/{exp_id}".encode())


def record_decision(row: dict, decision: str, reason: str) -> None:
    """Decision, reason, and the verdict's headline numbers as top-level ledger fields."""
    v = row.get("verdict") or {}
    row.update(decision=decision, reason=reason, speedup=v.get("speedup"), candidate_s=v.get("candidate_mean"),
               incumbent_s=v.get("incumbent_mean"), p_value=v.get("p_value"), val_loss=v.get("val_loss_mean"),
               target=v.get("target_val_loss"))


def commit_message(row: dict, tag: str) -> str:
    """The contract's commit message: hypothesis, rationale, then Ratchet-* trailers with the evidence."""
    lines = [row.get("hypothesis") or "ratchet edit", ""]
    if row.get("rationale"):
        lines += [row["rationale"].strip(), ""]
    if row.get("calibrates"):
        lines += [f"Step calibration: the edit of experiment {row['calibrates']} with the length moved from "
                  f"{row['steps_before']} to {row['steps_after']} steps ({row['calibration']}).", ""]
    lines.append(f"Ratchet-Experiment: {tag}/{row['id']}")
    if row.get("calibrates"):
        lines.append(f"Ratchet-Calibrated: steps {row['steps_before']} -> {row['steps_after']} (from {tag}/{row['calibrates']})")
    if row.get("candidate_s") is not None and row.get("incumbent_s") is not None:
        change = row["candidate_s"] / row["incumbent_s"] - 1
        p = "n/a" if row.get("p_value") is None else f"{row['p_value']:.2g}"
        n = (row.get("verdict") or {}).get("n_pairs", 0)
        lines.append(f"Ratchet-Wall-Clock: {row['candidate_s']:.2f}s vs {row['incumbent_s']:.2f}s "
                     f"({change:+.1%}, n={n}, p={p})")
    if row.get("val_loss") is not None:
        lines.append(f"Ratchet-Val-Loss: {row['val_loss']:.4f} (target {row['target']:.4f})")
    lines.append(f"Ratchet-Proposer: {row.get('proposer') or 'manual'}")
    if row["decision"] != Decision.ACCEPTED:
        lines.append(f"Ratchet-Decision: {row['decision']}: {row['reason']}".splitlines()[0])
    return "\n".join(lines) + "\n"


def recorded_speedup(message: str) -> float | None:
    """The speedup a commit's Ratchet-Wall-Clock trailer claims, for replay."""
    wall = trailers(message).get("Ratchet-Wall-Clock")
    if not wall:
        return None
    cand, inc = wall.split(" vs ")
    return 1 - float(cand.rstrip("s")) / float(inc.split("s")[0])
