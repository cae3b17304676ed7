"""A profile of a tree: one short profiled run at the real world size, summarised in about 30 lines for the model.

After the baseline and after each accept the incumbent is profiled, and the `profile` tool lets the model profile
its own edit the same way (`Devices.profile`, under the devices' lock like the smoke run). The run is the training
command with its `-m MODULE` replaced by agent/measure/profiled_train.py (which runs MODULE under torch.profiler) and
`--steps STEPS` appended (the flag smoke_args uses): a few steps, so the start-up and compilation that profiled_train
skips are most of its time. The child writes profile.json; this module reads it and says where a step's time goes:
by category (CATEGORIES), then the operators or kernels that take the most.

Trust: the profile is measured inside the candidate's process and written by it (profiled_train.py says how it
could be faked), so it is read as untrusted input (bounded, checked, names cleaned) and goes to the model as
information only, never to a verdict.
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from agent.guard.redaction import redact
from agent.measure import profiled_train
from agent.measure.runner import RunResult

WRAPPER = Path(profiled_train.__file__).resolve()  # the child, run by its path (its docstring says why)
STEPS = profiled_train.STEPS
PROFILE_FILE = profiled_train.PROFILE_FILE
MAX_BYTES = 20 << 20  # a profile.json bigger than this is not ours (a few hundred rows take ~100 kB)
MAX_OPS = 100_000
TOP = 10  # operators or kernels listed by self time
NAME_WIDTH = 72  # characters of a name shown (kernel names spell out whole C++ templates)
LOG_LINES = 60  # lines of a failed run's log shown instead of a profile: torchrun's report of a failed worker takes 35
OPTIMIZER, OTHER = "optimizer", "other"

# Categories by operator (CPU) or kernel (CUDA) name, tried in this order, first match wins; no match: "other".
# An event that ran inside an optimizer step (profiled_train's in_optimizer) is "optimizer" unless it communicates.
CATEGORIES = {name: re.compile(pattern) for name, pattern in {
    # collectives: NCCL kernels (ncclDevKernel_AllReduce_Sum_bf16_RING_LL), gloo, c10d ops; first, as they also
    # run inside a sharded optimizer's step
    "communication": r"nccl|gloo|c10d::|[Aa]ll_?[Rr]educe|[Aa]ll_?[Gg]ather|[Rr]educe_?[Ss]catter|[Bb]roadcast",
    # optimizer steps are found by where they ran; these are optimizer work outside one: fused and foreach Adam
    # (multi_tensor_apply_kernel<...FusedAdamMathFunctor>), foreach ops as in gradient clipping, zero_grad
    OPTIMIZER: r"Optimizer\.|_foreach_|_fused_adam|multi_tensor_apply",
    # the loss over the vocabulary: log-softmax and NLL (eager), the repo's Triton kernels (_cross_entropy_fwd);
    # before attention, whose softmax pattern would take log_softmax's backward
    "cross-entropy": r"cross_entropy|log_softmax|LogSoftMax|nll_loss",
    # fused attention (flash, memory-efficient, cuDNN SDPA) and softmax; before matmul: fmha_cutlass* kernels say
    # cutlass. An attention written as matmul + softmax counts its matmuls as matmul
    "attention": r"scaled_dot_product|flash|fmha|[Aa]ttention|attn|sdpa|softmax|SoftMax",
    # matrix products: aten ops on the CPU; cuBLAS, cuBLASLt (nvjet), CUTLASS and Inductor template kernels
    "matmul": r"aten::(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_mm|addmv|mv|dot)$|gemm|cublas|cutlass|nvjet|xmma"
              r"|wgmma|triton_tem_",
    # host-to-device copies of batches, numpy handoffs, pinned memory, data loader workers
    "data loading": r"DataLoader|from_numpy|pin_memory|Memcpy HtoD",
    # everything that reads and writes each element about once: norms, activations, arithmetic, casts and copies,
    # reductions; eager CUDA elementwise and reduce kernels, Inductor's fused pointwise/reduction kernels, Memset
    "elementwise and norms": r"norm|gelu|silu|relu|tanh|sigmoid|dropout|elementwise|reduce_kernel|CatArray|Memcpy"
                             r"|Memset|triton_(poi|per|red)_|aten::(add|sub|mul|div|neg|pow|sqrt|rsqrt|exp|log|lerp"
                             r"|addcmul|addcdiv|where|clamp|masked_fill|fill|zero|copy|_to_copy|to|cat|stack|sum"
                             r"|mean|abs|maximum|minimum|tril|triu|embedding.*|index_select)_?$",
}.items()}


class ProfileError(Exception):
    """A profile.json that is missing, too big or not what profiled_train writes."""


@dataclass(frozen=True)
class Op:
    """One row of the profile: an operator or kernel name, per whether it ran in an optimizer step."""
    name: str
    in_optimizer: bool
    count: int
    self_us: float  # summed over the recorded steps, on the measured device


@dataclass(frozen=True)
class Profile:
    """A profile.json, the measured side only (CUDA kernels, or CPU operators on a machine without CUDA)."""
    measure: str  # "cuda" | "cpu"
    world_size: int
    steps: int  # recorded steps
    wall_us: float  # their wall-clock
    busy_us: float  # time in which at least one measured event ran
    ops: tuple[Op, ...]

    def ms_per_step(self, us: float) -> float:
        return us / self.steps / 1000

    def by_category(self) -> dict[str, float]:
        """Microseconds (all recorded steps) per category, CATEGORIES' order, then other and idle."""
        totals = dict.fromkeys([*CATEGORIES, OTHER], 0.0)
        for op in self.ops:
            totals[category(op)] += op.self_us
        totals[self.idle_label()] = max(0.0, self.wall_us - self.busy_us)
        return totals

    def idle_label(self) -> str:
        if self.measure == "cuda":
            return "idle (no kernel running)"
        return "outside operators (Python, data)"

    def top(self, n: int = TOP) -> list[tuple[str, int, float]]:
        """The n heaviest names by self time, (name, count, self_us): a name's rows in and out of the optimizer
        together."""
        merged: dict[str, list] = {}
        for op in self.ops:
            row = merged.setdefault(op.name, [0, 0.0])
            row[0] += op.count
            row[1] += op.self_us
        heaviest = sorted(merged.items(), key=lambda item: -item[1][1])[:n]
        return [(name, count, us) for name, (count, us) in heaviest]


