"""The screen: watches a candidate's first timed run (or, in front of a block that opens with the incumbent, its
untimed screen run, cut at `until`) against what is known of the incumbent and stops it as soon as it cannot win.
It only ever rejects.

Pure logic apart from the monitor's bookkeeping. The harness builds an `IncumbentReference` from the experiment's
lead incumbent run when its first block opens with the incumbent (measured just before, on the same machine), else
from the incumbent's last `recent_runs` runs (0 on the CPU presets: a reference made of runs from earlier in the
night reads a change of the machine's load as the candidate's pace; measured: a no-op and an 8% win stopped while
another process loaded our 2 cores), with every earlier run for the noise, and passes a `ScreenMonitor` as the
candidate's first run's monitor (`run_training(monitor=...)`, with the NaN rule as `first`); `monitor.last` holds
the numbers of its last look. A screen run (harness.opening, against the recent runs) stops at `until` with
PASSED when no look rejected it: what it is for, stopping what cannot win, is done by then, at part of a run.

Design, and why:
- What it compares. Each progress line gives a projected run time, wall + (1 - fraction) x recent pace (the
  pace over the last pace_window of the steps, as runner.AbortPolicy reads it), and a training loss (the mean
  of the last LOSS_LINES lines: one batch's loss depends on which text the seed put there). The same numbers
  are computed for every incumbent run at the same fraction of its steps; their mean is the reference and
  their spread across runs is the noise, measured where it applies: a projection at 20% of a run is noisier
  than at 90%, and the start-up bias of the projection cancels against the incumbent's own projections.
- Noise that outlives an incumbent. The spread of projections and of losses at a fraction is a property of the
  machine and the setup, not of one commit: it is pooled within each incumbent's runs over the current and
  earlier incumbents (deviations from each one's own mean, df = sum of runs - 1), so right after an accept the
  screen still knows its noise; the means come from the reference runs only.
- Pace. log_ratio = log(candidate's projection) - mean log(incumbent projections). One new run against the mean
  of m runs has sd pace_sd x sqrt(1 + 1/m); the optimistic end of the band is log_ratio - q x that sd, q the
  t quantile at level 1 - alpha on the pooled df (the sd is itself an estimate).
- Loss. A candidate whose loss is behind the incumbent's needs more steps to reach the same loss: if the
  incumbent reached the candidate's loss (its optimistic end: minus q_loss x the seed sd) at fraction f'
  when the candidate is at f, the candidate learns at f'/f of the incumbent's rate and needs f/f' times the
  steps (step calibration would try exactly that, agent/verdict/calibrate.py). Its time to the incumbent's quality is
  then at least its projected time x (1 + (f/f' - 1) x train_share), train_share the part of a run spent in
  steps (start-up does not grow). The same factor, below 1, credits a candidate clearly ahead: calibration
  would run it shorter, so a same-pace edit that learns better is not stopped. Within the seed band either
  way: factor 1, the pace decides (calibration only acts on a loss beyond the seed noise, calibrate.beats).
- Rule. Reject when even the optimistic end, the time to the incumbent's quality over the incumbent's time,
  is above 1 - min_speedup. A candidate truly min_speedup faster and as good is then stopped at one look with
  probability <= alpha (a 2% win, twice the margin, much less). The screen looks at fixed fractions of the run
  (every look_every), not at every line, so that the number of looks, and with it the chance that one of them
  stops a win, does not depend on how often the target prints; looks share the run's noise, so over a run the
  rate grows far less than their number; `python -m agent.bench.night` measures the wins lost over whole runs.
  The penalty for a loss behind waits for loss_min_fraction of the run (schedules that trade early loss for a
  lower final one, warmup-stable-decay, are behind mid-run; an edit behind at the middle and ahead at the end
  is lost all the same: set it to 1 to judge on pace alone); the credit for a loss ahead applies from the first
  look, as it can only spare a run. An edit that learns better by less than the training-loss seed band is
  stopped like a null edit (at GPU noise about half of the watched edits 5 val sd better, which calibration
  would have won).
- Trust. Progress lines are printed by the candidate. A candidate that fakes a fast pace or a low loss only
  earns the full comparison, whose times are ours; that is why the screen may reject but never accept. And
  because it only removes acceptances, the judge's false-accept bound holds for the whole pipeline.
- Different lengths. A candidate with another step count (a calibrated variant) is compared on pace only:
  its schedule differs, so its loss at a fraction says nothing about the incumbent's at that fraction.
"""
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
from scipy import stats

