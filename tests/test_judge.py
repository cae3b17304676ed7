import dataclasses
import json
import math

import numpy as np
import pytest

from agent.bench import judge as bench_judge
from agent.verdict.judge import (
    BLOCK, CALIBRATE, CANDIDATE, INCUMBENT, Judge, JudgeParams, NoisePrior, TimeOutcome, candidate_mask,
    VAL_LOSS, decide, decide_times, look_stats, noise_prior, pair_log_ratios, within_ss,
)
from agent.verdict.target import baseline_runs_needed, target_from_baseline

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
    judge = Judge(params, TARGET, 6)
    verdict = run_session(judge, noisy(np.random.default_rng(6), 0.25), val_loss=3.41)
    assert (verdict.state, verdict.reason) == ("rejected", "val loss 3.4100 > target 3.3000")
    arms = [arm for arm, _, _ in judge.runs]  # stopped at the val_reject_after-th candidate run
    assert arms.count(CANDIDATE) == params.val_reject_after and arms[-1] == CANDIDATE


@pytest.mark.parametrize("opens_with", [CANDIDATE, INCUMBENT])
def test_val_loss_far_above_target_rejects_right_after_the_candidate_run(opens_with):
    # C I I C: rejected after run 0, its incumbent partner is not run; I C C I: after run 1
    seed = next(s for s in range(100) if Judge(JudgeParams(val_reject_after=1), TARGET, s).order[0] == opens_with)
    judge = Judge(JudgeParams(val_reject_after=1), TARGET, seed)
    verdict = run_session(judge, noisy(np.random.default_rng(6), 0.25), val_loss=3.41)
    assert (verdict.state, verdict.cause, verdict.val_loss_mean) == ("rejected", VAL_LOSS, 3.41)
    assert [arm for arm, _, _ in judge.runs] == ([CANDIDATE] if opens_with == CANDIDATE else [INCUMBENT, CANDIDATE])
    # within the margin nothing is decided before the pair is complete
    close = Judge(JudgeParams(val_reject_after=1), TARGET, seed)
    close.add(opens_with, 17.0, 3.31 if opens_with == CANDIDATE else None)
    assert close.verdict().state == "continue"


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


# ------------------------------------------------------------------ with a noise prior (earlier experiments)
def judged_session(rng, speedup: float, cv: float, order_seed: int):
    """An experiment's (arm, seconds) runs in the judge's order."""
    order = Judge(JudgeParams(), TARGET, order_seed).order
    return [(arm, 17.0 * math.exp(rng.normal(0, cv)) * ((1 - speedup) if arm == CANDIDATE else 1.0)) for arm in order]


def test_noise_prior_pools_within_experiments():
    # Two experiments whose pairs differ by their own mean effect: only the deviations count.
    runs_a = [(INCUMBENT, 10.0), (CANDIDATE, 10.0 * math.exp(0.1)), (CANDIDATE, 10.0 * math.exp(0.3)),
              (INCUMBENT, 10.0)]
    runs_b = [(CANDIDATE, 10.0 * math.exp(-0.5)), (INCUMBENT, 10.0), (INCUMBENT, 10.0),
              (CANDIDATE, 10.0 * math.exp(-0.3)), (INCUMBENT, 10.0)]  # a trailing unpaired run is ignored
    prior = noise_prior([runs_a, runs_b])
    ss = 0.02 + 0.02  # d: 0.1, 0.3 | -0.5, -0.3
    assert prior.df == 1 + 1
    assert prior.var == pytest.approx(ss / 2)
    baseline = [(INCUMBENT, s) for s in (34.0, 15.0, 15.2)]  # not interleaved: a cold first run is no pair noise
    with pytest.raises(ValueError, match="one incumbent and one candidate"):
        noise_prior([baseline])
    assert noise_prior([runs_a[:2], []]) is None  # one pair: no degree of freedom
    with pytest.raises(ValueError, match="one incumbent and one candidate"):
        noise_prior([[(CANDIDATE, 1.0), (CANDIDATE, 1.0)]])
    with pytest.raises(ValueError, match="noise prior"):
        NoisePrior(0.0, 3)


def test_noise_prior_from_simulated_history_is_unbiased():
    rng = np.random.default_rng(11)
    sessions = [judged_session(rng, speedup, 0.05, seed) for seed, speedup in enumerate([0.0, 0.1, -0.2, 0.3] * 25)]
    prior = noise_prior(sessions)
    assert prior.df == 100 * 9
    assert prior.var == pytest.approx(2 * 0.05 ** 2, rel=0.15)  # var(d) = 2 cv^2 whatever each edit's effect


