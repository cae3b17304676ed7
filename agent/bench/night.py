"""Simulates a 12-hour night with the real decision code: the screen, the judge, the calibration stop.

    python -m agent.bench.night [--seed 0] [--trials 3000] [--null-trials 20000] [--mix ...] [--quick] [--json]

Side by side for each cost model: `new` (its preset's [judge] and [screen], and the harness's opening run: with
recent_runs = 0, the CPU presets, the smoke run, then the screen on the candidate's first run against the lead
incumbent run when the first block opens with the incumbent, I C C I, and AbortPolicy's pace rule when it opens
with the candidate; with recent_runs R, the GPU presets, the screen against the incumbent's last R runs on a
screen run cut at opening_fraction in front of I C C I, then on the first timed run against the lead run, and
on the first timed run of C I I C; the judge has the noise prior of earlier experiments, looks after one block
and rejects a val-loss miss right after the candidate run) and `today` (the smoke run, no screen, first look at
4 pairs, a t-test on the experiment's own pairs, the val-loss rule after a whole pair; runner.AbortPolicy's pace
rule stops a candidate projected 20% slower).

What is modelled, per edit (a verdict):
- Device time: the opening run (the smoke run: start-up + its --steps' share of the preset's steps; a screen run
  up to the line that stopped it or to opening_fraction), every timed run at its simulated length, a screened or
  aborted run up to the progress line that stopped it, in units of one incumbent run. Not modelled: evaluation,
  proposing (the loop overlaps it with runs), edits that fail the guard or crash.
- Run times: agent.bench.judge's noise models (every term scaled to the cost model's CV) in the judge's run order,
  with its coin flip per block; the candidate's runs x (1 - speedup). The mix and the power figures use the
  normal model; the false-accept and 2%-wins-lost figures take each of them, plus two misleading histories: the
  history's sd 1.5x too small, and a candidate arm with twice the sd of the runs the history saw.
- Progress lines: LINES per run; start-up before the first; each interval's pace log-normal with sd
  PACE_JITTER x CV around the run's own pace, so projections are noisier early. The candidate's first run ends
  at the time the judge sees. Screen references (as the harness): the one lead incumbent run (the time the judge
  sees, just before the candidate's), its noise pooled within earlier groups: the current incumbent's 3 earlier
  runs and 4 earlier commits' 4 runs each (df 14); or the incumbent's R runs before the experiment, drawn as the
  first R runs of the trial's noise sequence, the screen run next, then the blocks (so that drift, a random walk
  and periodic load move the machine between the reference and the candidate). The pace rule compares with the
  mean of the incumbent's 3 earlier runs.
- Losses: training loss LOSS_END + LOSS_SCALE x (fraction^-1/2 - 1), plus a seed offset (sd loss_sd) and
  batch noise per line (batch_sd); val loss: seed sd val_sd; target: the incumbent's + 2 val sd. A candidate's
  loss offset applies to both; `worse` draws it log-uniform in [3, 50] val sd, `better` is -5 val sd.
- Noise prior: HISTORY earlier experiments (10 x 4 pairs: df 30) from the same noise model, pooled by
  judge.noise_prior's arithmetic.
- Calibration: an edit that learns better (`better`) and is not yet significantly faster at the judge's first
  look is stopped there (judge.beats, as the Judge does) and its shorter variant (CALIBRATED: 10%
  faster, as good) goes through the same pipeline; the verdict costs both. Longer variants are not modelled.
- False accepts: null edits through the judge alone, an upper bound on the pipeline's, as the screen only rejects.
"""
import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, replace

import numpy as np

from agent import settings
from agent.bench.judge import NOISE_MODELS, Noise
from agent.verdict.judge import (JudgeParams, NoisePrior, TimeOutcome, beats, candidate_mask, decide,
                                 far_above_target, pair_log_ratios, within_ss)
