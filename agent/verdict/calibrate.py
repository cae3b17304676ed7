"""Step calibration: turn a change in quality into a change in time.

In a speedrun the prize is time to a target loss. An edit that makes the model learn faster but runs the same
number of steps is not faster, so the judge rejects it and the idea would be lost. Calibration re-runs such an
edit with the length knob (ratchet.toml [length]) moved, through the full judge:

- shorter: the candidate beat the target, and the incumbent's loss in the same experiment, by more than the
  seed-to-seed noise (`beats`) but was not significantly faster.
  First guess: the step at which the candidate's training-loss curve reaches the incumbent's final loss (shifted
  by the target's margin). A run that *ends* there decays its learning rate sooner and usually ends lower than
  the long run at that step. Not always: on cpu-tiny at 3x the learning rate, a 190-step run (of 300) stalled
  at train loss 5.5 from step 90 on, where the 300-step run went on down to 5.0, and missed the target by 0.15
  (a likely cause: its warmup, a fraction of the length too, was 19 steps instead of 30). The bisection then
  lengthens.
- longer: the candidate is faster per run but missed the target by a little. First guess: the extra steps its
  end-of-run loss slope needs to close the gap, capped where the predicted wall-clock would stop being a win.
Then bisection on the outcome (too short: lengthen; met the target but not faster: shorten), at most
[length] max_attempts derived experiments per edit, each a ledger row linked to its parent. Each variant is an
ordinary edit (agent/experiment.py writes it: the parent edit's change with the knob moved), and the next length is
a function of the ledger rows alone (`next_length`), so a resume needs no bookkeeping of its own.
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.verdict.judge import VAL_LOSS, beats


class LengthError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- the knob
def read_length(text: str, pattern: str, where: str = "") -> int:
    m = re.search(pattern, text, re.S)
    if not m:
        raise LengthError(f"{where}: the length pattern {pattern!r} matches nothing")
    return int(m.group(1))


def set_length(root: Path, file: str, pattern: str, steps: int) -> int:
    """Write `steps` into the knob's file under root; returns the previous value."""
    path = Path(root) / file
    text = path.read_text()
    old = read_length(text, pattern, file)
    m = re.search(pattern, text, re.S)
    path.write_text(text[:m.start(1)] + str(steps) + text[m.end(1):])
    return old


