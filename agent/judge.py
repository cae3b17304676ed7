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
  turns it into noise. `python -m agent.bench_judge --fixed-order` measures both.
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
  n = 9, so it could never stop early. `python -m agent.bench_judge` measures both claims.
- Futility. At each look, stop when the (1 - futility_alpha) upper confidence bound on the speedup is below
  min_speedup: the data already rule out a speedup worth having.
- Val loss. Accept needs the candidate's mean val loss over the judged pairs <= target. Early rejection:
  when the first val_reject_after candidate runs all exceed target by more than val_reject_margin (a quality
  loss far beyond seed noise), the edit is rejected without waiting for the timing test.
"""

import math
from dataclasses import dataclass, replace
from enum import IntEnum

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
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"JudgeParams.{name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def looks(self) -> range:
        return range(self.min_pairs, self.max_pairs + 1, 2)

    @property
    def alpha_look(self) -> float:
        return self.alpha / len(self.looks)


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


class TimeOutcome(IntEnum):
    CONTINUE = 0
    FASTER = 1            # significant at the look's level and speedup >= min_speedup
    SLOWER = 2            # futile, and the estimated speedup is <= 0
    TOO_SMALL = 3         # futile (or significant at the last look) with 0 < speedup < min_speedup
    NOT_SIGNIFICANT = 4   # last look reached without a decision


@dataclass
class LookStats:
    """Paired t-test on log ratios d [trials, n]; every field is an array [trials]."""
    speedup: np.ndarray        # 1 - exp(mean d)
    p_faster: np.ndarray       # one-sided p of mean d < 0 (this look alone)
    speedup_lower: np.ndarray  # lower bound at level 1 - alpha_look: > 0 iff p_faster < alpha_look
    speedup_upper: np.ndarray  # upper bound at level 1 - futility_alpha: < min_speedup means futile


def look_stats(log_ratios: np.ndarray, params: JudgeParams) -> LookStats:
    n = log_ratios.shape[-1]
    if n < 2:
        raise ValueError(f"a t-test needs at least 2 pairs, got {n}")
    mean = log_ratios.mean(axis=-1)
    se = log_ratios.std(axis=-1, ddof=1) / math.sqrt(n)
    df = n - 1
    # Identical ratios (se = 0) are a certain answer, not 0/0.
    certain = np.where(mean < 0, -np.inf, np.where(mean > 0, np.inf, 0.0))
    t = np.divide(mean, se, out=certain, where=se > 0)
    q_accept = stats.t.ppf(1 - params.alpha_look, df)
    q_futile = stats.t.ppf(1 - params.futility_alpha, df)
    return LookStats(
        speedup=-np.expm1(mean),
        p_faster=stats.t.cdf(t, df),
        speedup_lower=-np.expm1(mean + q_accept * se),
        speedup_upper=-np.expm1(mean - q_futile * se),
    )


def look_outcome(s: LookStats, params: JudgeParams, last: bool) -> np.ndarray:
    significant = s.p_faster < params.alpha_look
    futile = s.speedup_upper < params.min_speedup
    small = np.where(s.speedup <= 0, TimeOutcome.SLOWER, TimeOutcome.TOO_SMALL)
    undecided = TimeOutcome.NOT_SIGNIFICANT if last else TimeOutcome.CONTINUE
    outcome = np.where(futile, small, np.where(significant & last, TimeOutcome.TOO_SMALL, undecided))
    # futility_alpha < 0.5 makes speedup_upper >= speedup, so FASTER and futile never overlap.
    return np.where(significant & (s.speedup >= params.min_speedup), TimeOutcome.FASTER, outcome)


def decide_times(log_ratios: np.ndarray, params: JudgeParams) -> tuple[np.ndarray, np.ndarray]:
    """Sequential test over the looks reached so far.

    log_ratios [trials, available pairs] -> (TimeOutcome codes [trials], pairs at the decision [trials];
    `available` where still CONTINUE). Vectorised over trials so that the simulation runs this very code.
    """
    trials, available = log_ratios.shape
    outcome = np.full(trials, TimeOutcome.CONTINUE)
    n_pairs = np.full(trials, available)
    for n in params.looks:
        if n > available:
            break
        at_look = look_outcome(look_stats(log_ratios[:, :n], params), params, last=n == params.max_pairs)
        newly = (outcome == TimeOutcome.CONTINUE) & (at_look != TimeOutcome.CONTINUE)
        outcome[newly] = at_look[newly]
        n_pairs[newly] = n
    return outcome, n_pairs


@dataclass
class Verdict:
    state: str                      # "continue" | "accepted" | "rejected"
    reason: str                     # "accepted", "slower", "val loss 3.4100 > target 3.3000", ...
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


class Judge:
    def __init__(self, params: JudgeParams, target_val_loss: float, order_seed: int):
        if math.isnan(target_val_loss):
            raise ValueError("target_val_loss must be a number (math.inf disables the val-loss condition), got nan")
        self.params = params
        self.target_val_loss = float(target_val_loss)
        self.order_seed = order_seed
        mask = candidate_mask(block_mirrors(order_seed, params.max_pairs // 2))
        self.order = [CANDIDATE if c else INCUMBENT for c in mask]  # the arm of every run the session may need
        self.runs: list[tuple[str, float, float | None]] = []  # (arm, seconds, val_loss) in run order

    @classmethod
    def from_runs(cls, params: JudgeParams, target_val_loss: float, order_seed: int, runs) -> "Judge":
        """Rebuild from recorded (arm, seconds, val_loss) runs, e.g. after a crash of the harness."""
        judge = cls(params, target_val_loss, order_seed)
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
        ratios = self._log_ratios(available)
        outcome, n_time = decide_times(ratios[None, :], p)
        outcome, n_time = TimeOutcome(outcome[0]), int(n_time[0])

        k = p.val_reject_after  # the candidate's k-th run is in pair k; n_time <= available
        first_losses = [v for arm, _, v in self.runs[:2 * k] if arm == CANDIDATE]
        if k <= n_time and all(v > self.target_val_loss + p.val_reject_margin for v in first_losses):
            return self._val_rejection(self._summary(k))
        s = self._summary(n_time)
        if outcome == TimeOutcome.FASTER:
            val_ok = s.val_loss_mean <= self.target_val_loss
            return replace(s, state="accepted", reason="accepted") if val_ok else self._val_rejection(s)
        if outcome == TimeOutcome.CONTINUE:
            return replace(s, state="continue", reason=f"{available} of {p.max_pairs} pairs")
        reason = {
            TimeOutcome.SLOWER: "slower",
            TimeOutcome.TOO_SMALL: f"speedup {s.speedup:.1%} < minimum {p.min_speedup:.1%}",
            TimeOutcome.NOT_SIGNIFICANT: f"not significant after {n_time} pairs",
        }[outcome]
        return replace(s, state="rejected", reason=reason)

    def _val_rejection(self, s: Verdict) -> Verdict:
        return replace(s, state="rejected", reason=f"val loss {s.val_loss_mean:.4f} > target {self.target_val_loss:.4f}")

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
        s = look_stats(ratios[None, :], self.params) if n_pairs >= 2 else None
        return Verdict(
            state="continue", reason="", n_pairs=n_pairs, n_runs=2 * n_pairs,
            p_value=min(1.0, float(s.p_faster[0]) * len(self.params.looks)) if s else None,
            speedup=float(-math.expm1(ratios.mean())) if n_pairs >= 1 else None,
            speedup_lower=float(s.speedup_lower[0]) if s else None,
            speedup_upper=float(s.speedup_upper[0]) if s else None,
            incumbent_mean=float(np.mean(incumbent)) if incumbent else None,
            candidate_mean=float(np.mean(candidate)) if candidate else None,
            val_loss_mean=float(np.mean(losses)) if losses else None,
            target_val_loss=self.target_val_loss,
        )
