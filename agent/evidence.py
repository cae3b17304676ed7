"""The evidence a proposer reads before it proposes: where the incumbent's time goes, its loss curve beside the
baseline's, what the judge can detect at this machine's noise and what is left of the night, and what the hardware
can do. Each section is a short text (the prompt is resent every turn); `evidence` returns them by title, in the
order shown (Context.evidence).

Trust: our clock (a run's `seconds`, the `wall` stamp the runner puts on each progress line) and our evaluator's
val losses are measurements; whatever the incumbent printed (its summary block, a progress line's loss and elapsed)
is its own word, and is marked "self-reported" wherever it appears. These texts feed the proposer only, never a
verdict.

Inputs are plain: ledger rows (Ledger.rows()), state.json (Ledger.load_state(): "baseline" and "incumbent" arms),
the judge's parameters and noise prior as the harness uses them, the run's process count and the loop's budgets.
"""
import math
import os
import platform
import re
from dataclasses import dataclass

import numpy as np

from agent.measure import hardware
from agent.measure.runner import RANK_PREFIX_RE, cpu_threads_per_rank
from agent.records.types import Arm
from agent.verdict.detectable import detectable
from agent.verdict.judge import INCUMBENT, JudgeParams, NoisePrior

TIME = "Where the time goes"
CURVES = "Loss curves"
DETECT = "What the judge can detect"
HARDWARE = "Hardware facts"

SUMMARY_KEYS = ("final_train_loss", "val_loss", "steps", "tokens", "train_seconds", "tokens_per_sec",
                "peak_memory_mb", "mfu_percent", "world_size")  # nanomodel/train.py's summary block
SUMMARY_LINE = re.compile(r"(\w{1,40}):\s+(-?\d{1,15}(?:\.\d{1,10})?)")  # bounded: the text is the candidate's
LOG_TAIL = 16384  # bytes of a log's end searched for the summary block, which is its last ten lines
CURVE_POINTS = 20  # rows of the loss-curve table


@dataclass
class Night:
    """The loop's budgets and what it has used of them (agent/loop.py Budgets and loop.json), for "what is left"."""
    hours: float | None = None          # the time budget (Budgets.hours); None: none
    active_s: float = 0.0               # loop time used so far, across resumes (loop.json "active_s")
    max_experiments: int | None = None  # the experiment budget (Budgets.max_experiments); None: none
    experiments: int = 0                # experiments so far (loop.json "experiments")


@dataclass
class TimeSplit:
    """One run's wall-clock cut at its first and last progress lines: startup + first_seconds + steady + after =
    seconds (unless a wild self-reported elapsed was clamped)."""
    seconds: float               # launch -> every process gone (our clock)
    startup: float               # launch -> first training step: the first line's wall - its self-reported elapsed
    first_steps: int             # steps the first progress line covers
    first_seconds: float         # their self-reported elapsed (compilation and warm-up land here)
    steady: float                # first -> last progress line (our clock)
    step_seconds: float | None   # steady / steps between them; None with a single progress line
    after: float                 # last progress line -> exit (our clock): save, summary, teardown


def time_split(seconds: float, curve: list[dict]) -> TimeSplit | None:
    """The split of a run from its progress lines ({step, total, loss, elapsed, wall}); None without any."""
    if not curve:
        return None
    first, last = curve[0], curve[-1]
    # the elapsed is the candidate's; clamped so that a wild one cannot make a part negative
    startup = min(max(first["wall"] - first["elapsed"], 0.0), first["wall"])
    steps = last["step"] - first["step"]
    steady = last["wall"] - first["wall"]
    return TimeSplit(seconds=seconds, startup=startup, first_steps=first["step"], first_seconds=first["wall"] - startup,
                     steady=steady, step_seconds=steady / steps if steps > 0 else None,
                     after=max(seconds - last["wall"], 0.0))


