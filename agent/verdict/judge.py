"""The judge: decides from interleaved timed runs whether a candidate edit is faster.

Pure logic (no I/O). The harness asks `next_arm()`, runs that arm, `add()`s the result, and reads
`verdict()` until its state is no longer "continue".

Design, and why:
- Order. Runs come in counterbalanced blocks of four: I C C I (incumbent, candidate, candidate, incumbent) or
  its mirror C I I C. On a machine that drifts linearly by delta per run the log ratio of the first pair of
  a block gets +delta and the second -delta, so the mean over a complete block cancels the drift exactly (and
  any fixed effect of running first or second), in either orientation. Plain I C I C would hand the
  candidate, always second, one run of drift on every pair.
  Each block's orientation is a coin flip, seeded per experiment (`order_seed`). A fixed I C C I puts the
  incumbent at runs 0 and 3 of every block, so load that comes and goes with a period near four runs (a
  periodic job on a shared machine) lands on one arm every time and reads as a speedup; a random orientation
  turns it into noise. `python -m agent.bench.judge --fixed-order` measures both.
- Statistic. d_k = log(candidate seconds) - log(incumbent seconds) of pair k: a ratio scale, so a 10%
  speedup is the same number on a 17 s CPU run and a 3 min GPU run. One-sided paired t-test of mean(d) < 0;
  speedup = 1 - exp(mean(d)), i.e. one minus the geometric mean of the time ratios.
- Looks. The test looks after each complete block (pairs min_pairs, min_pairs + 2, ..., max_pairs), the
  only points where the drift cancels. Each look tests at alpha / (number of looks) (Bonferroni alpha
  spending). By the union bound the chance that any look falsely accepts a null edit is <= alpha whatever
  the correlation between looks, with no normal-theory approximation. Pocock boundaries would give each
  look about twice that level, but they are derived for z-statistics with known variance, which t-statistics
  with 3-9 degrees of freedom are not; O'Brien-Fleming spends almost nothing at the early looks, which is
  exactly where large GPU speedups should stop. Futility stops and the min_speedup condition only remove
  acceptances, so they cannot raise the false-accept rate.
- Heavy tails. Under a null edit the two runs of a pair are exchangeable, so d is symmetric even when single
  runs have one-sided outliers; the t-test is conservative for symmetric heavy tails (Efron 1969). A
  signed-rank test cannot help here: its exact p-value is at least 2**-n, above the per-look level until
  n = 9, so it could never stop early. `python -m agent.bench.judge` measures both claims.
- Futility. At each look, stop when the (1 - futility_alpha) upper confidence bound on the speedup is below
  min_speedup: the data already rule out a speedup worth having.
- Val loss. Accept needs the candidate's mean val loss over the judged pairs <= target. Early rejection:
  when the first val_reject_after candidate runs all exceed target by more than val_reject_margin (a quality
  loss far beyond seed noise), the edit is rejected without waiting for the timing test, or for the partner
  of the last of those runs (a block that opens C I rejects after its first run).

With a noise prior (`Judge(..., prior=noise_prior(earlier experiments))`), and why:
- What is known. Every pair of every earlier experiment measured the spread of d on this machine. Pooled within
  each experiment (squared deviations from that experiment's own mean over the sum of pairs - 1), no
  experiment's own effect inflates or biases it: an unbiased variance with df = sum(pairs - 1). A look
  combines it with its own pairs, weighted by df, and tests on the t distribution with the combined df: exact
  when the history is right. Alone, 2 pairs (1 df) need t > 159 at alpha/5; with the history the first look
  comes after ONE block (prior_first_look), and the looks 2, 4, ..., max_pairs spend alpha/5 each.
- Why not trust it. The history can mislead: the machine got noisier tonight; a compiled candidate is noisier
  than the runs the history saw (candidate sd 2x: var(d) 2.5x the history's); periodic load adds a per-block
  effect that pairs within a block cannot show (one block's mean has ~1.5x the variance they say). At the
  first look the experiment's own variance has 1 df and cannot tell, so the guard there is a fixed inflation:
  the history's variance x prior_inflation (2.5: a candidate with twice the sd, or a history sd 1.5x too
  small, is then tested at the nominal level). Without it a history 1.5x too small gives 4% false accepts.
  From the second look on two more guards act: the history counts as at most prior_max_df degrees of
  freedom, so the own pairs keep weight and the t quantile stays above the normal one; and an F test (own
  variance over the inflated history, level prior_check_alpha) drops the history at a look whose pairs are
  significantly noisier than it says, for a t-test on the own pairs alone. `python -m agent.bench.night`
  measures false accepts under all of these: about 0.5% at worst (candidate sd 2x), 0.4% (history sd 1.5x).
- Futility with a prior. With the variance known, the chance that the last look accepts, were the true effect
  the mean measured so far (conditional power, normal approximation on the look's variance), is a usable
  number: below futility_power the judge stops (UNPROVABLE, or SLOWER). A null edit on a CV 5% machine,
  whose acceptance would need about 10% observed at 10 pairs, stops after one block instead of ten. Like every
  futility stop it only removes acceptances. Without a prior the judge is exactly the one described above.
"""