def category(op: Op) -> str:
    for name, pattern in CATEGORIES.items():
        if pattern.search(op.name) or (name == OPTIMIZER and op.in_optimizer):
            return name
    return OTHER


def profile_command(cmd: list[str]) -> list[str]:
    """The training command (launcher resolved) as a profiled run: its last `-m MODULE` (the training's; torchrun's
    own `-m torch.distributed.run` comes first) becomes `WRAPPER MODULE`, and `--steps STEPS` is appended."""
    flags = [i for i, arg in enumerate(cmd[:-1]) if arg == "-m"]
    if not flags:
        raise ProfileError(f"cannot profile {' '.join(cmd)}: the training command must run a module (-m MODULE)")
    i = flags[-1]
    return [*cmd[:i], str(WRAPPER), *cmd[i + 1:], "--steps", str(STEPS)]


def read_profile(path: Path) -> Profile:
    """The profile at `path`, checked: written inside the candidate's process, it is untrusted input."""
    if not path.exists():
        raise ProfileError(f"the run wrote no {path.name}: it ended before its optimizer's step {STEPS}")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ProfileError(f"{path.name} holds {size} bytes, more than a profile ({MAX_BYTES})")
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ProfileError(f"no readable {path.name}: {e}") from None
    try:
        measure = raw["measure"]
        if raw["version"] != profiled_train.VERSION or measure not in ("cpu", "cuda"):
            raise ValueError(f"version {raw['version']!r}, measure {measure!r}")
        rows = raw["ops"]
        if not isinstance(rows, list) or len(rows) > MAX_OPS:
            raise ValueError(f"ops is not a list of at most {MAX_OPS} rows")
        ops = tuple(Op(_text(r["name"]), r["in_optimizer"] is True, _number(r["count"], int), _number(r["self_us"]))
                    for r in rows if r["device"] == measure)
        return Profile(measure, _number(raw["world_size"], int), _number(raw["steps"], int, positive=True),
                       _number(raw["wall_us"], positive=True), _number(raw["busy_us"]), ops)
    except (KeyError, TypeError, ValueError) as e:
        raise ProfileError(f"malformed {path.name}: {type(e).__name__}: {e}") from None