def test_prior_lets_the_first_look_come_after_one_block():
    params = JudgeParams()
    prior = NoisePrior(2 * 0.01 ** 2, 40)
    rng = np.random.default_rng(12)
    with_prior = [run_session(Judge(params, TARGET, s, prior), noisy(rng, 0.10, cv=0.01)) for s in range(10)]
    without = [run_session(Judge(params, TARGET, s), noisy(rng, 0.10, cv=0.01)) for s in range(10)]
    assert all(v.state == "accepted" and v.n_pairs == params.prior_first_look == 2 for v in with_prior)
    assert all(v.state == "accepted" and v.n_pairs >= params.min_pairs for v in without)
    assert all(v.p_value < params.alpha and v.speedup_lower > 0 for v in with_prior)
    nulls = [run_session(Judge(params, TARGET, s, prior), noisy(rng, 0.0, cv=0.01)) for s in range(20)]
    assert all(v.state == "rejected" for v in nulls) and np.mean([v.n_pairs for v in nulls]) < 3


def test_judge_with_prior_matches_vectorised_decisions():
    rng = np.random.default_rng(13)
    params = JudgeParams()
    for speedup in (-0.05, 0.0, 0.02, 0.05):
        judges = [Judge(params, TARGET, seed, NoisePrior(2 * 0.02 ** 2, 30)) for seed in range(8)]
        is_candidate = np.array([[arm == CANDIDATE for arm in judge.order] for judge in judges])
        sessions = 17.0 * np.exp(rng.normal(0, 0.02, is_candidate.shape)) * np.where(is_candidate, 1 - speedup, 1.0)
        outcome, n_pairs = decide_times(pair_log_ratios(sessions, is_candidate), params, judges[0].prior)
        for judge, row, expected, n in zip(judges, sessions, outcome, n_pairs):
            verdict = run_session(judge, lambda i, arm: row[i])
            assert verdict.n_pairs == n
            assert (verdict.state == "accepted") == (expected == TimeOutcome.FASTER)
            assert Judge.from_runs(params, TARGET, judge.order_seed, judge.runs, judge.prior).verdict() == verdict


