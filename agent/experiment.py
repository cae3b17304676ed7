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
    run that was killed half-way, are taken as they are (a re-run would be rejected as a duplicate); the next
    variant follows from them (calibrate.next_length), and one in flight resumes like any experiment."""
    calibrating = h.settings.length.calibrate if calibrate_length is None else calibrate_length
    pid = (extra or {}).get("proposal_id")
    earlier = [r for r in h.ledger.rows() if r.get("proposal_id") == pid] if pid else []
    noise = _noise(h) if calibrating else None
    first = next((r for r in earlier if r["kind"] != "calibrate"), None)
    rows = [] if first else [h.try_edit(text, proposer, kind, extra, should_stop, calibrate_noise=noise)]
    if not calibrating:
        return rows
    first = first or rows[0]
    variants = [r for r in earlier if r["kind"] == "calibrate"]
    variant_extra = {k: v for k, v in (extra or {}).items() if k != "notes"}  # the notes stay on the first row only
    while (variant := _next_variant(h, first, variants, noise)) is not None:
        variant_text, calibration = variant
        row = h.try_edit(variant_text, proposer, "calibrate", {**variant_extra, **calibration}, should_stop,
                         calibrate_noise=noise)
        variants.append(row)
        rows.append(row)
    return rows


def _noise(h: Harness) -> float:
    """The seed-to-seed sd of the baseline's val loss (at least [target] min_tolerance)."""
    base = h.require_baseline()["baseline"]
    return max(float(np.std(base["val_losses"], ddof=1)), h.settings.target.min_tolerance)


def _next_variant(h: Harness, first: dict, variants: list[dict], noise: float) -> tuple[str, dict] | None:
    """The next calibrated variant of the edit judged in `first`, after `variants` (ledger rows) -> (its edit text,
    its row's calibration fields), or None when calibration is over."""
    L, base = h.settings.length, h.require_baseline()["baseline"]
    try:
        length = calibrate.read_length(h.ws.repo.git.show(f"{first['commit']}:{L.file}"), L.pattern, L.file) \
            if first.get("commit") else None
    except (calibrate.LengthError, git.GitCommandError) as e:  # no knob in this tree: nothing to calibrate
        h.events.stage(f"no calibration: {e}")
        return None
    if length is None:
        return None
    steps, plan, why = calibrate.next_length(first, variants, length, base["target"], noise,
                                             h.settings.judge.min_speedup, L.min_fraction, L.max_fraction,
                                             L.max_attempts)
    if steps is None:
        return None
    h.events.stage(f"calibrating the length ({plan.direction}): {steps} steps: {why}")
    fields = {"calibrates": first["id"], "steps_before": length, "steps_after": steps, "calibration": why}
    return variant_edit(h, first, steps), fields


def variant_edit(h: Harness, row: dict, steps: int) -> str:
    """The edit judged in `row` with the length knob at `steps`, as an ordinary edit against the same parent: the
    unified diff of its commit with the knob moved, under its hypothesis and rationale. The same row and steps
    always give the same text, so a variant in flight resumes like any experiment."""
    L = h.settings.length
    wt = h.ws.add_worktree("variant", row["commit"])
    try:
        calibrate.set_length(wt, L.file, L.pattern, steps)
        diff = git.Repo(wt).git.diff(row["parent"])
    finally:
        h.ws.remove_worktree(wt)
    return f"HYPOTHESIS: {row.get('hypothesis') or ''}\nRATIONALE: {row.get('rationale') or ''}\n\n{diff}\n"


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