from agent.verdict.screen import (IncumbentReference, ScreenParams, log_projection, look_lines, screen_decide,
                          smoothed_loss)
from nanomodel.config import get_config

NIGHT_S = 12 * 3600.0
LINES = 40              # progress lines per run
EARLIER = (3, 4, 4, 4, 4)  # runs per earlier group (the current incumbent's, then earlier commits'): noise only
HISTORY = (10, 4)       # earlier experiments x pairs behind the noise prior
PACE_JITTER = 2.0       # sd of one line interval's log pace, in units of the run-to-run CV
TODAY_PACE_SLACK = 0.2  # today's AbortPolicy: stop a candidate projected this much slower...
TODAY_FROM = 0.15       # ...from this fraction of the run (settings.Abort)
LOSS_END, LOSS_SCALE = 3.3, 1.5  # the incumbent's training-loss curve (nats)
DEFAULT_MIX = "worse=0.25,same=0.35,slower6=0.15,slower30=0.05,faster2=0.10,faster5=0.07,faster15=0.03"
STAGES = ("screen", "judge", "calibration")


@dataclass(frozen=True)
class CostModel:
    name: str
    preset: str       # the ratchet.toml preset whose [judge] and [screen] the `new` procedure uses
    run_s: float      # one incumbent run, launch to exit
    startup_s: float  # of which before the first progress line (imports, process group, compilation)
    cv: float         # run-to-run coefficient of variation of the run time
    val_sd: float     # seed-to-seed sd of the val loss (nats)
    loss_sd: float    # seed-to-seed sd of the training loss at a step (nats)
    batch_sd: float   # batch-to-batch noise of one progress line's loss (nats)


COST_MODELS = (
    CostModel("cpu-cv5", "cpu-tiny", 90.0, 5.0, 0.05, val_sd=0.018, loss_sd=0.03, batch_sd=0.1),  # on 2 cores
    CostModel("gpu-cv1", "gpt2-research", 300.0, 30.0, 0.01, val_sd=0.004, loss_sd=0.01, batch_sd=0.03),
    CostModel("gpu-cv0.3", "gpt2-research", 300.0, 30.0, 0.003, val_sd=0.004, loss_sd=0.01, batch_sd=0.03),
)


@dataclass(frozen=True)
class Kind:
    speedup: float            # true run-time speedup (negative: slower)
    loss_sds: float = 0.0     # loss above the incumbent's, in val sd (negative: learns better)
    worse: bool = False       # draw loss_sds log-uniform in [3, 50]


KINDS = {"worse": Kind(0.0, worse=True), "same": Kind(0.0), "slower6": Kind(-0.06), "slower30": Kind(-0.30),
         "faster2": Kind(0.02), "faster5": Kind(0.05), "faster15": Kind(0.15), "better": Kind(0.0, -5.0)}
CALIBRATED = Kind(0.10)  # the shorter variant of a `better` edit


@dataclass(frozen=True)
class Procedure:
    name: str
    judge: JudgeParams
    screen: ScreenParams | None  # None: today's AbortPolicy pace rule instead
    prior: bool                  # the judge gets the noise prior


def smoke_fraction(cm: CostModel) -> float:
    """The smoke run's share of the steps: its smoke_args' --steps over the preset's named config's steps."""
    s = settings.preset(cm.preset)
    steps = re.search(r"--steps\s+(\d+)", s.train.smoke_args)
    return int(steps.group(1)) / get_config(s.train.config).steps if steps else 1.0


def procedures(cm: CostModel) -> tuple[Procedure, Procedure]:
    """new: the cost model's preset as configured (its [judge], the noise prior, its [screen]); today: the judge
    as it landed before the screen (JudgeParams' defaults: first look at 4 pairs, no prior, no screen)."""
    s = settings.preset(cm.preset)
    return (Procedure("new", settings.judge_params(s), settings.screen_params(s), True),
            Procedure("today", JudgeParams(), None, False))


