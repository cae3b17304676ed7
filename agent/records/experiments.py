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
from agent.records.types import Arm, Decision, Experiment, Stage
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
        exp_id = self.ledger.next_id()
        self.ledger.exp_dir(exp_id).mkdir(parents=True, exist_ok=True)
        self.ledger.update_state(lambda state: state.update(inflight={"id": exp_id, "parent": parent, "key": key}))
        return exp_id, []

    def drop_inflight(self) -> None:
        """Forget the experiment in flight; its folder goes too unless the ledger already has its row."""
        inflight = self.ledger.load_state().get("inflight")
        if inflight is None:
            return
        if self.ledger.row(inflight["id"]) is None:
            shutil.rmtree(self.ledger.exp_dir(inflight["id"]), ignore_errors=True)
        self.ledger.update_state(lambda state: state.pop("inflight", None))

    def finish(self, exp: Experiment, cand_wt: Path | None, decision: Decision, reason: str, stage: Stage) -> dict:
        """Record a decision; -> the ledger row. `stage`: what decided: edit, guard, policy, smoke, screen, run (a
        candidate run failed), judge."""
        exp.decide(decision, reason, stage)
        if cand_wt is not None:
            exp.commit = self.ws.amend_message(cand_wt, commit_message(exp, self.ws.tag))
        self.ledger.write_json(self.ledger.exp_dir(exp.id) / "result.json", exp.to_row())  # the point of no return: recover() finishes from here
        self.publish(exp)
        return exp.to_row()

    def publish(self, exp: Experiment) -> None:
        """Move git and the ledger to match a saved decision. Idempotent: recover() calls it again after a crash."""
        if exp.commit and exp.decision == Decision.ACCEPTED:
            if self.ws.head() == exp.parent:
                self.ws.advance(exp.commit, exp.parent)
        elif exp.commit:
            exp.ref = self.ws.keep_rejected(exp.id, exp.commit)
        if self.ledger.row(exp.id) is None:
            self.ledger.append(exp.to_row())

        def land(state):
            if exp.decision == Decision.ACCEPTED:
                cand = [r for r in exp.runs if r["arm"] == CANDIDATE]
                state["incumbent"] = Arm(exp.commit, [r["seconds"] for r in cand], [r["val_loss"] for r in cand],
                                         cand[-1]["curve"]).to_state()
            state.pop("inflight", None)
        self.ledger.update_state(land)

    def recover(self) -> None:
        """After a crash or kill -9 (its orphaned runs killed by the caller): finish a saved decision. An experiment
        interrupted before its decision stays in flight with the runs it finished (its journal): `claim` resumes it
        when the same experiment is asked for again and discards it when another is."""
        inflight = self.ledger.load_state().get("inflight")
        if inflight:
            result = self.ledger.exp_dir(inflight["id"]) / "result.json"
            if result.exists():
                self.publish(Experiment.from_row(json.loads(result.read_text())))
        self.ws.remove_all_worktrees()


def experiment_key(kind: str, text: str) -> str:
    """What makes two requests the same experiment, for resume: the edit's text and its kind (a calibrated
    variant's text holds its length)."""
    return f"{kind}:" + hashlib.sha256(text.encode()).hexdigest()


def order_seed(tag: str, exp_id: str) -> int:
    """The seed of an experiment's run order (the judge's coin flip per block): fixed per experiment, so a resume
    re-runs the same order, and unrelated to anything the machine does (see agent/verdict/judge.py, Order)."""
    return zlib.crc32(f"{tag}/{exp_id}".encode())


def commit_message(exp: Experiment, tag: str) -> str:
    """The contract's commit message: hypothesis, rationale, then Ratchet-* trailers with the evidence."""
    lines = [exp.hypothesis or "ratchet edit", ""]
    if exp.rationale:
        lines += [exp.rationale.strip(), ""]
    calibrated = exp.extra.get("calibrates")
    if calibrated:
        before, after = exp.extra["steps_before"], exp.extra["steps_after"]
        lines += [f"Step calibration: the edit of experiment {calibrated} with the length moved from "
                  f"{before} to {after} steps ({exp.extra['calibration']}).", ""]
    lines.append(f"Ratchet-Experiment: {tag}/{exp.id}")
    if calibrated:
        lines.append(f"Ratchet-Calibrated: steps {before} -> {after} (from {tag}/{calibrated})")
    head = exp.headline
    if head["candidate_s"] is not None and head["incumbent_s"] is not None:
        change = head["candidate_s"] / head["incumbent_s"] - 1
        p = "n/a" if head["p_value"] is None else f"{head['p_value']:.2g}"
        n = (exp.verdict or {}).get("n_pairs", 0)
        lines.append(f"Ratchet-Wall-Clock: {head['candidate_s']:.2f}s vs {head['incumbent_s']:.2f}s "
                     f"({change:+.1%}, n={n}, p={p})")
    if head["val_loss"] is not None:
        lines.append(f"Ratchet-Val-Loss: {head['val_loss']:.4f} (target {exp.target:.4f})")
    lines.append(f"Ratchet-Proposer: {exp.proposer or 'manual'}")
    if exp.decision != Decision.ACCEPTED:
        lines.append(f"Ratchet-Decision: {exp.decision}: {exp.reason}".splitlines()[0])
    return "\n".join(lines) + "\n"


def recorded_speedup(message: str) -> float | None:
    """The speedup a commit's Ratchet-Wall-Clock trailer claims, for replay."""
    wall = trailers(message).get("Ratchet-Wall-Clock")
    if not wall:
        return None
    cand, inc = wall.split(" vs ")
    return 1 - float(cand.rstrip("s")) / float(inc.split("s")[0])
