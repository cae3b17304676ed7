import dataclasses
import json
import math

import numpy as np
import pytest

from agent import bench_judge
from agent.judge import (
    CANDIDATE, INCUMBENT, Judge, JudgeParams, TimeOutcome, arm_at, decide_times, pair_log_ratios,
    target_from_baseline,
)

TARGET = 3.30


def run_session(judge: Judge, seconds_of, val_loss: float = 3.20):
    """Feed the judge until it decides; seconds_of(run_index, arm) gives each run's time."""
    while judge.verdict().state == "continue":
        arm = judge.next_arm()
        judge.add(arm, seconds_of(len(judge.runs), arm), val_loss if arm == CANDIDATE else None)
    return judge.verdict()


def noisy(rng, speedup: float, cv: float = 0.05):
    return lambda i, arm: 17.0 * math.exp(rng.normal(0, cv)) * ((1 - speedup) if arm == CANDIDATE else 1.0)


def test_run_order_is_counterbalanced():
    order = [arm_at(i) for i in range(8)]
    assert order == [INCUMBENT, CANDIDATE, CANDIDATE, INCUMBENT] * 2
    judge = Judge(JudgeParams(), TARGET)
    for expected in order[:3]:
        assert judge.next_arm() == expected
        judge.add(expected, 17.0, 3.2)
    with pytest.raises(ValueError, match="must be the incumbent"):
        judge.add(CANDIDATE, 17.0, 3.2)


def test_linear_drift_cancels_over_a_block():
    drifting = 17.0 * np.exp(0.01 * np.arange(8))  # identical arms, machine 1% slower each run
    ratios = pair_log_ratios(drifting)
    np.testing.assert_allclose(ratios, [0.01, -0.01, 0.01, -0.01])
    np.testing.assert_allclose(ratios.mean(), 0.0, atol=1e-12)


def test_drifting_machine_does_not_fake_a_speedup():
    # Each run 1% faster than the last, noise 0.1%: with plain I C I C the candidate would win every pair.
    rng = np.random.default_rng(0)
    for _ in range(20):
        verdict = run_session(Judge(JudgeParams(), TARGET), lambda i, arm: 17.0 * 0.99 ** i * math.exp(rng.normal(0, 0.001)))
        assert verdict.state == "rejected"


@pytest.mark.parametrize("noise", [n for n in bench_judge.NOISE_MODELS if n.name.startswith("cpu")], ids=lambda n: n.name)
def test_null_false_accept_rate_within_alpha(noise):
    params = JudgeParams()
    row = bench_judge.simulate(noise, 0.0, 20000, params, np.random.default_rng(1))
    assert row["accept"] <= params.alpha


def test_identical_arms_rarely_accepted_through_the_judge():
    rng = np.random.default_rng(2)
    verdicts = [run_session(Judge(JudgeParams(), TARGET), noisy(rng, 0.0)) for _ in range(150)]
    accepted = sum(v.state == "accepted" for v in verdicts)
    assert accepted <= 5  # expected about 1 (alpha 0.01, design ~0.8%)
    assert all(v.state == "rejected" for v in verdicts if v.state != "accepted")


def test_judge_matches_vectorised_decisions():
    rng = np.random.default_rng(3)
    params = JudgeParams()
    for speedup in (-0.1, 0.0, 0.05, 0.1, 0.25):
        sessions = 17.0 * np.exp(rng.normal(0, 0.05, (8, 2 * params.max_pairs)))
        sessions[:, [arm_at(i) == CANDIDATE for i in range(2 * params.max_pairs)]] *= 1 - speedup
        outcome, n_pairs = decide_times(pair_log_ratios(sessions), params)
        for row, expected, n in zip(sessions, outcome, n_pairs):
            verdict = run_session(Judge(params, TARGET), lambda i, arm: row[i])
            assert verdict.n_pairs == n
            assert (verdict.state == "accepted") == (expected == TimeOutcome.FASTER)


@pytest.mark.parametrize("seed", range(5))
def test_clear_speedup_is_accepted(seed):
    params = JudgeParams()
    verdict = run_session(Judge(params, TARGET), noisy(np.random.default_rng(seed), 0.25))
    assert (verdict.state, verdict.reason) == ("accepted", "accepted")
    assert verdict.p_value < params.alpha
    assert 0 < verdict.speedup_lower < verdict.speedup < verdict.speedup_upper
    assert verdict.candidate_mean < verdict.incumbent_mean
    assert verdict.n_pairs <= params.max_pairs


@pytest.mark.parametrize("seed", range(5))
def test_clearly_slower_candidate_stops_early(seed):
    params = JudgeParams()
    verdict = run_session(Judge(params, TARGET), noisy(np.random.default_rng(seed), -0.25))
    assert (verdict.state, verdict.reason) == ("rejected", "slower")
    assert verdict.n_pairs < params.max_pairs
    assert verdict.speedup < 0