def noise_models(cv: float) -> list[tuple[Noise, float, float]]:
    """(noise, history sd factor, candidate sd factor): agent.bench.judge's models scaled to `cv` (each once: its gpu
    normal is its cpu normal), and two misleading histories on the normal one."""
    scaled = {}
    for n in NOISE_MODELS:
        k = cv / n.cv
        shape = replace(n, name="", cv=cv, outlier_slow=n.outlier_slow * k, drift=n.drift * k, walk=n.walk * k,
                        periodic=n.periodic * k)
        scaled.setdefault(shape, replace(shape, name=n.name.removeprefix("cpu ")))
    normal = next(iter(scaled.values()))
    scaled = list(scaled.values())
    return [(n, 1.0, 1.0) for n in scaled] + [(replace(normal, name="history sd 1.5x"), 1.5, 1.0),
                                               (replace(normal, name="candidate sd 2x"), 1.0, 2.0)]


def history_prior(noise: Noise, trials: int, sd_factor: float, rng: np.random.Generator) -> NoisePrior:
    """Per trial, the prior pooled from HISTORY earlier experiments on this noise (its sd / sd_factor)."""
    experiments, pairs = HISTORY
    is_candidate = candidate_mask(rng.random((trials * experiments, pairs // 2)) < 0.5)
    log_s = noise.log_factors(rng, is_candidate.shape) / sd_factor
    ratios = pair_log_ratios(np.exp(log_s), is_candidate).reshape(trials, experiments, pairs)
    df = experiments * (pairs - 1)
    return NoisePrior(within_ss(ratios).sum(axis=-1) / df, df)


def run_lines(seconds: np.ndarray, cm: CostModel, rng: np.random.Generator) -> np.ndarray:
    """Run times [...] -> wall clock at each progress line [..., LINES], ending at the run's time."""
    pace = np.exp(rng.normal(0.0, PACE_JITTER * cm.cv, seconds.shape + (LINES,)))
    share = cm.startup_s / cm.run_s
    return seconds[..., None] * (share + (1 - share) * np.cumsum(pace, axis=-1) / pace.sum(axis=-1, keepdims=True))


def loss_lines(offset: np.ndarray, cm: CostModel, rng: np.random.Generator) -> np.ndarray:
    """Loss offsets [...] (nats) -> training loss at each progress line [..., LINES]."""
    f = np.arange(1, LINES + 1) / LINES
    seed = rng.normal(0.0, cm.loss_sd, offset.shape + (1,))
    batch = rng.normal(0.0, cm.batch_sd, offset.shape + (LINES,))
    return LOSS_END + LOSS_SCALE * (f ** -0.5 - 1) + offset[..., None] + seed + batch


def earlier_runs(trials: int, cm: CostModel, rng: np.random.Generator) -> list[tuple]:
    """The incumbents' earlier runs (EARLIER: the current one's, then earlier commits'), noise only: per group
    (seconds [trials, n], walls and losses [trials, n, LINES])."""
    groups = []
    for n in EARLIER:
        s = cm.run_s * np.exp(rng.normal(0.0, cm.cv, (trials, n)))
        groups.append((s, run_lines(s, cm, rng), loss_lines(np.zeros(s.shape), cm, rng)))
    return groups


def screen_stops(wall: np.ndarray, loss: np.ndarray, ref_seconds: np.ndarray, noise_groups: tuple, cm: CostModel,
                 proc: Procedure, rng: np.random.Generator) -> np.ndarray:
    """The screen's looks on candidate runs (walls, smoothed losses [trials, LINES]) against reference runs
    [trials, R], the noise pooled with `noise_groups` -> whether it stops the run at each line [trials, LINES]."""
    f = np.arange(1, LINES + 1) / LINES
    ref = IncumbentReference.from_arrays(f, LINES, run_lines(ref_seconds, cm, rng),
                                         loss_lines(np.zeros(ref_seconds.shape), cm, rng), ref_seconds, noise_groups)
    projected = log_projection(f, wall, ScreenParams.pace_window)
    decision = screen_decide(f, projected - ref.log_proj, ref.log_proj_sd, loss, ref.loss, ref.loss_sd, ref.runs,
                             ref.df, f, ref.loss[:, None, :], ref.train_share, proc.screen)
    return decision.reject & look_lines(f, proc.screen.look_every)


def stop_cost(stop: np.ndarray, wall: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stops at each line and the run's walls [trials, LINES] -> (stopped, seconds run) [trials]."""
    return stop.any(axis=-1), np.take_along_axis(wall, stop.argmax(axis=-1)[:, None], -1)[:, 0]


def first_run_stop(seconds: np.ndarray, is_candidate: np.ndarray, offset: np.ndarray, cm: CostModel,
                   proc: Procedure, rng: np.random.Generator, recent: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The stop on the candidate's first run, trials' run times and order [trials, runs] -> (stopped, seconds run)
    [trials]. As the harness: when the first block opens with the incumbent, the screen against that lead run
    (seconds[:, 0]); when it opens with the candidate, the pace rule against the incumbent's earlier time, and the
    screen against `recent` [trials, R] (the incumbent's last R runs before this experiment) when given."""
    f = np.arange(1, LINES + 1) / LINES
    trials = len(seconds)
    earlier = earlier_runs(trials, cm, rng)
    wall = run_lines(seconds[np.arange(trials), is_candidate.argmax(axis=-1)], cm, rng)
    loss = smoothed_loss(loss_lines(offset, cm, rng))
    # AbortPolicy: against the incumbent's measured time (the mean of its earlier runs), every line from TODAY_FROM
    projected = log_projection(f, wall, ScreenParams.pace_window)
    stop = (f >= TODAY_FROM) & (projected > np.log(earlier[0][0].mean(axis=-1) * (1 + TODAY_PACE_SLACK))[:, None])
    if proc.screen is not None:
        lead_first = ~is_candidate[:, :1]
        if recent is not None and recent.shape[1]:  # the recent runs are the current incumbent's group
            stop = screen_stops(wall, loss, recent, tuple(e[1:] for e in earlier[1:]), cm, proc, rng)
        stop = np.where(lead_first, screen_stops(wall, loss, seconds[:, :1], tuple(e[1:] for e in earlier), cm, proc,
                                                 rng), stop)
    return stop_cost(stop, wall)


def screen_run_stop(seconds: np.ndarray, offset: np.ndarray, recent: np.ndarray, cm: CostModel, proc: Procedure,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The screen run in front of a block that opens with the incumbent: the candidate's run times [trials] under
    the screen against `recent` [trials, R], cut at [screen] opening_fraction -> (stopped, seconds run) [trials]."""
    f = np.arange(1, LINES + 1) / LINES
    wall = run_lines(seconds, cm, rng)
    loss = smoothed_loss(loss_lines(offset, cm, rng))
    earlier = earlier_runs(len(seconds), cm, rng)[1:]
    last = int(np.argmax(f >= proc.screen.opening_fraction - 1e-9))  # the line it passes at (looks come first)
    stop = screen_stops(wall, loss, recent, tuple(e[1:] for e in earlier), cm, proc, rng) & (np.arange(LINES) <= last)
    stopped, partial = stop_cost(stop, wall)
    return stopped, np.where(stopped, partial, wall[:, last])


def simulate(kind: Kind, trials: int, cm: CostModel, proc: Procedure, rng: np.random.Generator,
             noise: Noise | None = None, history_sd: float = 1.0, candidate_sd: float = 1.0,
             judge_only: bool = False) -> dict:
    """One kind of edit through the pipeline -> arrays [trials]: accepted, stage (index into STAGES), cost (s)."""
    noise = noise or noise_models(cm.cv)[0][0]
    p = proc.judge
    is_candidate = candidate_mask(rng.random((trials, p.max_pairs // 2)) < 0.5)
    # the incumbent's last runs before the experiment, the screen run, then the blocks: one noise sequence (its
    # drift runs on from the reference runs into the experiment)
    recent_runs = proc.screen.recent_runs if proc.screen is not None and not judge_only else 0
    log_s = noise.log_factors(rng, (trials, recent_runs + 1 + is_candidate.shape[1]))
    is_run_candidate = np.concatenate([np.ones((trials, 1), bool), is_candidate], axis=-1)
    log_s[:, recent_runs:] += is_run_candidate * math.log1p(-kind.speedup)
    log_s[:, recent_runs:] += is_run_candidate * rng.normal(0.0, noise.cv * math.sqrt(candidate_sd ** 2 - 1),
                                                           is_run_candidate.shape)
    recent, screen_run, seconds = np.split(cm.run_s * np.exp(log_s), [recent_runs, recent_runs + 1], axis=-1)
    sds = np.exp(rng.uniform(np.log(3), np.log(50), trials)) if kind.worse else np.full(trials, kind.loss_sds)
    loss = cm.val_sd * sds
    val = loss[:, None] + rng.normal(0.0, cm.val_sd, (trials, p.max_pairs))  # the incumbent's mean val loss is 0
    target = 2 * cm.val_sd
    prior = history_prior(noise, trials, history_sd, rng) if proc.prior else None
    ratios = pair_log_ratios(seconds, is_candidate)
    outcome, val_rejected, n_pairs = decide(ratios, val, target, p, prior)
    accepted = (outcome == TimeOutcome.FASTER) & ~val_rejected
    ran = np.cumsum(seconds, axis=-1)
    timed = np.take_along_axis(ran, 2 * n_pairs[:, None] - 1, -1)[:, 0]
    if proc.screen is not None:  # the judge rejects right after the candidate run that misses (`today`: its pair)
        kth = np.argmax(np.cumsum(is_candidate, axis=-1) >= p.val_reject_after, axis=-1)
        early = val_rejected & far_above_target(val, target, p)
        timed = np.where(early, np.take_along_axis(ran, kth[:, None], -1)[:, 0], timed)
    smoke = cm.startup_s + smoke_fraction(cm) * (cm.run_s - cm.startup_s)
    stage = np.full(trials, STAGES.index("judge"))
    if judge_only:
        return {"accepted": accepted, "stage": stage, "cost": smoke + timed}

    # the opening run (harness.opening): with recent runs, none before C I I C and a screen run before I C C I
    lead_first = ~is_candidate[:, 0]
    screening_opening = proc.screen is not None and recent_runs > 0 and proc.screen.opening_fraction > 0
    opening, opening_stopped = np.full(trials, smoke), np.zeros(trials, bool)
    if screening_opening:
        opening_stopped, opening_cost = screen_run_stop(screen_run[:, 0], loss, recent, cm, proc, rng)
        opening_stopped &= lead_first
        opening = np.where(lead_first, opening_cost, 0.0)
    cost = opening + timed

    if kind.loss_sds < 0 and trials:  # calibration: the harness stops at the first look, or plans after a rejection
        first = p.looks_for(prior is not None)[0]
        early, early_val, _ = decide(ratios[:, :first], val[:, :first], target, p, prior)
        incumbent_val = rng.normal(0.0, cm.val_sd, (trials, p.max_pairs))
        stop = (early == TimeOutcome.CONTINUE) & ~early_val
        n = np.where(stop, first, n_pairs)
        calibrate = (stop | ~accepted) & np.array([beats(float(val[i, :k].mean()), target, list(incumbent_val[i, :k]),
                                                         cm.val_sd) for i, k in enumerate(n)])
        variant = simulate(CALIBRATED, int(calibrate.sum()), cm, proc, rng, noise, history_sd, candidate_sd)
        accepted[calibrate] = variant["accepted"]
        cost[calibrate] = opening[calibrate] + ran[calibrate, 2 * n[calibrate] - 1] + variant["cost"]
        stage[calibrate] = STAGES.index("calibration")

    lead = np.where(lead_first, seconds[:, 0], 0.0)  # the incumbent run before the candidate's first
    stopped, partial = first_run_stop(seconds, is_candidate, loss, cm, proc, rng, recent)
    stopped &= ~opening_stopped
    cost = np.where(stopped, opening + lead + partial, np.where(opening_stopped, opening, cost))
    stopped |= opening_stopped
    accepted &= ~stopped
    stage = np.where(stopped, STAGES.index("screen"), stage)
    return {"accepted": accepted, "stage": stage, "cost": cost, "lead": np.where(stopped & ~opening_stopped, lead, 0.0),
            "incumbent_first": lead_first}


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        if name.strip() not in KINDS:
            raise SystemExit(f"unknown kind {name.strip()!r} in --mix (choose from {', '.join(KINDS)})")
        mix[name.strip()] = float(weight)
    if not math.isclose(sum(mix.values()), 1.0, abs_tol=1e-6) or min(mix.values()) < 0:
        raise SystemExit(f"--mix weights must be >= 0 and sum to 1, got {sum(mix.values())}")
    return mix


def figures(cm: CostModel, proc: Procedure, mix: dict[str, float], trials: int, null_trials: int,
            rng: np.random.Generator) -> dict:
    """The night's figures of one procedure on one cost model."""
    runs = {name: simulate(KINDS[name], trials, cm, proc, rng) for name in sorted(set(mix) | {"faster2", "faster5"})}
    unit = cm.run_s
    per_verdict = sum(w * runs[k]["cost"].mean() for k, w in mix.items()) / unit
    by_stage = {s: {"runs_per_verdict": sum(w * np.mean(runs[k]["cost"] * (runs[k]["stage"] == i))
                                            for k, w in mix.items()) / unit,
                    "share": sum(w * np.mean(runs[k]["stage"] == i) for k, w in mix.items())}
                for i, s in enumerate(STAGES)}
    wins = {k: w for k, w in mix.items() if KINDS[k].speedup >= 0.02}
    screened = sum(w * np.mean(runs[k]["stage"] == STAGES.index("screen")) for k, w in wins.items())
    lost = screened / sum(wins.values()) if wins else 0.0
    won = sum(w * runs[k]["accepted"].mean() for k, w in mix.items() if KINDS[k].speedup > 0 or KINDS[k].loss_sds < 0)
    false_accept, lost_by_noise = {}, {}
    for noise, history_sd, candidate_sd in noise_models(cm.cv):
        null = simulate(KINDS["same"], null_trials, cm, proc, rng, noise, history_sd, candidate_sd, judge_only=True)
        false_accept[noise.name] = float(null["accepted"].mean())
        # 2% wins under every noise model: the drifting ones move the machine between the reference runs and the
        # candidate's first run, which is where a screen against recent runs can lose a win
        win = simulate(KINDS["faster2"], trials, cm, proc, rng, noise, history_sd, candidate_sd)
        lost_by_noise[noise.name] = float(np.mean(win["stage"] == STAGES.index("screen")))
    return {
        "runs_per_verdict": float(per_verdict),
        "verdicts_per_night": float(NIGHT_S / (per_verdict * unit)),
        "wins_per_night": float(won * NIGHT_S / (per_verdict * unit)),
        "lead_runs_per_verdict": float(sum(w * np.mean(runs[k]["lead"]) for k, w in mix.items()) / unit),
        "false_accept": max(false_accept.values()),
        "false_accept_by_noise": false_accept,
        "power_2pct": float(runs["faster2"]["accepted"].mean()),
        "power_5pct": float(runs["faster5"]["accepted"].mean()),
        "wins_lost_to_screen": float(lost),
        "wins_lost_worst": max(lost_by_noise.values()),  # of 2% wins, over the noise models
        "wins_lost_by_noise": lost_by_noise,
        "by_stage": {s: {k: float(v) for k, v in d.items()} for s, d in by_stage.items()},
    }


def format_table(result: dict, mix: dict[str, float], trials: int, null_trials: int) -> str:
    lines = [
        f"night: {NIGHT_S / 3600:.0f} h; mix {', '.join(f'{k} {w:.0%}' for k, w in mix.items())};"
        f" {trials} trials per kind, {null_trials} null trials per noise model",
        "runs/verdict: device time per verdict in incumbent runs, split by the stage that decided (today's first-run"
        " stop is AbortPolicy's pace rule); lead: of it, the incumbent run before a stopped candidate's first run",
        f"{'cost model':<10} {'proc':<5} {'runs/verdict':>12} {'screen+judge+calib':>19} {'lead':>5} {'verdicts':>8}"
        f" {'wins':>5} {'false acc':>9} {'worst noise':<16} {'pow 2%':>6} {'pow 5%':>6} {'lost':>6}",
    ]
    for cm_name, procs in result["cost_models"].items():
        for proc, f in procs.items():
            stages = " + ".join(f"{f['by_stage'][s]['runs_per_verdict']:.2f}" for s in STAGES)
            worst = max(f["false_accept_by_noise"], key=f["false_accept_by_noise"].get)
            lines.append(f"{cm_name:<10} {proc:<5} {f['runs_per_verdict']:>12.2f} {stages:>19}"
                         f" {f['lead_runs_per_verdict']:>5.2f} {f['verdicts_per_night']:>8.0f}"
                         f" {f['wins_per_night']:>5.1f}"
                         f" {f['false_accept']:>9.2%} {worst:<16} {f['power_2pct']:>6.1%} {f['power_5pct']:>6.1%}"
                         f" {f['wins_lost_to_screen']:>6.2%}")
    lines.append("verdicts, wins: per 12 h (wins: true speedups accepted); lost: true wins >= 2% stopped on their first"
                 " run (new: by the screen, or the pace rule when the first block opens with the candidate)")
    for key, what in (("false_accept_by_noise", "false accepts of null edits"),
                      ("wins_lost_by_noise", "2% wins lost to the first-run stop")):
        lines.append(f"{what} by noise model (new / today):")
        for cm_name, procs in result["cost_models"].items():
            lines.append(f"  {cm_name}: " + ", ".join(
                f"{n} {procs['new'][key][n]:.2%}/{procs['today'][key][n]:.2%}" for n in procs["new"][key]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ratchet bench night", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="RNG seed")
    parser.add_argument("--trials", type=int, default=3000, help="simulated edits per kind of the mix")
    parser.add_argument("--null-trials", type=int, default=20000, help="null edits per noise model (false accepts)")
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"kinds of edits and their shares (default {DEFAULT_MIX})")
    parser.add_argument("--quick", action="store_true", help="few trials (a smoke test of the bench)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    trials, null_trials = (300, 2000) if args.quick else (args.trials, args.null_trials)
    mix = parse_mix(args.mix)
    rng = np.random.default_rng(args.seed)
    result = {"cost_models": {cm.name: {proc.name: figures(cm, proc, mix, trials, null_trials, rng)
                                        for proc in procedures(cm)} for cm in COST_MODELS},
              "procedures": {cm.name: {"preset": cm.preset, **{p.name: {"judge": asdict(p.judge), "screen": p.screen
                                                                        and asdict(p.screen)} for p in procedures(cm)}}
                             for cm in COST_MODELS},
              "settings": {"mix": mix, "trials": trials, "null_trials": null_trials, "seed": args.seed}}
    print(json.dumps(result) if args.json else format_table(result, mix, trials, null_trials))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
