"""The baseline: the incumbent measured on its own, [judge] baseline_runs times at most (fewer where the noise
allows, `target.baseline_runs_needed`), which pins the val-loss target, the protected files' hashes and the dataset
for the whole tag. A resumed baseline keeps the runs it finished (its journal) and the data they were measured with.
"""
import time
from dataclasses import asdict

from agent import settings as settings_mod
from agent.comparison import HarnessError, Stopped
from agent.guard import integrity
from agent.harness import Harness
from agent.measure.devices import Measurement
from agent.measure.runner import AbortPolicy
from agent.records.types import Arm, Decision, Experiment
from agent.verdict.judge import INCUMBENT
from agent.verdict.target import baseline_runs_needed, target_from_baseline


def measure_baseline(h: Harness, force: bool = False, should_stop=lambda: False) -> dict:
    """Measure the incumbent and set the target. `should_stop` is asked between runs: Stopped leaves no baseline
    (the next call measures it again, keeping the finished runs)."""
    h.recover()
    if "baseline" in h.state and not force:
        return h.state["baseline"]
    s = h.settings
    head = h.ws.ensure_branch()
    exp_id, done = h.records.claim(f"baseline of {head}", head)
    runs = [Measurement(**entry) for entry in done]
    exp_dir = h.ledger.exp_dir(exp_id)
    h.events.experiment(exp_id, "baseline")
    if not runs:  # a resumed baseline keeps the data and hashes its finished runs were measured with
        h.check_data(new_baseline=True)
    wt = h.ws.add_worktree("incumbent", head)
    hashes = integrity.protected_hashes(wt, s.paths.protected)
    fingerprint = h.state.get("data_fingerprint") if runs else integrity.data_fingerprint(s.data_dir)
    h.ledger.update_state(lambda state: state.update(protected_hashes=hashes, data_fingerprint=fingerprint))
    try:
        for i in range(len(runs), s.judge.baseline_runs):
            if len(runs) >= 2 and baseline_runs_needed(
                    [m.val_loss for m in runs], [m.seconds for m in runs], s.target.tolerance_sigmas,
                    s.target.min_tolerance, s.judge.min_speedup, s.judge.baseline_runs,
                    prior=h.noise_prior()) <= len(runs):
                h.events.stage(f"baseline: {len(runs)} runs are enough at this noise")
                break
            if should_stop():
                raise Stopped()
            h.events.run_started(INCUMBENT, i, None)
            m = h.measure(INCUMBENT, wt, exp_dir / f"run-{i:02d}", seed=1 + i, timeout=s.train.first_timeout,
                          policy=AbortPolicy())
            if not m.ok:
                raise HarnessError(f"baseline run {i} failed: {m.status}: {m.reason} (log: {m.log})")
            h.ledger.add_to_journal(exp_id, asdict(m))
            runs.append(m)
    finally:
        h.ws.remove_worktree(wt)
    seconds = [m.seconds for m in runs]
    losses = [m.val_loss for m in runs]
    target = s.target.value if s.target.policy == "fixed" else target_from_baseline(
        losses, s.target.tolerance_sigmas, s.target.min_tolerance)
    arm = Arm(head, seconds, losses, runs[-1].curve)
    baseline = {**arm.to_state(), "target": target, "id": exp_id}
    reason = f"target {target:.4f}"
    if arm.mean_val_loss > target:  # only a fixed target can be missed by the baseline itself
        reason += (f"; WARNING: the baseline's own val loss {arm.mean_val_loss:.4f} misses this fixed target, "
                   f"so only edits that also learn better can be accepted (too few train shards? a short config?)")
        h.events.stage(reason)
    exp = Experiment(exp_id, "baseline", head, time.time(), hypothesis="baseline", runs=[asdict(m) for m in runs],
                     sandbox=h.devices.sandbox_note, target=target)
    exp.decide(Decision.BASELINE, reason)
    h.ledger.append(exp.to_row())

    def land(state):
        state.update(baseline=baseline, incumbent=arm.to_state(), run_definition=settings_mod.run_definition(s))
        state.pop("inflight", None)
    h.ledger.update_state(land)
    return baseline