def _number(value, kind=float, positive: bool = False):
    """`value` as a finite number >= 0 (> 0 when `positive`) of `kind`; ValueError otherwise (bool is no number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ValueError(f"{value!r} is not a {kind.__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{value!r} out of range")
    return kind(value)


def _text(name) -> str:
    """A name fit to show (the model reads it; the candidate may have chosen it): printable ASCII, no longer than
    profiled_train writes names."""
    if not isinstance(name, str):
        raise ValueError(f"name {name!r} is not a string")
    return "".join(c if " " <= c <= "~" else "?" for c in name[:profiled_train.MAX_NAME])


def _shown(name: str) -> str:
    """A name cut to NAME_WIDTH for a line of the summary."""
    name = name.removeprefix("void ")
    return name if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 3] + "..."


def summarize(profile: Profile, incumbent: Profile | None = None) -> str:
    """About 30 lines: where a step's time goes by category, then the top operators or kernels by self time. With
    `incumbent`, each number has the incumbent's beside it (the model compares its edit with what it changes)."""
    what = "CUDA kernels (device self time)" if profile.measure == "cuda" else "CPU operators (self CPU time)"
    lines = [f"profile: steps {STEPS - profile.steps + 1}-{STEPS} of a {STEPS}-step run (start-up and compilation "
             f"before them), rank 0 of {profile.world_size}; measured: {what}",
             "measured inside the training process (self-reported): information, not a measurement Ratchet trusts",
             f"step: {_ms(profile, profile.wall_us)} ms wall-clock, {_ms(profile, profile.busy_us)} ms busy"
             + (f" (incumbent: {_ms(incumbent, incumbent.wall_us)} ms, {_ms(incumbent, incumbent.busy_us)} ms)"
                if incumbent else "")]
    mine, theirs = profile.by_category(), incumbent.by_category() if incumbent else None
    lines.append(f"{'category':34} {'ms/step':>9} {'share':>6}" + (f" {'incumbent':>10}" if incumbent else ""))
    for name, us in mine.items():
        line = f"{name:34} {_ms(profile, us):>9} {100 * us / profile.wall_us:>5.1f}%"
        if theirs is not None:
            # the idle line's name is the same on both sides: both profiles were made on this machine
            line += f" {_ms(incumbent, theirs.get(name, 0.0)):>10}"
        lines.append(line)
    overlap = sum(op.self_us for op in profile.ops) - profile.busy_us
    if overlap > 0.02 * profile.wall_us:  # several streams or threads at once: categories add up to more than busy
        lines.append(f"(categories overlap by {_ms(profile, overlap)} ms/step: streams or threads ran at once)")
    their_us = {name: us for name, _, us in incumbent.top(MAX_OPS)} if incumbent else {}
    lines.append(f"top {TOP} by self time{' (incumbent ms/step)' if incumbent else ''}:")
    for name, count, us in profile.top():
        line = (f"  {_ms(profile, us):>8} ms {100 * us / profile.wall_us:>5.1f}% x{count / profile.steps:<5.4g} "
                f"{_shown(name)}")
        if incumbent:
            line += f" ({_ms(incumbent, their_us[name]) if name in their_us else 'absent'})"
        lines.append(line)
    return "\n".join(lines)


def _ms(profile: Profile, us: float) -> str:
    return f"{profile.ms_per_step(us):.2f}"


@dataclass(frozen=True)
class ProfileRun:
    """What a profiled run gives the model: the summary, or why there is none."""
    ok: bool
    text: str  # the summary, or the failure and the log's tail
    profile: Profile | None  # kept to put an edit's profile beside the incumbent's


def profile_outcome(result: RunResult, run_dir: Path, incumbent: Profile | None = None) -> ProfileRun:
    """The ProfileRun of a finished profiled run: its summary when it ran to the end and wrote a readable profile."""
    try:
        if result.status != "ok":
            raise ProfileError(f"the profiled run {result.status}: {result.reason}")
        profile = read_profile(run_dir / PROFILE_FILE)
    except ProfileError as e:
        return ProfileRun(False, "\n".join([f"no profile: {e}", *_log_tail(Path(result.log_path))]), None)
    return ProfileRun(True, summarize(profile, incumbent), profile)


def _log_tail(path: Path) -> list[str]:
    """The last LOG_LINES lines of a run's log, secrets redacted."""
    try:
        return ["log tail:", *redact(path.read_text(errors="replace")).splitlines()[-LOG_LINES:]]
    except OSError:
        return []