def simulate_with_history(rng, trials: int, cv: float, history_sd: float = 1.0, candidate_sd: float = 1.0,
                          speedup: float = 0.0, params: JudgeParams = JudgeParams()):
    """Accept rate of the judge with a prior pooled from 10 earlier 4-pair experiments whose sd was the true one
    / history_sd; the candidate's runs have candidate_sd x the incumbent's sd."""
    history = candidate_mask(rng.random((trials * 10, 2)) < 0.5)
    ratios = pair_log_ratios(np.exp(rng.normal(0, cv / history_sd, history.shape)), history).reshape(trials, 10, 4)
    prior = NoisePrior(within_ss(ratios).sum(-1) / 30, 30)
    is_candidate = candidate_mask(rng.random((trials, params.max_pairs // 2)) < 0.5)
    sd = np.where(is_candidate, candidate_sd * cv, cv)
    seconds = np.exp(rng.normal(0, 1, is_candidate.shape) * sd + is_candidate * np.log1p(-speedup))
    outcome, _ = decide_times(pair_log_ratios(seconds, is_candidate), params, prior)
    return float(np.mean(outcome == TimeOutcome.FASTER))


@pytest.mark.parametrize("history_sd, candidate_sd", [(1.0, 1.0), (1.5, 1.0), (1.0, 2.0)],
                         ids=["history right", "history sd 1.5x too small", "candidate sd 2x"])
def test_false_accepts_within_alpha_when_the_history_misleads(history_sd, candidate_sd):
    rng = np.random.default_rng(14)
    assert simulate_with_history(rng, 20000, 0.05, history_sd, candidate_sd) <= JudgeParams().alpha


def test_safeguards_are_what_keeps_a_misleading_history_within_alpha():
    """Without the inflation and the F check (a level that never fires), a history whose sd is 1.5x too small
    breaks alpha about four times over: the test above can fail."""
    rng = np.random.default_rng(15)
    naive = JudgeParams(prior_inflation=1.0, prior_check_alpha=1e-9)
    assert simulate_with_history(rng, 20000, 0.05, history_sd=1.5, params=naive) > 2 * naive.alpha


def test_power_for_two_percent_at_gpu_noise_with_prior():
    assert simulate_with_history(np.random.default_rng(16), 4000, 0.003, speedup=0.02) >= 0.95


def test_f_check_drops_a_history_that_the_pairs_contradict():
    params = JudgeParams()
    ratios = np.array([[-0.35, 0.05, -0.33, 0.07, -0.36, 0.06]])  # own sd ~0.2, the history says 0.05
    history = NoisePrior(0.05 ** 2, 40)
    own = look_stats(ratios, JudgeParams(min_pairs=6))
    checked = look_stats(ratios, params, history)
    assert checked.p_faster[0] == pytest.approx(own.p_faster[0])  # own pairs only: 5 df
    trusted = look_stats(ratios, JudgeParams(prior_check_alpha=1e-9), history)  # a check that never fires
    assert trusted.p_faster[0] < 1e-3 < 0.05 < own.p_faster[0]


def test_unprovable_speedup_stops_with_its_reason():
    # CPU noise, a 3% speedup: at max_pairs it would need about 10% observed; the first block says so.
    rng = np.random.default_rng(17)
    verdicts = [run_session(Judge(JudgeParams(), TARGET, s, NoisePrior(2 * 0.05 ** 2, 40)), noisy(rng, 0.03))
                for s in range(30)]
    unprovable = [v for v in verdicts if v.reason.endswith("too small to prove within 10 pairs")]
    assert len(unprovable) >= 5 and all(v.n_pairs < 10 and v.speedup > 0 for v in unprovable)


def test_decide_vectorises_the_val_loss_rules():
    params = JudgeParams(val_reject_after=1)
    ratios = np.full((3, 4), -0.2) + np.array([[0.001, -0.001, 0.001, -0.001]])
    val = np.array([[3.0, 3.0, 3.0, 3.0], [3.4, 3.0, 3.0, 3.0], [3.31, 3.31, 3.0, 3.0]])
    outcome, val_rejected, n = decide(ratios, val, TARGET, params, NoisePrior(1e-4, 40))
    assert outcome.tolist() == [TimeOutcome.FASTER] * 3
    assert val_rejected.tolist() == [False, True, True]  # ok; far above after one run; mean above at the decision
    assert n.tolist() == [2, 1, 2]


def test_baseline_runs_needed():
    gpu = dict(val_losses=[3.2800, 3.2803, 3.2801], seconds=[300.0, 300.3, 299.9])
    assert baseline_runs_needed(gpu["val_losses"][:2], gpu["seconds"][:2]) == 3  # two runs never prove it
    assert baseline_runs_needed(**gpu) == 3  # settled: tiny spreads
    cpu = dict(val_losses=[4.78, 4.80, 4.76], seconds=[17.0, 18.1, 16.2])
    assert baseline_runs_needed(**cpu) == 4  # CV 5%: more
    assert baseline_runs_needed(cpu["val_losses"] * 2, cpu["seconds"] * 2, max_runs=5) == 5  # at the cap
    assert baseline_runs_needed([3.3], [10.0]) == 2
    quiet = NoisePrior(2 * 0.001 ** 2, 200)  # an earlier session measured the machine
    assert baseline_runs_needed([3.2800, 3.2801], [17.0, 18.1], prior=quiet) == 2
    with pytest.raises(ValueError, match="one val loss per run"):
        baseline_runs_needed([3.3], [10.0, 11.0])


@pytest.mark.parametrize("field, value", [
    ("prior_first_look", 3), ("prior_first_look", 12), ("prior_inflation", 0.5), ("prior_max_df", 0),
    ("prior_check_alpha", 0.0), ("futility_power", 0.5),
])
def test_bad_prior_params_raise(field, value):
    with pytest.raises(ValueError, match=field):
        JudgeParams(**{field: value})


def test_the_judge_stops_a_candidate_that_learns_better_than_it_needs_to_at_its_first_look():
    """With step calibration to follow (learns_better_noise), a candidate clearly below the target and the
    incumbent's val loss, and not faster yet, is rejected at the look at min_pairs (cause calibrate), so its runs go
    to a shorter variant; without it, or when its loss is within the noise, the judge goes on."""
    params = JudgeParams(min_pairs=4, max_pairs=10)

    def first_look(noise, candidate_val):
        judge = Judge(params, target_val_loss=3.30, order_seed=1, learns_better_noise=noise)
        times = np.random.default_rng(0).normal(10.0, 0.5, 2 * params.min_pairs)  # CV 5%: 3% faster is not proven
        for seconds in times:
            arm = judge.next_arm()
            judge.add(arm, seconds * (0.97 if arm == CANDIDATE else 1.0), candidate_val if arm == CANDIDATE else 3.28)
        return judge.verdict()

    stopped = first_look(0.01, 3.20)
    assert (stopped.state, stopped.cause) == ("rejected", CALIBRATE) and "calibrate" in stopped.reason
    assert first_look(None, 3.20).state == "continue"
    assert first_look(0.01, 3.275).state == "continue"  # better than the incumbent by less than the noise
