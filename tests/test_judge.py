import dataclasses
import json
import math

import numpy as np
import pytest

from agent import bench_judge
from agent.judge import (
    BLOCK, CANDIDATE, INCUMBENT, Judge, JudgeParams, TimeOutcome, candidate_mask, decide_times, pair_log_ratios,
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


def test_run_order_is_counterbalanced_blocks_with_a_coin_flip_each():
    mirror = (CANDIDATE, INCUMBENT, INCUMBENT, CANDIDATE)
    blocks = []
    for seed in range(100):
        order = Judge(JudgeParams(), TARGET, seed).order
        assert len(order) == 2 * JudgeParams().max_pairs
        blocks += [tuple(order[i:i + 4]) for i in range(0, len(order), 4)]
        assert Judge(JudgeParams(), TARGET, seed).order == order  # the seed fixes the order
    assert set(blocks) == {BLOCK, mirror}
    assert 0.4 < blocks.count(mirror) / len(blocks) < 0.6  # 500 fair coin flips
    judge = Judge(JudgeParams(), TARGET, 0)
    for arm in judge.order[:3]:
        assert judge.next_arm() == arm
        judge.add(arm, 17.0, 3.2)
    wrong = CANDIDATE if judge.next_arm() == INCUMBENT else INCUMBENT
    with pytest.raises(ValueError, match=f"must be the {judge.next_arm()}"):
        judge.add(wrong, 17.0, 3.2)


@pytest.mark.parametrize("mirrored", [False, True])
def test_linear_drift_cancels_over_a_block_in_either_orientation(mirrored):
    drifting = 17.0 * np.exp(0.01 * np.arange(8))  # identical arms, machine 1% slower each run
    ratios = pair_log_ratios(drifting, candidate_mask([mirrored, mirrored]))
    sign = -1 if mirrored else 1
    np.testing.assert_allclose(ratios, sign * np.array([0.01, -0.01, 0.01, -0.01]))
    np.testing.assert_allclose(ratios.mean(), 0.0, atol=1e-12)


def test_drifting_machine_does_not_fake_a_speedup():
    # Each run 1% faster than the last, noise 0.1%: with plain I C I C the candidate would win every pair.
    rng = np.random.default_rng(0)
    for seed in range(20):
        verdict = run_session(Judge(JudgeParams(), TARGET, seed),
                              lambda i, arm: 17.0 * 0.99 ** i * math.exp(rng.normal(0, 0.001)))
        assert verdict.state == "rejected"


def test_coin_flips_defuse_load_that_follows_a_fixed_order():
    """Load with a period of four runs lands on one arm of every I C C I block: a fixed order reads it as a
    speedup (the judge's own simulation, 5% amplitude); flipping each block's orientation makes it noise."""
    params = JudgeParams()
    periodic = next(n for n in bench_judge.NOISE_MODELS if n.name == "cpu periodic")
    fixed = bench_judge.simulate(periodic, 0.0, 20000, params, np.random.default_rng(1), fixed_order=True)
    flipped = bench_judge.simulate(periodic, 0.0, 20000, params, np.random.default_rng(1))
    assert fixed["accept"] > 5 * params.alpha
    assert flipped["accept"] < fixed["accept"] / 3


@pytest.mark.parametrize("noise", [n for n in bench_judge.NOISE_MODELS if n.name.startswith("cpu") and not n.periodic],
                         ids=lambda n: n.name)
def test_null_false_accept_rate_within_alpha(noise):
    params = JudgeParams()
    row = bench_judge.simulate(noise, 0.0, 20000, params, np.random.default_rng(1))
    assert row["accept"] <= params.alpha


def test_identical_arms_rarely_accepted_through_the_judge():
    rng = np.random.default_rng(2)
    verdicts = [run_session(Judge(JudgeParams(), TARGET, seed), noisy(rng, 0.0)) for seed in range(150)]
    accepted = sum(v.state == "accepted" for v in verdicts)
    assert accepted <= 5  # expected about 1 (alpha 0.01, design ~0.8%)
    assert all(v.state == "rejected" for v in verdicts if v.state != "accepted")


def test_judge_matches_vectorised_decisions():
    rng = np.random.default_rng(3)
    params = JudgeParams()
    for speedup in (-0.1, 0.0, 0.05, 0.1, 0.25):
        judges = [Judge(params, TARGET, seed) for seed in range(8)]
        is_candidate = np.array([[arm == CANDIDATE for arm in judge.order] for judge in judges])
        sessions = 17.0 * np.exp(rng.normal(0, 0.05, is_candidate.shape)) * np.where(is_candidate, 1 - speedup, 1.0)
        outcome, n_pairs = decide_times(pair_log_ratios(sessions, is_candidate), params)
        for judge, row, expected, n in zip(judges, sessions, outcome, n_pairs):
            verdict = run_session(judge, lambda i, arm: row[i])
            assert verdict.n_pairs == n
            assert (verdict.state == "accepted") == (expected == TimeOutcome.FASTER)


@pytest.mark.parametrize("seed", range(5))
def test_clear_speedup_is_accepted(seed):
    params = JudgeParams()
    verdict = run_session(Judge(params, TARGET, seed), noisy(np.random.default_rng(seed), 0.25))
    assert (verdict.state, verdict.reason) == ("accepted", "accepted")
    assert verdict.p_value < params.alpha
    assert 0 < verdict.speedup_lower < verdict.speedup < verdict.speedup_upper
    assert verdict.candidate_mean < verdict.incumbent_mean
    assert verdict.n_pairs <= params.max_pairs


@pytest.mark.parametrize("seed", range(5))
def test_clearly_slower_candidate_stops_early(seed):
    params = JudgeParams()
    verdict = run_session(Judge(params, TARGET, seed), noisy(np.random.default_rng(seed), -0.25))
    assert (verdict.state, verdict.reason) == ("rejected", "slower")
    assert verdict.n_pairs < params.max_pairs
    assert verdict.speedup < 0


def test_not_significant_after_max_pairs():
    # Log ratios alternate -0.15, +0.10: a wide spread around a small speedup, neither clear nor futile.
    ratios = {0: 0.85, 1: 1.10}
    verdict = run_session(Judge(JudgeParams(), TARGET, 0),
                          lambda i, arm: 17.0 * (ratios[(i // 2) % 2] if arm == CANDIDATE else 1.0))
    assert (verdict.state, verdict.reason) == ("rejected", "not significant after 10 pairs")
    assert verdict.n_runs == 20


def test_speedup_below_minimum_is_rejected():
    # A clean 0.5% speedup (noise 0.01%): real but below the 1% minimum.
    rng = np.random.default_rng(4)
    verdict = run_session(Judge(JudgeParams(), TARGET, 0), noisy(rng, 0.005, cv=0.0001))
    assert (verdict.state, verdict.reason) == ("rejected", "speedup 0.5% < minimum 1.0%")


def test_val_loss_above_target_rejects_with_both_numbers():
    verdict = run_session(Judge(JudgeParams(), TARGET, 5), noisy(np.random.default_rng(5), 0.25), val_loss=3.31)
    assert verdict.state == "rejected"
    assert verdict.reason == "val loss 3.3100 > target 3.3000"
    assert verdict.n_pairs >= JudgeParams().min_pairs  # within the margin: judged with the timing decision


def test_val_loss_far_above_target_rejects_early():
    params = JudgeParams()
    verdict = run_session(Judge(params, TARGET, 6), noisy(np.random.default_rng(6), 0.25), val_loss=3.41)
    assert (verdict.state, verdict.reason) == ("rejected", "val loss 3.4100 > target 3.3000")
    assert verdict.n_pairs == params.val_reject_after


def test_rebuild_from_recorded_runs_gives_same_verdict():
    params = JudgeParams()
    judge = Judge(params, TARGET, 7)
    verdict = run_session(judge, noisy(np.random.default_rng(7), 0.15))
    assert verdict.state != "continue"
    assert Judge.from_runs(params, TARGET, 7, judge.runs).verdict() == verdict
    for cut in (3, 7):  # mid-session, also with an unpaired last run
        partial = Judge.from_runs(params, TARGET, 7, judge.runs[:cut])
        assert partial.verdict().state == "continue"
        assert partial.next_arm() == judge.order[cut]
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


@pytest.mark.parametrize("seconds, val_loss, message", [
    (float("nan"), 3.2, "seconds"), (-1.0, 3.2, "seconds"), (17.0, float("inf"), "val_loss must be finite"),
])
def test_bad_runs_raise(seconds, val_loss, message):
    judge = Judge(JudgeParams(), TARGET, 0)
    with pytest.raises(ValueError, match=message):
        judge.add(judge.next_arm(), seconds, val_loss)


def test_candidate_run_needs_val_loss():
    judge = Judge(JudgeParams(), TARGET, 0)
    while judge.next_arm() != CANDIDATE:
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