def read_summary(log: str) -> dict[str, float]:
    """The numbers of the last summary block (after a `---` line) at the end of a run's log: its known keys only;
    {} when the log is gone or has no block. All self-reported."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL))
            lines = [RANK_PREFIX_RE.sub("", line).strip() for line in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return {}
    if "---" not in lines:
        return {}
    start = len(lines) - lines[::-1].index("---")
    matches = (SUMMARY_LINE.fullmatch(line) for line in lines[start:])
    return {m[1]: float(m[2]) for m in matches if m and m[1] in SUMMARY_KEYS}


def commit_runs(rows: list[dict], commit: str) -> list[dict]:
    """The finished runs of `commit`, in ledger order: as the incumbent of any experiment (the baseline's among
    them: its rows' parent) and as an experiment's candidate (its accepted runs, a replay's: its rows' commit)."""
    return [r for row in rows for r in row.get("runs", [])
            if r.get("status") == "ok" and commit == (row.get("parent") if r["arm"] == INCUMBENT else row.get("commit"))]


def _incumbent_runs(rows: list[dict], state: dict) -> list[dict]:
    """The incumbent's runs from the ledger, or where it has none (rows lost, an old state) from state.json's arm:
    its seconds and val losses, the last one's curve, no logs."""
    arm = Arm.from_state(state["incumbent"])
    runs = commit_runs(rows, arm.commit)
    if runs:
        return runs
    runs = [{"seconds": s, "val_loss": v, "curve": [], "log": ""} for s, v in zip(arm.seconds, arm.val_losses)]
    if runs:
        runs[-1]["curve"] = arm.curve
    return runs


def _sd(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) >= 2 else None


def run_summary(rows: list[dict], state: dict, memory_mb: float | None = None, gpu: bool = False) -> str:
    """Where the incumbent's time goes (its latest run, cut by our clock), its run-time noise, its val loss against
    the target, and its self-reported summary block. `memory_mb`: what its peak memory is read against (a GPU's
    memory, or without GPUs the machine's RAM: `gpu` says which)."""
    if "incumbent" not in state or "baseline" not in state:
        return "No incumbent yet: the baseline has not been measured."
    commit = state["incumbent"]["commit"]
    runs = _incumbent_runs(rows, state)
    if not runs:
        return f"The incumbent ({commit[:12]}) has no finished runs on record."
    latest = runs[-1]
    lines = [f"The incumbent ({commit[:12]}), {len(runs)} finished runs; latest log: {latest.get('log') or 'none'}."]
    split = time_split(latest["seconds"], latest.get("curve") or [])
    if split is None:
        lines.append(f"Latest run: {latest['seconds']:.1f} s launch to exit (our clock); no progress lines to cut it.")
    else:
        lines += _split_lines(split)
    seconds = [r["seconds"] for r in runs]
    sd = _sd(seconds)
    mean = float(np.mean(seconds))
    lines.append(f"Run time over {len(runs)} runs (our clock): mean {mean:.1f} s" +
                 (f", sd {sd:.2f} s, CV {sd / mean:.2%}" if sd is not None else ", sd unknown (one run)"))
    lines += _summary_lines(read_summary(latest.get("log") or ""), latest, memory_mb, gpu)
    lines += _val_lines(state, [r["val_loss"] for r in runs if r.get("val_loss") is not None])
    return "\n".join(lines)


def _split_lines(s: TimeSplit) -> list[str]:
    def part(name: str, seconds: float, note: str) -> str:
        return f"  {name:<18}{seconds:8.1f} s {seconds / s.seconds:4.0%}  {note}"
    pace = (f"{s.step_seconds:.4f} s/step" if s.step_seconds is not None else "one progress line: no pace")
    warm = (f"; {s.first_seconds - s.first_steps * s.step_seconds:.1f} s above the steady pace (compilation, "
            f"warm-up)" if s.step_seconds is not None else "")
    return [f"Latest run, {s.seconds:.1f} s launch to exit (our clock):",
            part("start-up", s.startup, "launch -> first step (first progress line's wall - its self-reported elapsed)"),
            part(f"first {s.first_steps} steps", s.first_seconds, f"self-reported elapsed{warm}"),
            part("steady steps", s.steady, f"first -> last progress line, {pace} (our clock)"),
            part("after last step", s.after, "last progress line -> exit: save, teardown (our clock)")]


def _summary_lines(summary: dict[str, float], run: dict, memory_mb: float | None, gpu: bool) -> list[str]:
    if not summary:
        return [f"Summary block: missing (log {run.get('log') or 'not recorded'} is gone or has none)."]
    parts = []
    if "train_seconds" in summary:
        parts.append(f"train_seconds {summary['train_seconds']:.1f} ({summary['train_seconds'] / run['seconds']:.0%} "
                     f"of our whole run)")
    if "tokens_per_sec" in summary:
        whole = f" (its tokens over our whole run: {summary['tokens'] / run['seconds']:.0f}/s)" if "tokens" in summary else ""
        parts.append(f"tokens_per_sec {summary['tokens_per_sec']:.0f}{whole}")
    if "mfu_percent" in summary:
        parts.append(f"mfu_percent {summary['mfu_percent']:.2f} (against the config's peak_flops)")
    if "peak_memory_mb" in summary:
        of = f"; {summary['peak_memory_mb'] / memory_mb:.0%} of {memory_mb:.0f} MB" if memory_mb else ""
        where = f"per GPU{of}" if gpu else f"rank 0's resident set{of} RAM"
        parts.append(f"peak_memory_mb {summary['peak_memory_mb']:.0f} ({where})")
    if "world_size" in summary:
        parts.append(f"world_size {summary['world_size']:.0f}")
    return ["Self-reported by the latest run's summary block:", *(f"  {part}" for part in parts)]


def _val_lines(state: dict, losses: list[float]) -> list[str]:
    baseline = state["baseline"]
    seed_sd = _sd(baseline["val_losses"])
    seed = (f"baseline seed-to-seed sd {seed_sd:.4f} over {len(baseline['val_losses'])} runs" if seed_sd
            else "seed-to-seed sd unknown (one baseline run)")
    if not losses:
        return [f"Val loss: none measured; target {baseline['target']:.4f} ({seed})."]
    mean = float(np.mean(losses))
    margin = baseline["target"] - mean
    in_sd = f" = {margin / seed_sd:.1f} seed sd" if seed_sd else ""
    return [f"Val loss (our evaluator): incumbent mean {mean:.4f} over {len(losses)} runs, target "
            f"{baseline['target']:.4f}: margin {margin:+.4f}{in_sd} ({seed})."]


def loss_curves(state: dict, points: int = CURVE_POINTS) -> str:
    """The incumbent's training loss beside the baseline's at the same fractions of their runs (each arm's last
    run in state.json): step and loss self-reported, the time to reach them by our clock."""
    if "incumbent" not in state or "baseline" not in state:
        return "No curves yet: the baseline has not been measured."
    inc, base = Arm.from_state(state["incumbent"]), Arm.from_state(state["baseline"])
    same = inc.commit == base.commit
    arms = [("incumbent", inc.curve)] + ([] if same else [("baseline", base.curve)])
    missing = [name for name, curve in arms if not curve]
    if missing:
        return f"No progress lines recorded for the {' and the '.join(missing)}."
    n = min(points, max(len(curve) for _, curve in arms))
    fractions = [(i + 1) / n for i in range(n)]
    header = "  frac" + "".join(f" | {name:>9}: step    loss  wall s" for name, _ in arms)
    rows = [f"{f:6.0%}" + "".join(_curve_cell(curve, f) for _, curve in arms) for f in fractions]
    title = ("Training loss by fraction of the run (step and loss self-reported, wall by our clock)" +
             ("; the incumbent is the baseline:" if same else ":"))
    return "\n".join([title, header, *rows])


def _curve_cell(curve: list[dict], fraction: float) -> str:
    """The progress line nearest to `fraction` of the run."""
    p = min(curve, key=lambda p: abs(p["step"] / p["total"] - fraction))
    return f" | {'':>9}  {p['step']:5d} {p['loss']:7.4f} {p['wall']:7.1f}"


def noise_sd(state: dict, prior: NoisePrior | None) -> tuple[float | None, str]:
    """The sd of a pair's log(candidate / incumbent seconds), and where it comes from: the prior's pooled pairs, or
    without one the incumbent's own runs (a pair of two independent runs: var d = 2 var log t)."""
    if prior is not None:
        return math.sqrt(prior.var), f"the pairs of earlier experiments (noise prior, {prior.df} df)"
    seconds = state.get("incumbent", {}).get("seconds", [])
    sd = _sd(list(np.log(seconds))) if len(seconds) >= 2 else None
    if not sd:
        return None, "unknown: fewer than two incumbent runs, and no experiment's pairs yet"
    return math.sqrt(2) * sd, f"the incumbent's {len(seconds)} runs (no experiment's pairs yet)"


def device_minutes(rows: list[dict]) -> list[float]:
    """Device minutes of each experiment that ran anything (smoke run and timed runs, our clock; evaluation not
    counted), baselines aside, in ledger order."""
    spent = []
    for row in rows:
        if row["kind"] == "baseline":
            continue
        seconds = (row.get("smoke") or {}).get("seconds", 0.0) + sum(r["seconds"] for r in row.get("runs", []))
        if seconds > 0:
            spent.append(seconds / 60)
    return spent


def judge_section(rows: list[dict], state: dict, params: JudgeParams, prior: NoisePrior | None,
                  night: Night | None = None) -> str:
    """The speedups the judge's first and last looks accept at the measured noise, the device minutes a verdict
    has cost so far, and what is left of the budgets."""
    looks = params.looks_for(prior is not None)
    lines = [f"The judge: alpha {params.alpha} over {len(looks)} looks at {', '.join(map(str, looks))} pairs "
             f"(each at alpha/{len(looks)}), minimum speedup {params.min_speedup:.0%}, "
             f"{'with' if prior is not None else 'without'} a noise prior."]
    sd, source = noise_sd(state, prior)
    if sd is None:
        lines.append(f"Noise: {source}; what it can detect is not known yet.")
    else:
        lines.append(f"Noise: sd {sd:.4f} of log(candidate / incumbent seconds) per pair (about CV "
                     f"{sd / math.sqrt(2):.2%} per run), from {source}.")
        first, last = detectable(params, sd, prior)
        lines.append("A candidate truly this much faster is accepted half the time / nine times in ten:")
        lines.append(f"  first look, {first.pairs} pairs ({2 * first.pairs} timed runs): {_pct(first.half)} / "
                     f"{_pct(first.most)}")
        lines.append(f"  last look, {last.pairs} pairs ({2 * last.pairs} timed runs), were it reached: "
                     f"{_pct(last.half)} / {_pct(last.most)}")
        lines.append("  (futility stops before the last look end some candidates near these sooner: a win below the "
                     "last look's figures is better folded into a larger edit)")
    spent = device_minutes(rows)
    per_verdict = float(np.mean(spent)) if spent else None
    lines.append(f"Device time per experiment so far: {per_verdict:.1f} min (mean of {len(spent)}; smoke and timed "
                 f"runs, our clock; evaluation not counted)." if spent else "Device time per experiment: none run yet.")
    if night is not None:
        lines += _night_lines(night, per_verdict)
    return "\n".join(lines)


def _pct(speedup: float | None) -> str:
    return "none" if speedup is None else f"{speedup:.1%}"


def _night_lines(night: Night, per_verdict: float | None) -> list[str]:
    lines = []
    if night.hours is not None:
        left = max(night.hours * 3600 - night.active_s, 0.0) / 3600
        at_pace = f" (~{left * 60 / per_verdict:.0f} more experiments at that pace)" if per_verdict else ""
        lines.append(f"Time left: {left:.1f} of {night.hours:.1f} h{at_pace}.")
    if night.max_experiments is not None:
        lines.append(f"Experiments left: {max(night.max_experiments - night.experiments, 0)} of "
                     f"{night.max_experiments}.")
    return lines or ["No time or experiment budget: the night runs until stopped."]


def hardware_facts(nproc: int, device: str | None, memory_mb: float, versions: dict[str, str]) -> str:
    """The device (`device`: the GPU's name, None on a CPU-only machine), its datasheet peaks, the interconnect,
    the CPU cores per rank, library versions, and that compile caches are cold in every timed run."""
    cores = len(os.sched_getaffinity(0))
    per_rank = cpu_threads_per_rank(nproc)
    lines = []
    if device is None:
        lines += [f"Device: CPU only, {cores} cores ({platform.machine()}), no GPU; {nproc} rank(s) over gloo, "
                  f"{per_rank} cores per rank (OMP_NUM_THREADS); fp32 (no bf16 autocast on this CPU).",
                  f"Memory: {memory_mb / 1024:.1f} GiB RAM, shared by the ranks.",
                  "The Triton kernels in kernels/ do not run here (no GPU): on CPU tensors kernels/ dispatches to its "
                  "plain-PyTorch reference, so an edit of a Triton kernel changes nothing on this machine's clock."]
    else:
        spec = hardware.gpu_spec(device)
        if spec is None:
            lines.append(f"Device: {nproc}x {device}: unknown GPU (no datasheet figures on record).")
        else:
            lines += [f"Device: {nproc}x {device} (datasheet: {spec.model}): peak {spec.bf16_tflops:.0f} TFLOP/s dense "
                      f"bf16 and {spec.memory_tbs:g} TB/s memory bandwidth per GPU "
                      f"({nproc * spec.bf16_tflops:.0f} TFLOP/s over {nproc}).",
                      f"Interconnect: NCCL over {spec.interconnect} (by the part's datasheet, not probed)."]
        lines += [f"Memory: {memory_mb / 1024:.1f} GiB per GPU.",
                  f"CPU: {cores} cores visible, {per_rank} per rank (OMP_NUM_THREADS)."]
    lines += ["Versions: " + ", ".join(f"{name} {v}" for name, v in versions.items()) + ".",
              "Compile caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) are per run and deleted after it: every "
              "timed run compiles from cold, and compilation time counts."]
    return "\n".join(lines)


def evidence(rows: list[dict], state: dict, params: JudgeParams, prior: NoisePrior | None, nproc: int,
             night: Night | None = None) -> dict[str, str]:
    """Every section, by title, in the order a proposer reads them; the device facts are read from this machine."""
    device = hardware.device_name()
    memory_mb = hardware.device_memory_mb()
    return {
        TIME: run_summary(rows, state, memory_mb, gpu=device is not None),
        CURVES: loss_curves(state),
        DETECT: judge_section(rows, state, params, prior, night),
        HARDWARE: hardware_facts(nproc, device, memory_mb, hardware.library_versions()),
    }
