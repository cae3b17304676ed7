"""What the judge can detect: the smallest true speedup that its first look, and its last, accepts with a given
chance at the noise this machine measured. A proposer sizes its edits by it: on a machine whose pairs scatter by
5%, a 1% win costs a whole experiment and comes back "unprovable", so it is worth proposing only inside a larger
change.

Nothing here re-derives the judge's critical values: the decision is the judge's own (`look_stats`,
`look_outcome`), asked at synthetic pairs, so a change of the judge (its alpha spending, the prior's inflation, the
F test that drops the prior) moves these numbers with it.

The chance that the look at n pairs accepts a candidate whose pairs' log ratios d are N(mu, sd^2): the look
accepts when the mean of d is below a critical mean c(s^2) that depends on the pairs' own sample variance s^2 (the
t quantile on n - 1 df, or the variance pooled with the prior, or the prior dropped by the F test). For normal
pairs the mean and s^2 are independent, so
    P(accept) = E over s^2 of Phi((c(s^2) - mu) sqrt(n) / sd),   with (n - 1) s^2 / sd^2 ~ chi2(n - 1),
averaged here over equal-probability quantiles of s^2. "The last look" is that look alone, were the test to reach
it: earlier looks may accept first, or stop a candidate as futile (tests/test_detectable.py measures both).
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from agent.verdict.judge import JudgeParams, NoisePrior, TimeOutcome, look_outcome, look_stats

QUANTILES = 64  # quantiles of the sample variance the chance is averaged over (midpoints of equal-probability bins)
FAR = -20.0     # a mean log ratio beyond any candidate (1 - e^-20 faster): the lower end of every bisection
STEPS = 60      # bisection halvings: FAR / 2^60 is far below any speedup worth printing
HALF, MOST = 0.5, 0.9  # the chances of acceptance Detectable reports


@dataclass(frozen=True)
class Detectable:
    """The true speedups that one look of the judge accepts with chance HALF and MOST."""
    pairs: int           # the look, in interleaved pairs (two timed runs each)
    half: float | None   # speedup (1 - time ratio) accepted half the time at this look; None: no speedup is
    most: float | None   # speedup accepted nine times in ten at this look; None: no speedup is


def unit_pairs(n: int) -> np.ndarray:
    """n numbers [n] with mean 0 and sample variance 1: synthetic pairs are mean + sd * these."""
    z = np.arange(n) - (n - 1) / 2
    return z / z.std(ddof=1)


def critical_mean(params: JudgeParams, n: int, var, prior: NoisePrior | None = None) -> np.ndarray:
    """The largest mean log ratio that the look at n pairs accepts (FASTER), for pairs whose sample variance is
    var [k] -> [k]; -inf where no mean is accepted. Bisection on the judge's own decision, which is monotone in the
    mean at a fixed variance (significance and min_speedup both ask for a low mean)."""
    var = np.atleast_1d(np.asarray(var, dtype=float))
    spread = np.sqrt(var)[:, None] * unit_pairs(n)  # [k, n]

    def faster(mean: np.ndarray) -> np.ndarray:  # [k] -> bool [k]
        with np.errstate(over="ignore"):  # a bound's expm1 at a far mean and a huge variance: inf, as it should be
            s = look_stats(mean[:, None] + spread, params, prior)
        return look_outcome(s, params, last=n == params.max_pairs, prior=prior is not None) == TimeOutcome.FASTER

    lo, hi = np.full(var.shape, FAR), np.zeros(var.shape)  # faster at lo (where any mean is), never at 0
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        ok = faster(mid)
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    return np.where(faster(np.full(var.shape, FAR)), lo, -np.inf)


def _critical_means(params: JudgeParams, n: int, sd: float, prior: NoisePrior | None) -> np.ndarray:
    """c(s^2) at QUANTILES equal-probability quantiles of the sample variance of n pairs of sd `sd` -> [QUANTILES]."""
    q = (np.arange(QUANTILES) + 0.5) / QUANTILES
    return critical_mean(params, n, sd ** 2 * stats.chi2.ppf(q, n - 1) / (n - 1), prior)


def _chance(critical: np.ndarray, n: int, sd: float, mu) -> np.ndarray:
    """P(accept) at true mean log ratios mu [m] -> [m], given the critical means [QUANTILES]."""
    mu = np.atleast_1d(np.asarray(mu, dtype=float))
    return stats.norm.cdf((critical[None, :] - mu[:, None]) * math.sqrt(n) / sd).mean(axis=-1)


def accept_chance(params: JudgeParams, n: int, speedup: float, sd: float, prior: NoisePrior | None = None) -> float:
    """The chance that the look at n pairs accepts a candidate that is truly `speedup` faster (1 - time ratio),
    on pairs whose log ratios scatter with sd `sd`."""
    _check(n, sd)
    return float(_chance(_critical_means(params, n, sd, prior), n, sd, math.log1p(-speedup))[0])


def detectable_speedup(params: JudgeParams, n: int, chance: float, sd: float,
                       prior: NoisePrior | None = None) -> float | None:
    """The true speedup that the look at n pairs accepts with probability `chance`; None when none does (the
    look's critical values leave no room at this noise)."""
    _check(n, sd)
    critical = _critical_means(params, n, sd, prior)
    if _chance(critical, n, sd, FAR)[0] < chance:
        return None
    lo, hi = FAR, 0.0  # the chance falls as the mean log ratio rises: >= chance at lo, < chance at hi
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _chance(critical, n, sd, mid)[0] >= chance else (lo, mid)
    return float(-math.expm1(lo))


def detectable(params: JudgeParams, sd: float, prior: NoisePrior | None = None) -> tuple[Detectable, Detectable]:
    """The judge's first look (after one block with a prior, min_pairs without) and its last (max_pairs)."""
    looks = params.looks_for(prior is not None)
    return tuple(Detectable(n, detectable_speedup(params, n, HALF, sd, prior),
                            detectable_speedup(params, n, MOST, sd, prior)) for n in (looks[0], looks[-1]))


def _check(n: int, sd: float) -> None:
    if n < 2:
        raise ValueError(f"a look needs at least 2 pairs, got {n}")
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"the noise sd must be a finite number > 0, got {sd!r}")
