"""What the tag's earlier experiments tell the verdict: the run-time noise of interleaved pairs (the judge's prior)
and the incumbent's runs that the screen compares a candidate's first run with. Pure functions of ledger rows.
"""
import time

from agent.verdict.judge import INCUMBENT, NoisePrior, noise_prior as pooled_prior
from agent.verdict.screen import IncumbentReference, ScreenParams


def noise_prior(rows: list[dict]) -> NoisePrior | None:
    """The run-time noise this machine showed in the interleaved pairs of every experiment so far (each one's
    finished runs, up to its first failed one; baselines do not count, see judge.noise_prior)."""
    experiments = []
    for row in rows:
        if row["kind"] == "baseline":
            continue
        runs = []
        for r in row.get("runs", []):
            if r["status"] != "ok":
                break
            runs.append((r["arm"], r["seconds"]))
        experiments.append(runs)
    return pooled_prior(experiments)


def screen_reference(rows: list[dict], row: dict, params: ScreenParams, recent_max_age: float,
                     now: float | None = None) -> IncumbentReference | None:
    """The screen's reference for the candidate's first timed run in experiment `row`, or None (the runner's abort
    rules then watch the run). When the first block opened with the incumbent: that lead run, measured just before
    on the same machine. When it opened with the candidate: the incumbent's last params.recent_runs runs of
    experiments started within `recent_max_age` seconds (a change of the machine's load since then reads as the
    candidate's pace: per preset, 0 keeps the screen to lead runs). The noise comes from every earlier finished
    run, pooled within each commit. ValueError: the runs cannot make a reference."""
    now = time.time() if now is None else now
    by_commit: dict[str, list[tuple[float, dict]]] = {}
    for done in rows:
        for r in done.get("runs", []):
            if r["status"] == "ok" and r.get("curve"):
                # a candidate's runs are its commit's: the incumbent's when accepted or replayed, noise otherwise
                commit = done["parent"] if r["arm"] == INCUMBENT else done.get("commit")
                by_commit.setdefault(commit, []).append((done["time"], r))
    runs = [r for r in row["runs"] if r["arm"] == INCUMBENT and r["status"] == "ok" and r.get("curve")]
    if not runs and params.recent_runs:
        recent = [r for t, r in by_commit.get(row["parent"], []) if now - t <= recent_max_age]
        total = recent[-1]["curve"][-1]["total"] if recent else None
        runs = [r for r in recent if r["curve"][-1]["total"] == total][-params.recent_runs:]
    if not runs:
        return None
    # the reference's runs are a group of their own (recent runs: taken out of their commit's)
    earlier = [[r for _, r in g if not any(r is x for x in runs)] for g in by_commit.values()]
    reference = IncumbentReference.from_runs(runs, earlier=earlier)
    # too few runs to know the noise yet: the runner's abort rules instead
    return reference if reference.df >= params.min_df else None