from agent.measure.runner import LOSS_LINES, Progress

SCREEN_REASON = "screen:"  # how a screened run's reason starts
PASSED = "passed the screen"  # how a screen run stopped at its `until` fraction says so (not a rejection)


@dataclass
class ScreenParams:
    min_speedup: float = 0.01       # the judge's minimum: a candidate is stopped only when it cannot reach this
    alpha: float = 0.005            # chance, at one look, of stopping a candidate exactly min_speedup faster
    loss_alpha: float = 0.001       # chance, at one look, of reading a candidate as good as the incumbent as behind
    min_fraction: float = 0.15      # no decision before this fraction of the steps (start-up, compilation)
    look_every: float = 0.05        # decide on the first line past each multiple of this fraction (not every line)
    loss_min_fraction: float = 0.3  # the loss rule waits longer: schedules differ most early in a run
    pace_window: float = 0.2        # pace over the progress lines in the last this fraction of the steps
    min_df: int = 2                 # degrees of freedom of the noise (pooled incumbent runs) before the screen decides
    recent_runs: int = 4            # a block opening with the candidate: the incumbent's last this many runs are the
                                    # reference (0: the screen waits for a block that opens with the incumbent)
    opening_fraction: float = 0.5   # a block opening with the incumbent: the candidate's untimed screen run in front of
                                    # it (against those recent runs) stops here unless rejected before (0: a smoke run)

    def __post_init__(self):
        checks = [
            ("min_speedup", 0 <= self.min_speedup < 1), ("alpha", 0 < self.alpha < 0.5),
            ("loss_alpha", 0 < self.loss_alpha < 0.5), ("min_fraction", 0 <= self.min_fraction <= 1),
            ("loss_min_fraction", 0 <= self.loss_min_fraction <= 1), ("pace_window", 0 < self.pace_window <= 1),
            ("look_every", 0 < self.look_every <= 1),
            ("min_df", self.min_df >= 1), ("recent_runs", self.recent_runs >= 0),
            ("opening_fraction", 0 <= self.opening_fraction <= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"ScreenParams.{name} out of range: {getattr(self, name)!r}")


def log_projection(fraction: np.ndarray, wall: np.ndarray, window: float) -> np.ndarray:
    """Progress fractions [K] (increasing) and walls [..., K] -> log projected run time [..., K] (NaN at line 0).

    Pace from the earliest line inside the window (at least the previous line) to this one; the launch -> first
    line interval, where start-up lands, never counts (runner.AbortPolicy's rule)."""
    fraction = np.asarray(fraction, dtype=float)
    wall = np.asarray(wall, dtype=float)
    j = np.arange(len(fraction))
    start = np.minimum(np.searchsorted(fraction, fraction - window, side="left"), j - 1)
    start = np.maximum(start, 0)
    progressed = fraction - fraction[start]
    with np.errstate(divide="ignore", invalid="ignore"):
        pace = (wall - wall[..., start]) / progressed
        projected = np.log(wall + (1 - fraction) * pace)
    return np.where(progressed > 0, projected, np.nan)


def smoothed_loss(loss: np.ndarray) -> np.ndarray:
    """Losses [..., K] -> mean of the last LOSS_LINES lines at each line [..., K] (NaN until there are that many)."""
    loss = np.asarray(loss, dtype=float)
    c = np.cumsum(np.concatenate([np.zeros(loss.shape[:-1] + (1,)), loss], axis=-1), axis=-1)
    mean = (c[..., LOSS_LINES:] - c[..., :-LOSS_LINES]) / LOSS_LINES
    return np.concatenate([np.full(loss.shape[:-1] + (min(LOSS_LINES - 1, loss.shape[-1]),), np.nan), mean], axis=-1)


def reach_fraction(fraction: np.ndarray, curve: np.ndarray, level: np.ndarray) -> np.ndarray:
    """The first fraction at which a loss curve [..., K] (made monotone: its running minimum) comes down to
    `level` [...], interpolated between lines; inf where it never does. NaN points count as not reached."""
    level = np.asarray(level, dtype=float)
    low = np.fmin.accumulate(np.where(np.isnan(curve), np.inf, curve), axis=-1)
    low = np.broadcast_to(low, np.broadcast_shapes(low.shape[:-1], level.shape) + low.shape[-1:])
    above = (low > level[..., None]).sum(axis=-1)  # a prefix, as `low` never rises
    i = np.clip(above, 1, len(fraction) - 1)
    hi, lo = np.take_along_axis(low, (i - 1)[..., None], -1)[..., 0], np.take_along_axis(low, i[..., None], -1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.where(np.isfinite(hi) & (hi > lo), (hi - level) / (hi - lo), 1.0)
    between = fraction[i - 1] + (fraction[i] - fraction[i - 1]) * np.clip(step, 0, 1)
    return np.where(above == 0, fraction[0], np.where(above >= len(fraction), np.inf, between))


def look_lines(fraction: np.ndarray, look_every: float) -> np.ndarray:
    """Progress fractions [K] -> whether the screen looks at each line [K]: the first line past each multiple."""
    k = np.floor(np.asarray(fraction, dtype=float) / look_every + 1e-9)
    return np.diff(k, prepend=-1.0) > 0


def _pooled_sd(groups: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Groups of runs [..., runs, K] -> sd at each line pooled within groups [..., K], and its df."""
    df = sum(g.shape[-2] - 1 for g in groups)
    ss = sum(((g - g.mean(axis=-2, keepdims=True)) ** 2).sum(axis=-2) for g in groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(ss / df) if df else np.full(ss.shape, np.nan), df


@dataclass
class IncumbentReference:
    """What the incumbent's runs say, on the fraction grid of their progress lines; arrays may carry leading
    dimensions [...] (trials, in the simulation)."""
    fraction: np.ndarray     # [K] progress fraction (step / total) of the grid
    total: int               # the incumbent's step count
    log_proj: np.ndarray     # [..., K] mean over the incumbent's runs of the log projected run time
    log_proj_sd: np.ndarray  # [..., K] one run's sd about its incumbent's mean (pooled): pace noise at that fraction
    loss: np.ndarray         # [..., K] mean over the incumbent's runs of the smoothed training loss
    loss_sd: np.ndarray      # [..., K] one run's sd of it (pooled): seed noise
    seconds: np.ndarray      # [...] the incumbent's mean run time, for the report
    train_share: float       # part of a run spent in steps (after the first progress line): extra steps cost this
    runs: int                # the current incumbent's runs behind the means
    df: int                  # degrees of freedom of the sds

    @classmethod
    def from_arrays(cls, fraction, total: int, wall: np.ndarray, loss: np.ndarray, seconds: np.ndarray,
                    earlier: tuple = (), window: float = ScreenParams.pace_window) -> "IncumbentReference":
        """fraction [K]; the incumbent's runs: walls and losses at those fractions [..., runs, K], seconds
        [..., runs]; earlier: (walls, losses) of earlier incumbents' runs on the same grid, for the noise only."""
        groups = [(np.asarray(wall, dtype=float), np.asarray(loss, dtype=float))] + [
            (np.asarray(w, dtype=float), np.asarray(x, dtype=float)) for w, x in earlier]
        proj = [log_projection(fraction, w, window) for w, _ in groups]
        smooth = [smoothed_loss(x) for _, x in groups]
        proj_sd, df = _pooled_sd(proj)
        seconds = np.asarray(seconds, dtype=float)
        return cls(np.asarray(fraction, dtype=float), int(total), proj[0].mean(axis=-2), proj_sd,
                   smooth[0].mean(axis=-2), _pooled_sd(smooth)[0], seconds.mean(axis=-1),
                   float(np.mean(1 - groups[0][0][..., 0] / seconds)), seconds.shape[-1], df)

    @classmethod
    def from_runs(cls, runs: list[dict], earlier: list[list[dict]] = (),
                  window: float = ScreenParams.pace_window) -> "IncumbentReference":
        """The incumbent's runs, each {"seconds": s, "curve": [{"step", "total", "loss", "wall"}, ...]} (a ledger
        row's runs); earlier: the runs of earlier incumbents, one list per commit (their noise only). The grid is
        the first run's lines; every other run is interpolated onto it by fraction."""
        if not runs:
            raise ValueError("the reference needs at least one incumbent run")
        curves = [[p for p in r["curve"] if math.isfinite(p["loss"])] for r in runs]
        if any(len(c) < 2 for c in curves):
            raise ValueError("every incumbent run needs at least 2 progress lines with a finite loss")
        total = curves[0][0]["total"]
        if any(p["total"] != total for c in curves for p in c):
            raise ValueError("incumbent runs of different lengths cannot make one reference")
        grid = np.array([p["step"] / total for p in curves[0]])

        def on_grid(group, key):
            fine = [[p for p in r["curve"] if math.isfinite(p["loss"])] for r in group]
            return np.array([np.interp(grid, [p["step"] / p["total"] for p in c], [p[key] for p in c])
                             for c in fine if len(c) >= 2])

        earlier = tuple((on_grid(g, "wall"), on_grid(g, "loss")) for g in earlier if len(g))
        return cls.from_arrays(grid, total, on_grid(runs, "wall"), on_grid(runs, "loss"),
                               np.array([r["seconds"] for r in runs]), tuple(e for e in earlier if len(e[0])), window)


@dataclass
class ScreenDecision:
    """One look of the screen; every field is an array [...] (a 0-d array for the live monitor)."""
    reject: np.ndarray        # stop the run: even its optimistic end cannot win
    log_ratio: np.ndarray     # projected log(candidate / incumbent run time)
    band: np.ndarray          # q x its sd: the optimistic end is log_ratio - band
    loss_gap: np.ndarray      # candidate's loss - the incumbent's at the same fraction (nats)
    loss_band: np.ndarray     # q_loss x its sd (seed noise)
    steps_factor: np.ndarray  # steps its optimistic loss needs to match the incumbent's / steps run (1: within seeds)
    bound: np.ndarray         # optimistic log(time to the incumbent's quality / incumbent time); reject: > log(1 - min)


@lru_cache(maxsize=256)
def _t_quantile(level: float, df: int) -> float:
    return float(stats.t.ppf(level, df))  # the live monitor asks at every look: scipy's ppf is slow


def screen_decide(fraction, log_ratio, pace_sd, loss, ref_loss, loss_sd, runs: int, df: int,
                  curve_fraction: np.ndarray, curve_loss: np.ndarray, train_share: float,
                  params: ScreenParams) -> ScreenDecision:
    """The screen's rule, vectorised: arrays [...] at the candidate's fraction (the sds: one run's, on df degrees of
    freedom; the means: over `runs` runs), and the incumbent's mean loss curve (curve_fraction [K], curve_loss
    [..., K]) to find where it had the candidate's loss. NaN loss: pace only."""
    fraction, log_ratio, loss, ref_loss = (np.asarray(x, dtype=float) for x in (fraction, log_ratio, loss, ref_loss))
    spread = math.sqrt(1 + 1 / runs)
    band = _t_quantile(1 - params.alpha, max(df, 1)) * np.asarray(pace_sd) * spread
    loss_band = _t_quantile(1 - params.loss_alpha, max(df, 1)) * np.asarray(loss_sd) * spread
    gap = loss - ref_loss
    # behind beyond the seeds (once schedules have had time to tell), or ahead (crediting only ever spares a run)
    clear = ((gap > loss_band) & (fraction >= params.loss_min_fraction)) | (gap < -loss_band)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.where(clear, fraction / reach_fraction(curve_fraction, curve_loss, loss - loss_band), 1.0)
    steps = np.where(gap > 0, np.maximum(steps, 1.0), np.minimum(steps, 1.0))
    bound = log_ratio - band + np.log1p((steps - 1) * train_share)
    reject = (df >= params.min_df) & (fraction >= params.min_fraction) & (bound > math.log1p(-params.min_speedup))
    return ScreenDecision(reject, log_ratio, band, gap, loss_band, steps, bound)


@dataclass
class ScreenMonitor:
    """A run monitor with runner.AbortPolicy's interface: `monitor(progress)` -> a reason to stop, or None.
    One per candidate run; `last` holds the numbers of the latest look (plain floats, JSON-ready)."""
    reference: IncumbentReference
    params: ScreenParams = field(default_factory=ScreenParams)
    first: Callable[[Progress], str | None] | None = None  # asked first on every line (the run's AbortPolicy)
    until: float = 1.0  # a screen run: stop it (PASSED) at the first line at or past this fraction of its steps
    seen: list[Progress] = field(default_factory=list, init=False, repr=False)
    last: dict | None = field(default=None, init=False)  # the numbers of the latest look
    passed: bool = field(default=False, init=False)  # stopped at `until` without a rejection

    def __call__(self, p: Progress) -> str | None:
        if self.first is not None and (reason := self.first(p)):
            return reason
        if not math.isfinite(p.loss) or p.total <= 0:
            return None  # NaN/inf: AbortPolicy's to report
        self.seen.append(p)
        ref, f = self.reference, p.step / p.total
        fractions = np.array([q.step / q.total for q in self.seen])
        if len(self.seen) < 2 or f < self.params.min_fraction or not look_lines(fractions, self.params.look_every)[-1]:
            return self._passed(p)
        proj = log_projection(fractions, np.array([q.wall for q in self.seen]), self.params.pace_window)[-1]
        same_length = p.total == ref.total and len(self.seen) >= LOSS_LINES
        loss = math.nan  # another length: pace only
        if same_length:
            loss = float(smoothed_loss(np.array([q.loss for q in self.seen[-LOSS_LINES:]]))[-1])

        def at(x):
            return float(np.interp(f, ref.fraction, x))

        d = screen_decide(f, proj - at(ref.log_proj), at(ref.log_proj_sd), loss, at(ref.loss), at(ref.loss_sd),
                          ref.runs, ref.df, ref.fraction, ref.loss, ref.train_share, self.params)
        seconds = float(ref.seconds)
        self.last = {
            "step": p.step, "total": p.total, "reject": bool(d.reject),
            "projected_s": seconds * math.exp(float(d.log_ratio)),
            "optimistic_s": seconds * math.exp(float(d.log_ratio - d.band)),
            "incumbent_s": seconds, "needed_s": seconds * (1 - self.params.min_speedup),
            "loss_gap": float(d.loss_gap), "loss_band": float(d.loss_band), "loss_sd": at(ref.loss_sd),
            "steps_factor": float(d.steps_factor),
            "best_case_s": seconds * math.exp(float(d.bound)),
        }
        if not d.reject:
            return self._passed(p)
        n = self.last
        why = (f"{SCREEN_REASON} projected {n['projected_s']:.1f}s (optimistic {n['optimistic_s']:.1f}s) vs incumbent "
               f"{seconds:.1f}s, a win needs < {n['needed_s']:.1f}s")
        if n["steps_factor"] > 1:
            why += (f"; loss {n['loss_gap']:+.3f} behind the incumbent (seed band {n['loss_band']:.3f}) needs "
                    f"{n['steps_factor']:.2f}x the steps: best case {n['best_case_s']:.1f}s")
        return f"{why} (step {p.step}/{p.total})"

    def _passed(self, p: Progress) -> str | None:
        if p.total > 0 and p.step / p.total >= self.until and p.step < p.total:
            self.passed = True
            return f"{PASSED} at step {p.step}/{p.total} (a screen run stops at {self.until:.0%})"
        return None