# ---------------------------------------------------------------------------------------------- curves
def mean_curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean train loss) over the runs' progress lines, at the steps all runs logged, lightly smoothed."""
    curves = [{p["step"]: p["loss"] for p in r["curve"] if math.isfinite(p["loss"])} for r in runs if r.get("curve")]
    if not curves:
        return np.array([]), np.array([])
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    loss = np.array([np.mean([c[s] for c in curves]) for s in steps])
    if len(loss) >= 3:  # a 3-point running mean: single-batch losses are noisy
        loss = np.convolve(np.pad(loss, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    return np.array(steps, dtype=float), loss


def shorter_guess(cand_runs: list[dict], inc_runs: list[dict], length: int, margin: float) -> int | None:
    """First step where the candidate's curve reaches the incumbent's final loss + margin; None if it never does."""
    c_steps, c_loss = mean_curve(cand_runs)
    i_steps, i_loss = mean_curve(inc_runs)
    if not len(c_steps) or not len(i_steps):
        return None
    reached = np.nonzero(c_loss <= i_loss[-1] + margin)[0]
    if not len(reached) or c_steps[reached[0]] >= length:
        return None
    return int(c_steps[reached[0]])


def seconds_model(runs: list[dict], length: int) -> tuple[float, float]:
    """(fixed seconds, seconds per step) of an arm: per-step pace from its progress lines, the rest is overhead."""
    paces, totals = [], []
    for r in runs:
        curve = r.get("curve") or []
        if len(curve) >= 2 and curve[-1]["step"] > curve[0]["step"]:
            paces.append((curve[-1]["wall"] - curve[0]["wall"]) / (curve[-1]["step"] - curve[0]["step"]))
            totals.append(r["seconds"])
    if not paces:
        return float("nan"), float("nan")
    per_step = float(np.mean(paces))
    return float(np.mean(totals)) - per_step * length, per_step


def longer_guess(cand_runs: list[dict], length: int, gap: float, max_length: int) -> int:
    """Steps needed to lower the loss by `gap` at the candidate's end-of-run slope, capped at max_length."""
    steps, loss = mean_curve(cand_runs)
    tail = steps >= steps[-1] - 0.25 * length if len(steps) else steps
    if tail.sum() >= 2:
        slope = np.polyfit(steps[tail], loss[tail], 1)[0]  # nats per step, negative while still learning
        if slope < 0:
            return int(min(max_length, math.ceil(length + gap / -slope)))
    return max_length


# ---------------------------------------------------------------------------------------------- the search
@dataclass
class Bracket:
    """Bisection on the step count. lo: longest length known to miss the target (or None);
    hi: shortest length known to meet it but not win on time (or None)."""
    lo: int | None
    hi: int | None
    floor: int
    ceiling: int

    def record(self, steps: int, met_target: bool) -> None:
        if met_target:
            self.hi = steps if self.hi is None else min(self.hi, steps)
        else:
            self.lo = steps if self.lo is None else max(self.lo, steps)

    def next(self, last: int) -> int | None:
        if self.lo is not None and self.hi is not None:
            guess = (self.lo + self.hi) // 2
        elif self.hi is not None:          # met the target, not faster: go shorter by the same distance again
            guess = self.hi - max(1, (self.ceiling - self.hi) // 2) if self.hi < self.ceiling else self.hi // 2
        else:                              # missed the target: go longer
            guess = self.lo + max(1, (self.lo - self.floor) // 2)
        guess = max(self.floor, min(self.ceiling, guess))
        tried = {self.lo, self.hi, last}
        return None if guess in tried else guess


@dataclass
class Plan:
    direction: str      # "shorter" | "longer"
    length: int         # the candidate's own length
    first: int          # the first derived length to try
    bracket: Bracket


def rejected_for_val_loss(row: dict) -> bool:
    """Whether the judge rejected the experiment of `row` (a ledger row) for its val loss. Rows written before the
    verdict had a `cause` say so only in their reason, which is read for them alone."""
    v = row.get("verdict") or {}
    return v["cause"] == VAL_LOSS if "cause" in v else row.get("reason", "").startswith("val loss")


def plan(row: dict, length: int, target: float, noise: float, min_speedup: float,
         min_fraction: float, max_fraction: float) -> tuple[Plan | None, str]:
    """Whether and how to calibrate an edit judged in `row` (a ledger row). -> (plan or None, why)."""
    v = row.get("verdict") or {}
    val, cand_s, inc_s = v.get("val_loss_mean"), v.get("candidate_mean"), v.get("incumbent_mean")
    if row.get("decision") != "rejected" or val is None or cand_s is None or inc_s is None:
        return None, "no complete verdict to calibrate from"
    runs = row.get("runs", [])
    cand = [r for r in runs if r["arm"] == "candidate" and r["status"] == "ok"]
    inc = [r for r in runs if r["arm"] == "incumbent" and r["status"] == "ok"]
    floor, ceiling = max(1, math.ceil(min_fraction * length)), math.floor(max_fraction * length)
    inc_vals = [r.get("val_loss") for r in inc]
    if beats(val, target, inc_vals, noise):
        # better than needed: its margin below the target, in the incumbent's train-loss terms
        inc_val = np.mean([v for v in inc_vals if v is not None] or [target])
        guess = shorter_guess(cand, inc, length, margin=target - inc_val)
        if guess is None:
            return None, "the candidate's loss curve never reaches the incumbent's final loss early"
        first = max(floor, min(length - 1, guess))
        return Plan("shorter", length, first, Bracket(lo=None, hi=length, floor=floor, ceiling=length)), \
            f"val loss {val:.4f} beats target {target:.4f} and the incumbent's {inc_val:.4f} by more than the noise {noise:.4f}"
    gap = val - target
    if gap > 0 and rejected_for_val_loss(row) and gap <= max(5 * noise, 0.05):
        fixed, per_step = seconds_model(cand, length)
        if not (per_step > 0):
            return None, "no pace measured"
        max_length = min(ceiling, math.floor((inc_s * (1 - 2 * min_speedup) - fixed) / per_step))
        if max_length <= length:
            return None, "a longer run would no longer be faster"
        first = longer_guess(cand, length, gap, max_length)
        return Plan("longer", length, first, Bracket(lo=length, hi=None, floor=length + 1, ceiling=max_length)), \
            f"faster per run but val loss {val:.4f} misses target {target:.4f} by {gap:.4f}"
    return None, "neither clearly better than the target nor a near miss that is faster"


def next_length(first: dict, variants: list[dict], length: int, target: float, noise: float, min_speedup: float,
                min_fraction: float, max_fraction: float, max_attempts: int) -> tuple[int | None, Plan | None, str]:
    """The step count of the next calibrated variant of the edit judged in `first` (a ledger row) at `length`
    steps, after its `variants` so far (ledger rows, in the order they ran) -> (steps, plan, why); steps None when
    calibration is over: no plan, a variant accepted or without a val loss, the bisection done, or max_attempts
    variants made."""
    p, why = plan(first, length, target, noise, min_speedup, min_fraction, max_fraction)
    if p is None:
        return None, None, why
    steps = p.first
    for v in variants:
        val = (v.get("verdict") or {}).get("val_loss_mean")
        if v["decision"] == "accepted" or val is None:
            return None, p, f"variant {v['id']} {v['decision']}"
        p.bracket.record(v["steps_after"], met_target=val <= target)
        steps = p.bracket.next(v["steps_after"])
        if steps is None:
            return None, p, "no untried length is left between the lengths tried"
    if len(variants) >= max_attempts:
        return None, p, f"{max_attempts} variants made ([length] max_attempts)"
    return steps, p, why
