"""An experiment as a user or the loop asks for it: an edit through the harness, then, when its loss says a different
length would win, its calibrated variants (agent/verdict/calibrate.py plans them); and the loop's entry points: a
proposal, or a proposer's failure recorded without a run.
"""
import time
from dataclasses import asdict

import git
import numpy as np

from agent.harness import Harness
from agent.records.types import Decision, Experiment
from agent.verdict import calibrate


def experiment(h: Harness, text: str, proposer: str = "manual", kind: str = "try", extra: dict | None = None,
               should_stop=lambda: False, calibrate_length: bool | None = None) -> list[dict]:
    """An edit through the judge, then, when its loss says a different length would win, up to
    [length] max_attempts calibrated variants (see agent/verdict/calibrate.py). Returns the ledger rows made by this call.
    `calibrate_length`: whether to calibrate (default: [length] calibrate).

    extra["proposal_id"] (the loop's) makes this resumable: rows already in the ledger for that proposal, from a
    run that was killed half-way, are reused rather than re-run (a re-run would be rejected as a duplicate)."""
    calibrating = h.settings.length.calibrate if calibrate_length is None else calibrate_length
    pid = (extra or {}).get("proposal_id")
    earlier = [r for r in h.ledger.rows() if r.get("proposal_id") == pid] if pid else []
    noise = _noise(h) if calibrating else None
    first = next((r for r in earlier if r["kind"] != "calibrate"), None)
    rows = [] if first else [h.try_edit(text, proposer, kind, extra, should_stop, calibrate_noise=noise)]
    if calibrating:
        done = {r["steps_after"]: r for r in earlier if r["kind"] == "calibrate"}
        rows += _calibrate(h, text, first or rows[0], proposer, extra, should_stop, noise, done)
    return rows


def _noise(h: Harness) -> float:
    """The seed-to-seed sd of the baseline's val loss (at least [target] min_tolerance)."""
    base = h.require_baseline()["baseline"]
    return max(float(np.std(base["val_losses"], ddof=1)), h.settings.target.min_tolerance)


def _calibrate(h: Harness, text: str, row: dict, proposer: str, extra: dict | None, should_stop, noise: float,
               done: dict) -> list[dict]:
    """Derived attempts at other lengths; `done`: attempts already in the ledger (by step count), reused."""
    L, base = h.settings.length, h.require_baseline()["baseline"]
    try:
        length = calibrate.read_length(h.ws.repo.git.show(f"{row['commit']}:{L.file}"), L.pattern, L.file) \
            if row.get("commit") else None
    except (calibrate.LengthError, git.GitCommandError) as e:  # no knob in this tree: nothing to calibrate
        h.events.stage(f"no calibration: {e}")
        return []
    if length is None:
        return []
    plan, why = calibrate.plan(row, length, base["target"], noise, h.settings.judge.min_speedup,
                               L.min_fraction, L.max_fraction)
    if plan is None:
        return []
    h.events.stage(f"calibrating the length ({plan.direction}): {why}")
    variant_extra = {k: v for k, v in (extra or {}).items() if k != "notes"}  # the notes stay on the first row only
    rows, steps = [], plan.first
    for _ in range(L.max_attempts):
        r = done.get(steps) or h.try_edit(
            text, proposer, "calibrate", {**variant_extra, "calibrates": row["id"], "steps_before": length,
                                          "steps_after": steps, "calibration": why},
            should_stop, length=steps, calibrate_noise=noise)
        if steps not in done:
            rows.append(r)
        if r["decision"] == Decision.ACCEPTED or not (r.get("verdict") or {}).get("val_loss_mean"):
            break
        plan.bracket.record(steps, met_target=r["verdict"]["val_loss_mean"] <= base["target"])
        steps = plan.bracket.next(steps)
        if steps is None:
            break
    return rows


def run_proposal(h: Harness, proposal, made_on: str, should_stop=lambda: False, proposal_id: str = "") -> list[dict]:
    """One experiment from a proposer's Proposal; a failed proposal is recorded without running anything.
    proposal_id: the loop's id for it; a second call with the same id (a resume) finishes what the first left."""
    extra = {"key": proposal.key, "usage": asdict(proposal.usage), "attempts": proposal.attempts,
             "proposed_on": made_on, "proposal_id": proposal_id, "notes": proposal.notes}
    if proposal.error:
        return [record_failure(h, proposal, extra)]
    return experiment(h, proposal.text, proposer=proposal.proposer, kind="run", extra=extra, should_stop=should_stop)


def record_failure(h: Harness, proposal, extra: dict) -> dict:
    h.recover()
    h.records.drop_inflight()
    exp = Experiment(h.ledger.next_id(), "run", h.ws.head(), time.time(), proposal.proposer,
                     hypothesis=proposal.hypothesis, extra=extra)
    exp.decide(Decision.FAILED, f"proposer failed: {proposal.error}")
    row = exp.to_row()
    h.ledger.append(row)
    h.events.decided(row)
    return row
