"""The val-loss target a session keeps, and how many baseline runs it takes to set it.

Pure functions of the baseline's runs (agent/baseline.py measures them). The target is fixed for the whole tag,
so accepted edits cannot drift quality down step by step.
"""
import math

import numpy as np
from scipy import stats

from agent.verdict.judge import NoisePrior


def target_from_baseline(val_losses, tolerance_sigmas: float = 2.0, min_tolerance: float = 0.002) -> float:
    """target = mean + max(tolerance_sigmas * sd, min_tolerance), sd the seed-to-seed sample sd (ddof=1).

    Two sd: a candidate of baseline quality judged on its mean of >= 4 runs passes with ~99% probability.
    min_tolerance (nats) guards against a few baseline runs that happen to agree (and a single run, sd unknown).
    The target stays fixed for the session, so accepted edits cannot drift quality down step by step.
    """
    losses = np.asarray(val_losses, dtype=float)
    if losses.ndim != 1 or losses.size == 0 or not np.all(np.isfinite(losses)):
        raise ValueError(f"baseline val losses must be a non-empty list of finite numbers, got {val_losses!r}")
    if tolerance_sigmas < 0 or min_tolerance < 0:
        raise ValueError(f"tolerance_sigmas and min_tolerance must be >= 0, got {tolerance_sigmas}, {min_tolerance}")
    sd = losses.std(ddof=1) if losses.size > 1 else 0.0
    return float(losses.mean() + max(tolerance_sigmas * sd, min_tolerance))


def baseline_runs_needed(val_losses, seconds, tolerance_sigmas: float = 2.0, min_tolerance: float = 0.002,
                         min_speedup: float = 0.01, max_runs: int = 5, confidence: float = 0.9,
                         prior: NoisePrior | None = None) -> int:
    """How many incumbent runs the baseline needs, given those measured so far: len(seconds) when they are enough.

    Ask after each run; at least 2, at most max_runs. Enough when, at the one-sided `confidence` upper bound of
    each sd: tolerance_sigmas x the val-loss sd <= min_tolerance (the target is then mean + min_tolerance
    whatever the true sd; target_from_baseline is unchanged), and the run-time CV <= min_speedup / 2 (the first
    block resolves a minimum speedup anyway; every experiment's pairs refine the prior). A prior from earlier
    sessions (var d = 2 CV^2) stands in for the runs' CV. On a GPU node two or three runs; at CPU noise max_runs.
    """
    m = len(seconds)
    if m != len(val_losses):
        raise ValueError(f"one val loss per run: {len(val_losses)} val losses for {m} runs")
    if m < 2 or m >= max_runs:
        return max(2, min(m, max_runs))

    def upper(sd: float, df: int) -> float:
        return sd * math.sqrt(df / stats.chi2.ppf(1 - confidence, df))

    val_sd = upper(float(np.std(val_losses, ddof=1)), m - 1)
    cv = upper(float(np.std(np.log(seconds), ddof=1)), m - 1) if prior is None \
        else upper(math.sqrt(float(prior.var) / 2), prior.df)
    return m if tolerance_sigmas * val_sd <= min_tolerance and cv <= min_speedup / 2 else m + 1
