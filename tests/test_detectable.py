"""What the judge can detect (agent/verdict/detectable.py) against the judge itself: seeded simulations of
decide_times at the speedups it reports."""
import math

import numpy as np
import pytest

from agent.verdict.detectable import accept_chance, critical_mean, detectable, detectable_speedup
from agent.verdict.judge import JudgeParams, NoisePrior, TimeOutcome, decide_times

TRIALS = 20000  # the simulated acceptance rate's standard error is at most 0.0035
PARAMS = JudgeParams()


def simulated_accepts(speedup: float, sd: float, pairs: int, prior: NoisePrior | None, seed: int) -> float:
    """The share of candidates truly `speedup` faster that the judge accepts with `pairs` pairs available."""
    d = np.random.default_rng(seed).normal(math.log1p(-speedup), sd, (TRIALS, pairs))
    outcome, _ = decide_times(d, PARAMS, prior)
    return float(np.mean(outcome == TimeOutcome.FASTER))


@pytest.mark.parametrize("sd, with_prior", [(0.014, True), (0.014, False), (0.07, True), (0.07, False)])
def test_first_look_speedups_are_accepted_as_often_as_said(sd, with_prior):
    """At GPU-like (CV 1%) and CPU-like (CV 5%) noise, with and without the prior: the first look alone (only its
    pairs available) accepts the reported speedups half the time and nine times in ten, and the one it says it
    accepts one time in ten that rarely."""
    prior = NoisePrior(sd ** 2, 40) if with_prior else None
    first, _ = detectable(PARAMS, sd, prior)
    assert first.pairs == (PARAMS.prior_first_look if with_prior else PARAMS.min_pairs)
    assert simulated_accepts(first.half, sd, first.pairs, prior, seed=1) == pytest.approx(0.5, abs=0.02)
    assert simulated_accepts(first.most, sd, first.pairs, prior, seed=2) == pytest.approx(0.9, abs=0.02)
    rarely = detectable_speedup(PARAMS, first.pairs, 0.1, sd, prior)
    assert rarely < first.half
    assert simulated_accepts(rarely, sd, first.pairs, prior, seed=3) == pytest.approx(0.1, abs=0.015)


def test_last_look_alone_and_the_whole_test():
    """The last look's figures are that look's alone: the judge stopped at it agrees; run as a sequence, the
    earlier looks' futility stops (with a prior) take some of those candidates first, as the text warns."""
    sd, prior = 0.014, NoisePrior(0.014 ** 2, 40)
    _, last = detectable(PARAMS, sd, prior)
    assert last.pairs == PARAMS.max_pairs
    assert accept_chance(PARAMS, last.pairs, last.half, sd, prior) == pytest.approx(0.5, abs=1e-6)
    # one look, at max_pairs, at the sequential judge's level per look
    alone = JudgeParams(alpha=PARAMS.alpha_for(True), min_pairs=PARAMS.max_pairs, prior_first_look=PARAMS.max_pairs)
    d = np.random.default_rng(4).normal(math.log1p(-last.half), sd, (TRIALS, last.pairs))
    outcome, _ = decide_times(d, alone, prior)
    assert np.mean(outcome == TimeOutcome.FASTER) == pytest.approx(0.5, abs=0.02)
    sequential = simulated_accepts(last.half, sd, last.pairs, prior, seed=4)
    assert 0.3 < sequential < 0.5


def test_low_noise_bottoms_out_at_the_minimum_speedup():
    """At CV 0.3% the last look accepts half of the candidates exactly min_speedup faster: the mean must not be
    below min_speedup, which binds before significance does."""
    _, last = detectable(PARAMS, 0.004, NoisePrior(0.004 ** 2, 40))
    assert last.half == pytest.approx(PARAMS.min_speedup, rel=1e-6)


def test_critical_mean_is_the_judge_boundary():
    """c(s^2) separates accepted from not accepted means for the judge at that variance; at a huge variance with
    one degree of freedom nothing is accepted at any mean a run could have."""
    c = critical_mean(PARAMS, 4, [0.01 ** 2])[0]
    z = np.array([-1.5, -0.5, 0.5, 1.5]) / np.std([-1.5, -0.5, 0.5, 1.5], ddof=1)
    for mean, accepted in ((c - 1e-9, True), (c + 1e-6, False)):
        outcome, _ = decide_times((mean + 0.01 * z)[None, :], PARAMS)
        assert (outcome[0] == TimeOutcome.FASTER) == accepted
    assert detectable_speedup(JudgeParams(min_pairs=2, max_pairs=2), 2, 0.9, sd=50.0) is None


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="sd"):
        detectable(PARAMS, 0.0)
    with pytest.raises(ValueError, match="2 pairs"):
        accept_chance(PARAMS, 1, 0.1, 0.01)