def test_not_significant_after_max_pairs():
    # Log ratios alternate -0.15, +0.10: a wide spread around a small speedup, neither clear nor futile.
    ratios = {0: 0.85, 1: 1.10}
    verdict = run_session(Judge(JudgeParams(), TARGET),
                          lambda i, arm: 17.0 * (ratios[(i // 2) % 2] if arm == CANDIDATE else 1.0))
    assert (verdict.state, verdict.reason) == ("rejected", "not significant after 10 pairs")
    assert verdict.n_runs == 20


def test_speedup_below_minimum_is_rejected():
    # A clean 0.5% speedup (noise 0.01%): real but below the 1% minimum.
    rng = np.random.default_rng(4)
    verdict = run_session(Judge(JudgeParams(), TARGET), noisy(rng, 0.005, cv=0.0001))
    assert (verdict.state, verdict.reason) == ("rejected", "speedup 0.5% < minimum 1.0%")


def test_val_loss_above_target_rejects_with_both_numbers():
    verdict = run_session(Judge(JudgeParams(), TARGET), noisy(np.random.default_rng(5), 0.25), val_loss=3.31)
    assert verdict.state == "rejected"
    assert verdict.reason == "val loss 3.3100 > target 3.3000"
    assert verdict.n_pairs >= JudgeParams().min_pairs  # within the margin: judged with the timing decision


def test_val_loss_far_above_target_rejects_early():
    params = JudgeParams()
    verdict = run_session(Judge(params, TARGET), noisy(np.random.default_rng(6), 0.25), val_loss=3.41)
    assert (verdict.state, verdict.reason) == ("rejected", "val loss 3.4100 > target 3.3000")
    assert verdict.n_pairs == params.val_reject_after


def test_rebuild_from_recorded_runs_gives_same_verdict():
    params = JudgeParams()
    judge = Judge(params, TARGET)
    verdict = run_session(judge, noisy(np.random.default_rng(7), 0.15))
    assert verdict.state != "continue"
    assert Judge.from_runs(params, TARGET, judge.runs).verdict() == verdict
    for cut in (3, 7):  # mid-session, also with an unpaired last run
        partial = Judge.from_runs(params, TARGET, judge.runs[:cut])
        assert partial.verdict().state == "continue"
        assert partial.next_arm() == arm_at(cut)
    json.dumps(dataclasses.asdict(verdict))  # plain floats, JSON-ready
    with pytest.raises(ValueError, match="already decided"):
        judge.add(judge.next_arm(), 17.0, 3.2)


@pytest.mark.parametrize("field, value", [
    ("alpha", 0.0), ("alpha", 1.0), ("min_speedup", -0.1), ("min_pairs", 3), ("min_pairs", 0),
    ("max_pairs", 5), ("max_pairs", 2), ("futility_alpha", 0.0), ("futility_alpha", 0.6),
    ("val_reject_after", 0), ("val_reject_margin", -0.01),
])
def test_bad_params_raise(field, value):
    with pytest.raises(ValueError, match=field):
        JudgeParams(**{field: value})


@pytest.mark.parametrize("arm, seconds, val_loss", [
    (INCUMBENT, float("nan"), None), (INCUMBENT, -1.0, None), (INCUMBENT, 17.0, float("inf")),
])
def test_bad_runs_raise(arm, seconds, val_loss):
    with pytest.raises(ValueError):
        Judge(JudgeParams(), TARGET).add(arm, seconds, val_loss)


def test_candidate_run_needs_val_loss():
    judge = Judge(JudgeParams(), TARGET)
    judge.add(INCUMBENT, 17.0, None)
    with pytest.raises(ValueError, match="val loss"):
        judge.add(CANDIDATE, 16.0, None)


def test_target_from_baseline():
    losses = [3.30, 3.32, 3.31]  # sd (ddof=1) = 0.01
    assert target_from_baseline(losses, tolerance_sigmas=2.0, min_tolerance=0.0) == pytest.approx(3.33)
    assert target_from_baseline(losses, tolerance_sigmas=2.0, min_tolerance=0.05) == pytest.approx(3.36)
    assert target_from_baseline([3.30], min_tolerance=0.002) == pytest.approx(3.302)
    for bad in ([], [3.3, float("nan")]):
        with pytest.raises(ValueError, match="baseline val losses"):
            target_from_baseline(bad)


def test_bench_prints_a_row_per_noise_and_speedup(capsys):
    assert bench_judge.main(["--trials", "50", "--null-trials", "200", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for noise in bench_judge.NOISE_MODELS:
        assert out.count(noise.name) == len(bench_judge.SPEEDUPS)
