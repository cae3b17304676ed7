"""Replay: re-measure accepted commits against their parents with a fresh judge (`ratchet replay`), or cherry-pick
them in order onto another base and verify each against the one before it. A row per commit, kind "replay",
decision "reproduced" or "not reproduced".
"""
import time

from agent.comparison import Comparison
from agent.edit.workspace import trailers
from agent.harness import Harness
from agent.records.experiments import recorded_speedup
from agent.records.types import Arm, Decision, Experiment


def replay(h: Harness, revs: list[str], onto: str | None = None) -> list[dict]:
    h.recover()
    state = h.require_baseline()
    commits = [h.ws.resolve(r) for r in revs]
    base_wt = None
    if onto is not None:
        base_wt = h.ws.add_worktree("replay-onto", h.ws.resolve(onto))
    rows = []
    try:
        for original in commits:
            if base_wt is not None:
                parent = h.ws.resolve_in(base_wt, "HEAD")
                commit = h.ws.cherry_pick(base_wt, original)
            else:
                parent, commit = h.ws.parent(original), original
            rows.append(_replay_one(h, original, parent, commit, state))
        if base_wt is not None and rows:
            h.ws.repo.git.update_ref(f"refs/ratchet/{h.ws.tag}/replayed", rows[-1]["commit"])
    finally:
        if base_wt is not None:
            h.ws.remove_worktree(base_wt)
    return rows


def _replay_one(h: Harness, original: str, parent: str, commit: str, state: dict) -> dict:
    exp_id, done = h.records.claim(f"replay:{original}", parent)
    message = h.ws.message(original)
    exp = Experiment(exp_id, "replay", parent, time.time(), trailers(message).get("Ratchet-Proposer", ""),
                     hypothesis=message.splitlines()[0], diff=h.ws.diff(commit), commit=commit,
                     extra={"replay_of": original, "recorded_speedup": recorded_speedup(message)})
    h.events.experiment(exp_id, f"replay {original[:10]}: {exp.hypothesis}")
    cand_wt = h.ws.add_worktree("candidate", commit)
    inc_wt = h.ws.add_worktree("incumbent", parent)
    # the parent may be any commit since the baseline: until its first run, assume the slowest known time
    reference = max(state["baseline"], state["incumbent"], key=lambda x: Arm.from_state(x).mean_seconds)
    try:
        comparison = Comparison(h, exp, cand_wt, inc_wt, reference, state["baseline"]["target"])
        decision, reason, exp.verdict, stage = comparison.run(done)
    finally:
        h.ws.remove_worktree(cand_wt)
        h.ws.remove_worktree(inc_wt)
    exp.decide(Decision.REPRODUCED if decision == Decision.ACCEPTED else Decision.NOT_REPRODUCED, reason, stage)
    row = exp.to_row()
    h.ledger.append(row)
    h.records.drop_inflight()
    h.events.decided(row)
    return row