import math
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Iterable, Sequence

import numpy as np
from scipy import stats

INCUMBENT = "incumbent"
CANDIDATE = "candidate"
BLOCK = (INCUMBENT, CANDIDATE, CANDIDATE, INCUMBENT)  # one counterbalanced block = 2 pairs; its mirror is C I I C


@dataclass
class JudgeParams:
    alpha: float = 0.01             # overall false-accept rate for an edit whose true speedup is 0
    min_speedup: float = 0.01       # smallest speedup worth a commit (0.01: candidate 1% faster)
    min_pairs: int = 4              # first look, in pairs; even, as looks come after whole I C C I blocks
    max_pairs: int = 10             # last look, in pairs; even; the verdict is final here
    futility_alpha: float = 0.2     # stop when the (1 - futility_alpha) upper bound on the speedup < min_speedup
    val_reject_after: int = 2       # early val-loss rejection looks at this many candidate runs...
    val_reject_margin: float = 0.02  # ...and fires when all exceed target by more than this (nats)
    # the rest apply only with a noise prior (Judge(..., prior=...)); see the module docstring
    prior_first_look: int = 2       # first look, in pairs (even), when the history supplies the variance
    prior_inflation: float = 2.5    # the history's variance is multiplied by this before use (a misleading history)
    prior_max_df: int = 40          # the history counts as at most this many degrees of freedom
    prior_check_alpha: float = 0.05  # a look whose own spread exceeds the inflated history at this level drops it
    futility_power: float = 0.2     # stop when the chance to accept at max_pairs, at the speedup so far, is below this

    def __post_init__(self):
        checks = [
            ("alpha", 0 < self.alpha < 0.5, "in (0, 0.5)"),
            ("min_speedup", 0 <= self.min_speedup < 1, "in [0, 1)"),
            ("min_pairs", self.min_pairs >= 2 and self.min_pairs % 2 == 0,
             "an even number >= 2 (looks come after whole I C C I blocks)"),
            ("max_pairs", self.max_pairs >= self.min_pairs and self.max_pairs % 2 == 0,
             f"an even number >= min_pairs ({self.min_pairs})"),
            ("futility_alpha", 0 < self.futility_alpha < 0.5, "in (0, 0.5)"),
            ("val_reject_after", self.val_reject_after >= 1, ">= 1"),
            ("val_reject_margin", self.val_reject_margin >= 0, ">= 0"),
            ("prior_first_look", 2 <= self.prior_first_look <= self.max_pairs and self.prior_first_look % 2 == 0,
             f"an even number in [2, max_pairs ({self.max_pairs})]"),
            ("prior_inflation", self.prior_inflation >= 1, ">= 1"),
            ("prior_max_df", self.prior_max_df >= 1, ">= 1"),
            ("prior_check_alpha", 0 < self.prior_check_alpha < 1, "in (0, 1)"),
            ("futility_power", 0 <= self.futility_power < 0.5, "in [0, 0.5)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"JudgeParams.{name} must be {expected}, got {getattr(self, name)!r}")

    def looks_for(self, prior: bool) -> range:
        """The pairs at which the test looks, with or without a noise prior."""
        return range(self.prior_first_look if prior else self.min_pairs, self.max_pairs + 1, 2)

    def alpha_for(self, prior: bool) -> float:
        return self.alpha / len(self.looks_for(prior))

    @property
    def looks(self) -> range:
        return self.looks_for(False)

    @property
    def alpha_look(self) -> float:
        return self.alpha_for(False)


@dataclass(frozen=True, eq=False)
class NoisePrior:
    """What earlier experiments on this machine measured of d = log(candidate / incumbent seconds) per pair."""
    var: float | np.ndarray  # pooled within-experiment variance of d (an array [trials] in the simulation)
    df: int                  # its degrees of freedom: the sum over experiments of (pairs - 1)

    def __post_init__(self):
        if not (self.df >= 1 and np.all(np.isfinite(self.var)) and np.all(np.asarray(self.var) > 0)):
            raise ValueError(f"a noise prior needs df >= 1 and a finite variance > 0, got {self.var!r}, {self.df!r}")


def within_ss(values: np.ndarray) -> np.ndarray:
    """Sum of squared deviations from the mean over the last axis: [..., n] -> [...], with n - 1 degrees of freedom."""
    values = np.asarray(values, dtype=float)
    return ((values - values.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1)


def noise_prior(experiments: Iterable[Sequence[tuple[str, float]]]) -> NoisePrior | None:
    """Pool earlier experiments into a NoisePrior; None when they hold no degree of freedom.

    Each experiment: its (arm, seconds) runs in run order, complete pairs of one incumbent and one candidate run
    (a trailing unpaired run is ignored; pass the runs before a failed one). Baselines do not count: their runs
    are not interleaved, so their spread holds what pairs cancel, a cold first run and drift (measured on our
    CPU: a first baseline run of 34 s against 15 s made the prior's sd 0.67, and true 20% wins "unprovable").
    """
    ss, df = 0.0, 0
    for runs in experiments:
        arms = [arm for arm, _ in runs]
        seconds = np.array([s for _, s in runs], dtype=float)
        n = len(runs) // 2
        is_candidate = np.array([arm == CANDIDATE for arm in arms[:2 * n]])
        if np.any(is_candidate[0::2] == is_candidate[1::2]):
            raise ValueError(f"every pair needs one incumbent and one candidate run, got {arms[:2 * n]}")
        values = pair_log_ratios(seconds[:2 * n], is_candidate)
        if len(values) >= 2:
            ss += float(within_ss(values))
            df += len(values) - 1
    return NoisePrior(ss / df, df) if df else None


def block_mirrors(order_seed: int, n_blocks: int) -> np.ndarray:
    """The coin flips of one session's order: [n_blocks] bool, True where a block runs C I I C."""
    return np.random.default_rng(order_seed).random(n_blocks) < 0.5


def candidate_mask(mirrored: np.ndarray) -> np.ndarray:
    """Block orientations [..., blocks] (True: C I I C) -> whether each run is the candidate's [..., 4 * blocks]."""
    mirrored = np.asarray(mirrored, dtype=bool)
    block = np.array([arm == CANDIDATE for arm in BLOCK])
    return np.repeat(mirrored, len(BLOCK), axis=-1) ^ np.tile(block, mirrored.shape[-1])


def pair_log_ratios(seconds: np.ndarray, is_candidate: np.ndarray) -> np.ndarray:
    """Run times in run order [..., 2n] and which runs are the candidate's [..., >= 2n]
    -> log(candidate / incumbent) per pair [..., n]."""
    log_t = np.log(np.asarray(seconds, dtype=float))
    pairs = log_t.reshape(*log_t.shape[:-1], -1, 2)
    candidate_first = np.asarray(is_candidate, dtype=bool)[..., 0:log_t.shape[-1]:2]
    return np.where(candidate_first, pairs[..., 0] - pairs[..., 1], pairs[..., 1] - pairs[..., 0])


VAL_LOSS = "val_loss"  # Verdict.cause of a rejection for quality: the candidate's val loss misses the target
CALIBRATE = "calibrate"  # Verdict.cause: it learns clearly better than it needs to, and is not faster yet (Judge)


class TimeOutcome(IntEnum):
    CONTINUE = 0
    FASTER = 1            # significant at the look's level and speedup >= min_speedup
    SLOWER = 2            # futile, and the estimated speedup is <= 0
    TOO_SMALL = 3         # futile (or significant at the last look) with 0 < speedup < min_speedup
    NOT_SIGNIFICANT = 4   # last look reached without a decision
    UNPROVABLE = 5        # with a prior: speedup > 0 but too small to be proven by max_pairs (conditional power)


@dataclass
class LookStats:
    """Paired t-test on log ratios d [trials, n]; every field is an array [trials]."""
    speedup: np.ndarray        # 1 - exp(mean d)
    p_faster: np.ndarray       # one-sided p of mean d < 0 (this look alone)
    speedup_lower: np.ndarray  # lower bound at level 1 - alpha_look: > 0 iff p_faster < alpha_look
    speedup_upper: np.ndarray  # upper bound at level 1 - futility_alpha: < min_speedup means futile
    power_left: np.ndarray     # with a prior: chance to accept at max_pairs at the speedup measured so far; else 1


def look_stats(log_ratios: np.ndarray, params: JudgeParams, prior: NoisePrior | None = None) -> LookStats:
    n = log_ratios.shape[-1]
    if n < 2:
        raise ValueError(f"a t-test needs at least 2 pairs, got {n}")
    mean = log_ratios.mean(axis=-1)
    ss = within_ss(log_ratios)
    var, df = ss / (n - 1), np.full(mean.shape, n - 1.0)
    if prior is not None:
        w = min(prior.df, params.prior_max_df)
        history = params.prior_inflation * np.asarray(prior.var, dtype=float)
        consistent = var <= history * stats.f.ppf(1 - params.prior_check_alpha, n - 1, w)
        var = np.where(consistent, (w * history + ss) / (w + n - 1), var)
        df = np.where(consistent, w + n - 1.0, df)
    se = np.sqrt(var / n)
    alpha_look = params.alpha_for(prior is not None)
    # Identical ratios (se = 0) are a certain answer, not 0/0.
    certain = np.where(mean < 0, -np.inf, np.where(mean > 0, np.inf, 0.0))
    t = np.divide(mean, se, out=certain, where=se > 0)
    q_accept = stats.t.ppf(1 - alpha_look, df)
    q_futile = stats.t.ppf(1 - params.futility_alpha, df)
    power_left = np.ones(mean.shape)
    last = params.max_pairs
    if prior is not None and n < last:
        # accept at the last look needs mean d below `bar`; the remaining pairs' mean ~ N(mean, var / (last - n))
        bar = np.minimum(-stats.t.ppf(1 - alpha_look, df + last - n) * np.sqrt(var / last),
                         math.log1p(-params.min_speedup))
        power_left = stats.norm.cdf(last * (bar - mean) / np.sqrt(var * (last - n)))
    return LookStats(
        speedup=-np.expm1(mean),
        p_faster=stats.t.cdf(t, df),
        speedup_lower=-np.expm1(mean + q_accept * se),
        speedup_upper=-np.expm1(mean - q_futile * se),
        power_left=power_left,
    )


def look_outcome(s: LookStats, params: JudgeParams, last: bool, prior: bool = False) -> np.ndarray:
    significant = s.p_faster < params.alpha_for(prior)
    futile = s.speedup_upper < params.min_speedup
    small = np.where(s.speedup <= 0, TimeOutcome.SLOWER, TimeOutcome.TOO_SMALL)
    unprovable = np.where(s.speedup <= 0, TimeOutcome.SLOWER, TimeOutcome.UNPROVABLE)
    undecided = TimeOutcome.NOT_SIGNIFICANT if last else TimeOutcome.CONTINUE
    outcome = np.where(significant & last, TimeOutcome.TOO_SMALL, undecided)
    outcome = np.where(futile, small, np.where(s.power_left < params.futility_power, unprovable, outcome))
    # futility_alpha < 0.5 makes speedup_upper >= speedup, so FASTER and futile never overlap; FASTER wins over
    # a low power_left, which a significant look cannot have anyway (futility_power < 0.5).
    return np.where(significant & (s.speedup >= params.min_speedup), TimeOutcome.FASTER, outcome)


def decide_times(log_ratios: np.ndarray, params: JudgeParams,
                 prior: NoisePrior | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sequential test over the looks reached so far.

    log_ratios [trials, available pairs] -> (TimeOutcome codes [trials], pairs at the decision [trials];
    `available` where still CONTINUE). Vectorised over trials so that the simulation runs this very code;
    prior.var may be an array [trials].
    """
    trials, available = log_ratios.shape
    outcome = np.full(trials, TimeOutcome.CONTINUE)
    n_pairs = np.full(trials, available)
    for n in params.looks_for(prior is not None):
        if n > available:
            break
        at_look = look_outcome(look_stats(log_ratios[:, :n], params, prior), params, n == params.max_pairs,
                               prior is not None)
        newly = (outcome == TimeOutcome.CONTINUE) & (at_look != TimeOutcome.CONTINUE)
        outcome[newly] = at_look[newly]
        n_pairs[newly] = n
    return outcome, n_pairs


def far_above_target(val_losses: np.ndarray, target, params: JudgeParams) -> np.ndarray:
    """The early val-loss rule: the candidate's val losses in run order [trials, runs], target [trials] or a number
    -> whether its first val_reject_after runs all exceed target by more than val_reject_margin [trials]."""
    k = params.val_reject_after
    val = np.asarray(val_losses, dtype=float)
    return (val.shape[-1] >= k) & np.all(val[..., :k] > np.asarray(target)[..., None] + params.val_reject_margin, axis=-1)


def decide(log_ratios: np.ndarray, val_losses: np.ndarray, target, params: JudgeParams,
           prior: NoisePrior | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole verdict, vectorised: the timing test, then the val-loss conditions.

    log_ratios and the candidate's val loss of each pair [trials, available pairs], target [trials] or a number
    -> (TimeOutcome [trials], rejected for val loss [trials], pairs the verdict rests on [trials]).
    An accept is outcome FASTER and not rejected for val loss.
    """
    outcome, n_pairs = decide_times(log_ratios, params, prior)
    val = np.asarray(val_losses, dtype=float)
    k = params.val_reject_after
    early = (n_pairs >= k) & far_above_target(val, target, params)
    if val.shape[-1]:
        mean_at = np.cumsum(val, axis=-1) / np.arange(1, val.shape[-1] + 1)
    else:
        mean_at = np.full((len(val), 1), np.nan)
    val_mean = np.take_along_axis(mean_at, np.maximum(n_pairs - 1, 0)[:, None], axis=-1)[:, 0]
    missed = (outcome == TimeOutcome.FASTER) & ~(val_mean <= target)
    return outcome, early | missed, np.where(early, k, n_pairs)


@dataclass
class Verdict:
    state: str                      # "continue" | "accepted" | "rejected"
    reason: str                     # for people: "accepted", "slower", "val loss 3.4100 > target 3.3000", ...
    cause: str                      # for code: a TimeOutcome's name in lower case ("faster", "slower", ...) or VAL_LOSS
    n_pairs: int                    # complete pairs the numbers below rest on (at the decision, if any)
    n_runs: int                     # 2 * n_pairs
    p_value: float | None           # one-sided p of "candidate faster" at this look x number of looks; compare with alpha
    speedup: float | None           # 1 - geometric mean of candidate/incumbent time ratios
    speedup_lower: float | None     # lower confidence bound at the look's level (alpha / looks)
    speedup_upper: float | None     # upper confidence bound at level 1 - futility_alpha
    incumbent_mean: float | None    # mean seconds of the incumbent's runs
    candidate_mean: float | None    # mean seconds of the candidate's runs
    val_loss_mean: float | None     # mean val loss of the candidate's runs
    target_val_loss: float


def beats(val: float, target: float, incumbent_vals: list[float], noise: float) -> bool:
    """The candidate learns clearly better than it needs to: its val loss is below both the target and the
    incumbent's (the same experiment's runs, on the same seeds) by more than the seed-to-seed noise. Below the
    target alone is not enough: with a baseline target (mean + tolerance) the incumbent itself is, and a shorter
    run of an edit that changes nothing about learning is a plain step cut, which spends the tolerance."""
    incumbent = [v for v in incumbent_vals if v is not None]
    level = min(target, float(np.mean(incumbent))) if incumbent else target
    return val < level - noise


class Judge:
    def __init__(self, params: JudgeParams, target_val_loss: float, order_seed: int, prior: NoisePrior | None = None,
                 learns_better_noise: float | None = None):
        """prior: the machine's noise from earlier experiments (noise_prior); None judges on this experiment's pairs.
        learns_better_noise: the val loss's seed-to-seed sd, when step calibration follows. A candidate that learns
        clearly better than it needs to (`beats`) and is not accepted at the look at min_pairs is rejected there
        (cause CALIBRATE): its runs are better spent on a shorter variant than on proving a small speedup at full
        length. At min_pairs with or without a prior, not after one block: there a calibrated variant that is
        faster but not yet significant would be sent back to calibrate (seen in the slow tier). It only removes
        acceptances, so it cannot raise the false-accept rate."""
        if math.isnan(target_val_loss):
            raise ValueError("target_val_loss must be a number (math.inf disables the val-loss condition), got nan")
        self.params = params
        self.target_val_loss = float(target_val_loss)
        self.order_seed = order_seed
        self.prior = prior
        self.learns_better_noise = learns_better_noise
        mask = candidate_mask(block_mirrors(order_seed, params.max_pairs // 2))
        self.order = [CANDIDATE if c else INCUMBENT for c in mask]  # the arm of every run the session may need
        self.runs: list[tuple[str, float, float | None]] = []  # (arm, seconds, val_loss) in run order

    @classmethod
    def from_runs(cls, params: JudgeParams, target_val_loss: float, order_seed: int, runs,
                  prior: NoisePrior | None = None) -> "Judge":
        """Rebuild from recorded (arm, seconds, val_loss) runs, e.g. after a crash of the harness."""
        judge = cls(params, target_val_loss, order_seed, prior)
        for arm, seconds, val_loss in runs:
            judge.add(arm, seconds, val_loss)
        return judge

    def next_arm(self) -> str:
        decided = self.verdict()
        if decided.state != "continue":
            raise ValueError(f"the judge has already decided ({decided.state}: {decided.reason}); no more runs")
        return self.order[len(self.runs)]

    def add(self, arm: str, seconds: float, val_loss: float | None) -> None:
        """Record one run. val_loss is required for the candidate, optional for the incumbent."""
        expected = self.next_arm()
        if arm != expected:
            raise ValueError(f"run {len(self.runs)} must be the {expected} (order seed {self.order_seed}), got {arm!r}")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be a finite number > 0, got {seconds!r}")
        if val_loss is None and arm == CANDIDATE:
            raise ValueError("a candidate run needs its val loss")
        if val_loss is not None and not math.isfinite(val_loss):
            raise ValueError(f"val_loss must be finite (failed runs are rejected before the judge), got {val_loss!r}")
        self.runs.append((arm, float(seconds), None if val_loss is None else float(val_loss)))

    def verdict(self) -> Verdict:
        p = self.params
        available = len(self.runs) // 2  # an unpaired last run waits for its partner
        first_vals = [v for arm, _, v in self.runs if arm == CANDIDATE][:p.val_reject_after]
        if far_above_target(np.array([first_vals]), self.target_val_loss, p)[0]:
            # decide's early rule, without waiting for the partner of the last of those runs
            return self._val_rejection(replace(self._summary(available), val_loss_mean=float(np.mean(first_vals))))
        runs = self.runs[:2 * available]
        val_losses = np.array([[v for arm, _, v in runs if arm == CANDIDATE]], dtype=float).reshape(1, available)
        outcome, val_rejected, n = decide(self._log_ratios(available)[None, :], val_losses, self.target_val_loss, p,
                                          self.prior)
        outcome, n = TimeOutcome(outcome[0]), int(n[0])
        s = self._summary(n)
        if val_rejected[0]:
            return self._val_rejection(s)
        s = replace(s, cause=outcome.name.lower())
        if outcome == TimeOutcome.FASTER:
            return replace(s, state="accepted", reason="accepted")
        if outcome == TimeOutcome.CONTINUE:
            if self._learns_better_than_needed(s):
                return replace(s, state="rejected", cause=CALIBRATE,
                               reason=f"val loss {s.val_loss_mean:.4f} beats the target and the incumbent by more than "
                                      f"the noise and not significantly faster at the first look: calibrate")
            return replace(s, state="continue", reason=f"{available} of {p.max_pairs} pairs")
        reason = {
            TimeOutcome.SLOWER: "slower",
            TimeOutcome.TOO_SMALL: f"speedup {s.speedup:.1%} < minimum {p.min_speedup:.1%}",
            TimeOutcome.NOT_SIGNIFICANT: f"not significant after {n} pairs",
            TimeOutcome.UNPROVABLE: f"speedup {s.speedup:.1%} too small to prove within {p.max_pairs} pairs",
        }[outcome]
        return replace(s, state="rejected", reason=reason)

    def _learns_better_than_needed(self, s: Verdict) -> bool:
        if self.learns_better_noise is None or len(self.runs) != 2 * self.params.min_pairs:
            return False
        incumbent = [v for arm, _, v in self.runs if arm == INCUMBENT]
        return beats(s.val_loss_mean, self.target_val_loss, incumbent, self.learns_better_noise)

    def _val_rejection(self, s: Verdict) -> Verdict:
        return replace(s, state="rejected", cause=VAL_LOSS,
                       reason=f"val loss {s.val_loss_mean:.4f} > target {self.target_val_loss:.4f}")

    def _log_ratios(self, n_pairs: int) -> np.ndarray:
        runs = self.runs[:2 * n_pairs]
        return pair_log_ratios(np.array([s for _, s, _ in runs]), np.array([arm == CANDIDATE for arm, _, _ in runs]))

    def _summary(self, n_pairs: int) -> Verdict:
        """The numbers over the first n_pairs pairs; the caller fills in state and reason."""
        runs = self.runs[:2 * n_pairs]
        incumbent = [s for arm, s, _ in runs if arm == INCUMBENT]
        candidate = [s for arm, s, _ in runs if arm == CANDIDATE]
        losses = [v for arm, _, v in runs if arm == CANDIDATE]
        ratios = self._log_ratios(n_pairs)
        s = look_stats(ratios[None, :], self.params, self.prior) if n_pairs >= 2 else None
        return Verdict(
            state="continue", reason="", cause=TimeOutcome.CONTINUE.name.lower(), n_pairs=n_pairs, n_runs=2 * n_pairs,
            p_value=min(1.0, float(s.p_faster[0]) * len(self.params.looks_for(self.prior is not None))) if s else None,
            speedup=float(-math.expm1(ratios.mean())) if n_pairs >= 1 else None,
            speedup_lower=float(s.speedup_lower[0]) if s else None,
            speedup_upper=float(s.speedup_upper[0]) if s else None,
            incumbent_mean=float(np.mean(incumbent)) if incumbent else None,
            candidate_mean=float(np.mean(candidate)) if candidate else None,
            val_loss_mean=float(np.mean(losses)) if losses else None,
            target_val_loss=self.target_val_loss,
        )
