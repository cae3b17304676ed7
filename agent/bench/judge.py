"""Simulates the judge on fake timed runs: false-accept rate on null edits, power, runs used.

    python -m agent.bench.judge [--seed 0] [--trials 1000] [--null-trials 50000]

Run times come from noise models measured on our machines (CPU: CV 5.3%, one run in 8 about 13% slow,
slow drift; GPU: CV 0.1-1%). Each trial draws a whole session of 2 * max_pairs runs in the judge's run
order and runs the judge's own sequential test (`decide_times`, vectorised over trials). Val losses are
not simulated: an accepted trial is one the timing test accepts.
"""

import argparse
from dataclasses import dataclass

import numpy as np
from scipy import stats

from agent.verdict.judge import JudgeParams, TimeOutcome, candidate_mask, decide_times, pair_log_ratios

BASE_SECONDS = 17.0  # incumbent run time; the judge works on ratios, so any value gives the same result
SPEEDUPS = (0.0, 0.02, 0.05, 0.10, 0.20)  # true speedups simulated; 0 is the null edit


@dataclass(frozen=True)
class Noise:
    name: str
    cv: float                   # per-run coefficient of variation (log-scale sd) of the base noise
    tails: str = "normal"       # "normal", or "t3": Student-t with 3 dof scaled to the same sd
    outlier_rate: float = 0.0   # fraction of runs that are slow outliers...
    outlier_slow: float = 0.0   # ...by this fraction
    drift: float = 0.0          # linear drift of the machine, first run to last (fraction)
    walk: float = 0.0           # random-walk drift: sd of the step between consecutive runs
    periodic: float = 0.0       # load that comes and goes: amplitude (fraction) of a sine over the runs...
    period: float = 4.0         # ...with this period in runs, at a random phase per session

    def log_factors(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        """Multiplicative noise on log scale for [trials, runs]."""
        if self.tails == "t3":
            noise = rng.standard_t(3, shape) * self.cv / np.sqrt(3.0)  # t3 has variance 3
        else:
            noise = rng.normal(0.0, self.cv, shape)
        noise += np.log1p(self.outlier_slow) * (rng.random(shape) < self.outlier_rate)
        noise += np.linspace(0.0, np.log1p(self.drift), shape[1])
        noise += np.cumsum(rng.normal(0.0, self.walk, shape), axis=1)
        phase = rng.uniform(0.0, 2 * np.pi, (shape[0], 1))
        noise += self.periodic * np.sin(2 * np.pi * np.arange(shape[1]) / self.period + phase)
        return noise


NOISE_MODELS = (
    Noise("cpu normal", cv=0.05),
    Noise("cpu t3", cv=0.05, tails="t3"),
    Noise("cpu outliers", cv=0.05, outlier_rate=1 / 8, outlier_slow=0.13),
    Noise("cpu drift", cv=0.05, drift=0.08, walk=0.005),
    Noise("cpu periodic", cv=0.05, periodic=0.05),
    Noise("gpu normal", cv=0.01),
    Noise("gpu drift", cv=0.01, drift=0.08, walk=0.005),
)


def simulate(noise: Noise, speedup: float, trials: int, params: JudgeParams, rng: np.random.Generator,
             fixed_order: bool = False) -> dict:
    """fixed_order: every block I C C I, instead of the judge's coin flip per block."""
    runs = 2 * params.max_pairs
    mirrored = np.zeros((trials, runs // 4), bool) if fixed_order else rng.random((trials, runs // 4)) < 0.5
    is_candidate = candidate_mask(mirrored)
    log_seconds = np.log(BASE_SECONDS) + noise.log_factors(rng, (trials, runs)) + is_candidate * np.log1p(-speedup)
    outcome, n_pairs = decide_times(pair_log_ratios(np.exp(log_seconds), is_candidate), params)
    accepted = int(np.sum(outcome == TimeOutcome.FASTER))
    return {
        "noise": noise.name,
        "speedup": speedup,
        "trials": trials,
        "accept": accepted / trials,
        # one-sided 95% Clopper-Pearson upper bound on the accept rate
        "accept_upper95": float(stats.beta.ppf(0.95, accepted + 1, trials - accepted)) if accepted < trials else 1.0,
        "runs": float(2 * n_pairs.mean()),
        **{o.name.lower(): float(np.mean(outcome == o)) for o in TimeOutcome if o not in (TimeOutcome.CONTINUE, TimeOutcome.FASTER)},
    }


def format_table(rows: list[dict], params: JudgeParams) -> str:
    lines = [
        f"judge: alpha {params.alpha}, min speedup {params.min_speedup:.0%}, pairs {params.min_pairs}..{params.max_pairs}"
        f" (looks every 2 pairs at alpha/{len(params.looks)} = {params.alpha_look:.4f}),"
        f" futility alpha {params.futility_alpha}",
        f"{'noise':<13} {'speedup':>7} {'trials':>6} {'accept':>7} {'95% up':>7} {'runs':>5}"
        f" {'slower':>7} {'small':>7} {'not sig':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r['noise']:<13} {r['speedup']:>7.0%} {r['trials']:>6} {r['accept']:>7.2%} {r['accept_upper95']:>7.2%}"
            f" {r['runs']:>5.1f} {r['slower']:>7.1%} {r['too_small']:>7.1%} {r['not_significant']:>7.1%}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ratchet bench judge", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="RNG seed")
    parser.add_argument("--trials", type=int, default=1000, help="trials per row with a true speedup")
    parser.add_argument("--null-trials", type=int, default=50000, help="trials per null row (speedup 0)")
    parser.add_argument("--alpha", type=float, default=JudgeParams.alpha, help="judge's overall false-accept rate")
    parser.add_argument("--max-pairs", type=int, default=JudgeParams.max_pairs, help="judge's last look (even)")
    parser.add_argument("--fixed-order", action="store_true",
                        help="every block I C C I (no coin flips), for comparison")
    args = parser.parse_args(argv)
    params = JudgeParams(alpha=args.alpha, max_pairs=args.max_pairs)
    rng = np.random.default_rng(args.seed)
    rows = [
        simulate(noise, speedup, args.null_trials if speedup == 0 else args.trials, params, rng, args.fixed_order)
        for noise in NOISE_MODELS for speedup in SPEEDUPS
    ]
    print(format_table(rows, params))
    print("accept at speedup 0 = false-accept rate (must be <= alpha); runs = mean runs of both arms per trial")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
