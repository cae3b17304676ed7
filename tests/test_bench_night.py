import json
import math
import numpy as np
import pytest

from agent.bench import judge as bench_judge, night as bench_night

from agent import settings
from agent.verdict.judge import JudgeParams, noise_prior

FIELDS = ("runs_per_verdict", "verdicts_per_night", "false_accept", "power_2pct", "power_5pct", "wins_lost_to_screen")


@pytest.fixture(scope="module")
def quick():
    """`ratchet bench night --quick --json`, run once: the object it prints."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench_night.main(["--quick", "--json", "--seed", "3"]) == 0
    return json.loads(out.getvalue())


def binomial_slack(p: float, n: int) -> float:
    """Three standard errors of a rate p measured on n trials."""
    return 3 * math.sqrt(p * (1 - p) / n)


def test_json_shape(quick):
    assert set(quick["cost_models"]) == {"cpu-cv5", "gpu-cv1", "gpu-cv0.3"}
    for procs in quick["cost_models"].values():
        assert set(procs) == {"new", "today"}
        for f in procs.values():
            assert all(isinstance(f[k], float) for k in FIELDS)
            assert 0 < f["runs_per_verdict"] and f["verdicts_per_night"] > 0
            assert all(0 <= f[k] <= 1 for k in FIELDS[2:])
            assert f["false_accept"] == max(f["false_accept_by_noise"].values())
            assert sum(s["runs_per_verdict"] for s in f["by_stage"].values()) == pytest.approx(f["runs_per_verdict"])
            assert sum(s["share"] for s in f["by_stage"].values()) == pytest.approx(1.0)
    noises = quick["cost_models"]["cpu-cv5"]["new"]["false_accept_by_noise"]
    assert {"normal", "t3", "outliers", "drift", "periodic", "history sd 1.5x", "candidate sd 2x"} <= set(noises)


def test_text_table_lists_both_procedures(quick):
    s = quick["settings"]
    out = bench_night.format_table(quick, s["mix"], s["trials"], s["null_trials"])
    for cm in bench_night.COST_MODELS:
        assert out.count(f"{cm.name:<10} new") == 1 and out.count(f"{cm.name:<10} today") == 1


def new(cm_index: int) -> bench_night.Procedure:
    """The `new` procedure of a cost model (its preset's [judge] and [screen])."""
    return bench_night.procedures(bench_night.COST_MODELS[cm_index])[0]


def test_new_procedures_are_the_presets():
    """Each cost model runs its preset as a user's ratchet.toml would: CPU screens after lead runs only, the GPU
    research preset also against the incumbent's recent runs."""
    for i, cm in enumerate(bench_night.COST_MODELS):
        s = settings.preset(cm.preset)
        assert new(i).judge == settings.judge_params(s) and new(i).screen == settings.screen_params(s)
    assert new(0).screen.recent_runs == 0 and new(2).screen.recent_runs > 0


def test_new_false_accepts_within_alpha(quick):
    alpha = new(0).judge.alpha
    for name, procs in quick["cost_models"].items():
        assert procs["new"]["false_accept"] <= alpha + binomial_slack(alpha, quick["settings"]["null_trials"]), name


def test_today_is_the_landed_judge(quick):
    """`today` runs the judge as landed: its null accepts match bench_judge's simulation of JudgeParams(), and it
    spends far more runs per verdict than `new` at CPU noise."""
    today = bench_night.procedures(bench_night.COST_MODELS[0])[1]
    assert today.judge == JudgeParams() and today.screen is None and not today.prior
    cm = bench_night.COST_MODELS[0]
    normal = bench_night.noise_models(cm.cv)[0][0]
    ours = bench_night.simulate(bench_night.KINDS["same"], 20000, cm, today, np.random.default_rng(5), normal,
                                judge_only=True)["accepted"].mean()
    landed = bench_judge.simulate(normal, 0.0, 20000, JudgeParams(), np.random.default_rng(6))["accept"]
    assert abs(ours - landed) <= 2 * binomial_slack(landed, 20000)
    cpu = quick["cost_models"]["cpu-cv5"]
    assert cpu["today"]["runs_per_verdict"] > max(9, 2 * cpu["new"]["runs_per_verdict"])


def test_power_and_throughput_at_gpu_noise(quick):
    gpu = quick["cost_models"]["gpu-cv0.3"]
    assert gpu["new"]["power_2pct"] >= 0.95
    assert gpu["new"]["verdicts_per_night"] > 2 * gpu["today"]["verdicts_per_night"]
    # the screen watches half the candidates (first block I C C I); of those, two non-wins in three never finish a
    # run: about 0.29 of all verdicts with slower30's pace aborts
    assert gpu["new"]["by_stage"]["screen"]["share"] > 0.2


def test_screen_loses_at_most_two_percent_of_two_percent_wins():
    for i, cm in enumerate(bench_night.COST_MODELS):
        r = bench_night.simulate(bench_night.KINDS["faster2"], 3000, cm, new(i), np.random.default_rng(7))
        lost = np.mean(r["stage"] == bench_night.STAGES.index("screen"))
        assert lost <= 0.02, cm.name


def test_first_run_stop_references():
    """As the harness: when the first block opens with the incumbent, the screen acts against that lead run, so a
    machine slowed down since the earlier runs does not read as the candidate's pace; when it opens with the
    candidate, AbortPolicy's pace rule acts against the incumbent's earlier time, or, given the incumbent's recent
    runs (the GPU preset), the screen against those, which then reads a slowed machine as the candidate's pace."""
    cm = bench_night.COST_MODELS[2]
    new, today = bench_night.procedures(cm)
    rng = np.random.default_rng(11)
    trials = 2000
    is_candidate = bench_night.candidate_mask(rng.random((trials, 4)) < 0.5)
    lead_first = ~is_candidate[:, 0]
    assert 0.4 < lead_first.mean() < 0.6
    seconds = cm.run_s * np.exp(rng.normal(0.0, cm.cv, is_candidate.shape))
    recent = cm.run_s * np.exp(rng.normal(0.0, cm.cv, (trials, new.screen.recent_runs)))

    def stopped(proc, load, candidate, recent=None):
        return bench_night.first_run_stop(load * seconds * np.where(is_candidate, candidate, 1.0), is_candidate,
                                          np.zeros(trials), cm, proc, rng, recent)[0]

    slowed = stopped(new, 1.5, 0.98)  # a 2% win while the machine runs 1.5x slower than when the history was measured
    assert slowed[lead_first].mean() <= 0.01
    assert slowed[~lead_first].all()  # the pace rule still compares with the time measured earlier
    slower = stopped(new, 1.0, 1.1)  # 10% slower: beyond the screen's noise, within the pace rule's 20% slack
    assert slower[lead_first].mean() > 0.95 and not slower[~lead_first].any()
    assert not stopped(today, 1.0, 1.1).any()
    # against recent runs: 10% slower is stopped in both halves, a 2% win in neither, unless the machine slowed
    assert stopped(new, 1.0, 1.1, recent)[~lead_first].mean() > 0.95
    assert stopped(new, 1.0, 0.98, recent).mean() <= 0.01
    assert stopped(new, 1.5, 0.98, recent)[~lead_first].all()


def test_clearly_slower_is_stopped_within_a_fraction_of_a_run():
    first_looks = {cm.name: 1.3 * (cm.startup_s + 0.2 * (cm.run_s - cm.startup_s)) for cm in bench_night.COST_MODELS}
    # gpt2-research (recent runs): no smoke run and no lead incumbent run, the screen run or the first timed run is
    # stopped at its first looks (start-up and 20% of a run 1.3x as long)
    cm = bench_night.COST_MODELS[2]
    r = bench_night.simulate(bench_night.KINDS["slower30"], 500, cm, new(2), np.random.default_rng(8))
    assert np.all(r["stage"] == bench_night.STAGES.index("screen")) and not r["accepted"].any()
    assert np.all(r["lead"] == 0) and np.all(r["cost"] < first_looks[cm.name])
    # cpu-tiny (lead runs only): the smoke run of 3 of its 300 steps first, and the lead run in I C C I experiments
    cm = bench_night.COST_MODELS[0]
    assert bench_night.smoke_fraction(cm) == 3 / 300
    r = bench_night.simulate(bench_night.KINDS["slower30"], 500, cm, new(0), np.random.default_rng(8))
    smoke = cm.startup_s + 0.01 * (cm.run_s - cm.startup_s)
    stopped = r["stage"] == bench_night.STAGES.index("screen")
    assert stopped.mean() > 0.9 and (r["lead"][stopped & r["incumbent_first"]] > 0).all()
    assert np.median(r["cost"][stopped] - r["lead"][stopped] - smoke) < first_looks[cm.name]  # CV 5%: most early


def test_learns_better_is_won_through_calibration():
    cm = bench_night.COST_MODELS[1]
    r = bench_night.simulate(bench_night.KINDS["better"], 400, cm, new(1), np.random.default_rng(9))
    calibrated = r["stage"] == bench_night.STAGES.index("calibration")
    assert calibrated.mean() > 0.5 and r["accepted"][calibrated].mean() > 0.8


def test_bad_mix_is_refused():
    for mix in ("same=0.5,faster2=0.4", "nothing=1.0"):
        with pytest.raises(SystemExit):
            bench_night.parse_mix(mix)


def test_simulated_history_pools_as_the_live_prior_does():
    """The simulation's prior is judge.noise_prior's arithmetic on the same runs."""
    cm = bench_night.COST_MODELS[0]
    noise = bench_night.noise_models(cm.cv)[4][0]  # periodic load
    prior = bench_night.history_prior(noise, 1, 1.0, np.random.default_rng(10))
    rng = np.random.default_rng(10)
    experiments, pairs = bench_night.HISTORY
    mask = bench_night.candidate_mask(rng.random((experiments, pairs // 2)) < 0.5)
    seconds = np.exp(noise.log_factors(rng, mask.shape))
    live = noise_prior([[("candidate" if c else "incumbent", s) for c, s in zip(m, row)]
                        for m, row in zip(mask, seconds)])
    assert (prior.df, float(prior.var[0])) == (live.df, pytest.approx(live.var))
