"""`ratchet.toml`: everything the harness needs to know about a target repo, in one protected file.

The limits live here, never in the target repo: the agent cannot raise its own timeouts or lower the bar.
Unknown keys and bad values are errors that name the key.
"""
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from agent.measure.runner import AbortPolicy
from agent.verdict.judge import JudgeParams
from agent.verdict.screen import ScreenParams

FILENAME = "ratchet.toml"


class SettingsError(ValueError):
    pass


@dataclass
class Train:
    # the training command; {nproc} and {config} are filled in, extra args (smoke run) are appended
    command: str = "torchrun --standalone --nproc_per_node={nproc} -m nanomodel.train --config {config}"
    config: str = "cpu-tiny"         # named config of the target repo
    nproc: int = 0                   # processes per run; 0 = all visible GPUs, else 1
    data: str = "~/.cache/ratchet/data/stdlib"  # dataset dir: train shards go to runs, val shards only to the evaluator
    smoke_args: str = "--steps 3 --log_every 1"  # appended to the command for the untimed smoke run
    first_timeout: float = 3600.0    # seconds; the limit for runs before any incumbent time is known
    timeout_factor: float = 3.0      # hard timeout of a run = factor x incumbent mean wall-clock


@dataclass
class Paths:
    # globs relative to the repo root (fnmatch-style; ** spans directories)
    editable: list = field(default_factory=lambda: ["nanomodel/**", "kernels/**"])
    protected: list = field(default_factory=lambda: [
        "agent/**", "tests/**", "kernels/reference.py", "kernels/bench.py", "ratchet.toml",
        "pyproject.toml", ".ci/**", "nanomodel/prepare.py"])


@dataclass
class Eval:
    tokens: int = 65536              # first N validation tokens, a multiple of window
    window: int = 256                # the evaluator's sequence length: owned here, not by the candidate
    batch: int = 16                  # windows per forward pass
    timeout: float = 900.0           # seconds


@dataclass
class Target:
    policy: str = "baseline"         # "baseline": mean of the baseline runs + tolerance; "fixed": `value`
    value: float = 0.0               # the fixed target (nats/token), when policy = "fixed"
    tolerance_sigmas: float = 2.0    # baseline policy: tolerance = max(min_tolerance, sigmas x seed-to-seed std)
    min_tolerance: float = 0.002


@dataclass
class Judge:
    alpha: float = 0.01              # one-sided significance level for "candidate is faster"
    min_speedup: float = 0.01        # fraction of wall-clock a win must save
    min_pairs: int = 4               # interleaved pairs before the first look (even: looks follow whole I C C I / C I I C blocks)
    max_pairs: int = 10              # cap on runs per arm (even)
    baseline_runs: int = 5           # most runs of the incumbent for `ratchet baseline`; it stops at 2 or more once the
                                     # noise measured so far allows (agent/verdict/target.py baseline_runs_needed)
    val_reject_after: int = 1        # reject at once when the first this many candidate runs all miss the target...
    val_reject_margin: float = 0.02  # ...by more than this (nats): a quality loss far beyond seed noise
    use_history: bool = True         # judge with the run-time noise that earlier experiments of this tag measured (a noise
                                     # prior): the first look comes after one block; off: the experiment's own pairs only
    prior_first_look: int = 2        # with history: first look, in pairs (even)
    prior_inflation: float = 2.5     # with history: its variance is multiplied by this (tonight may be noisier, or the
                                     # candidate: a compiled one)
    prior_max_df: int = 40           # with history: it counts as at most this many degrees of freedom
    prior_check_alpha: float = 0.05  # with history: dropped at a look whose own pairs are noisier at this level (F test)
    futility_power: float = 0.2      # with history: stop when the chance to accept by max_pairs, at the speedup so far, < this


@dataclass
class Screen:
    # watches each candidate's first timed run against the incumbent's pace and training loss, and stops it as soon
    # as it cannot win (agent/verdict/screen.py). It only rejects: acceptance is the judge's alone.
    enabled: bool = True
    alpha: float = 0.005             # chance, at one look, of stopping a candidate exactly min_speedup faster
    loss_alpha: float = 0.001        # chance, at one look, of reading a candidate as good as the incumbent as behind
    min_fraction: float = 0.15       # no decision before this fraction of the steps (start-up, compilation)
    look_every: float = 0.05         # decide at the first progress line past each multiple of this fraction
    loss_min_fraction: float = 0.3   # the loss rule waits for this fraction (schedules differ early); 1: pace only
    recent_runs: int = 4             # a block that opens with the candidate: the incumbent's last this many runs are the
                                     # reference (0: screen only after the incumbent's lead run of the same block)
    recent_max_age: float = 3600.0   # seconds: incumbent runs of experiments started longer ago are no reference
    opening_fraction: float = 0.5    # a block that opens with the incumbent, when those recent runs exist: the candidate's
                                     # untimed screen run in front of it (in place of the smoke run) stops at this fraction
                                     # of its steps unless the screen rejects it first (0: the smoke run)


@dataclass
class Abort:
    # the runner's abort rules for candidate runs the screen does not watch (agent/measure/runner.py AbortPolicy,
    # which owns the defaults and their reasons)
    pace_slack: float = AbortPolicy.pace_slack      # abort when the projected wall-clock exceeds the incumbent's by this fraction
    loss_slack: float = AbortPolicy.loss_slack      # abort when the loss (last 3 lines) is this many nats above the incumbent's
    min_fraction: float = AbortPolicy.min_fraction  # no pace/loss aborts before this fraction of the run


@dataclass
class Length:
    # the training length knob, for step calibration: a regex whose one group is the step count in `file`
    file: str = "nanomodel/config.py"
    pattern: str = r"steps: int = (\d+)"
    calibrate: bool = True           # try shorter (or longer) runs when an edit changes the loss reached
    max_attempts: int = 2            # derived attempts per edit
    min_fraction: float = 0.3        # never calibrate below this fraction of the current length
    max_fraction: float = 1.5        # nor above this multiple


@dataclass
class Settings:
    train: Train = field(default_factory=Train)
    paths: Paths = field(default_factory=Paths)
    eval: Eval = field(default_factory=Eval)
    target: Target = field(default_factory=Target)
    judge: Judge = field(default_factory=Judge)
    screen: Screen = field(default_factory=Screen)
    abort: Abort = field(default_factory=Abort)
    length: Length = field(default_factory=Length)

    @property
    def data_dir(self) -> Path:
        return Path(self.train.data).expanduser()


def _build(cls, table: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in known:
            raise SettingsError(f"{FILENAME}: unknown key [{where}] {key} (known: {', '.join(known)})")
        default = known[key].default_factory() if callable(known[key].default_factory) else known[key].default
        if is_dataclass(default):
            if not isinstance(value, dict):
                raise SettingsError(f"{FILENAME}: [{key}] must be a table")
            kwargs[key] = _build(type(default), value, key)
            continue
        expected = float if isinstance(default, float) else type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or isinstance(value, bool) != isinstance(default, bool):
            raise SettingsError(f"{FILENAME}: [{where}] {key} must be {expected.__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def validate(s: Settings) -> Settings:
    checks = [
        (s.train.nproc >= 0, "[train] nproc must be >= 0"),
        (s.train.command.strip() != "", "[train] command is empty"),
        (s.train.timeout_factor > 1, "[train] timeout_factor must be > 1"),
        (s.train.first_timeout > 0, "[train] first_timeout must be > 0"),
        (s.eval.tokens > 0 and s.eval.window > 0 and s.eval.tokens % s.eval.window == 0,
         "[eval] tokens must be a positive multiple of window"),
        (s.eval.batch > 0, "[eval] batch must be > 0"),
        (s.target.policy in ("baseline", "fixed"), "[target] policy must be 'baseline' or 'fixed'"),
        (s.target.policy != "fixed" or s.target.value > 0, "[target] value must be > 0 with policy 'fixed'"),
        (0 < s.judge.alpha < 0.5, "[judge] alpha must be in (0, 0.5)"),
        (0 <= s.judge.min_speedup < 1, "[judge] min_speedup must be in [0, 1)"),
        (2 <= s.judge.min_pairs <= s.judge.max_pairs and s.judge.min_pairs % 2 == 0 == s.judge.max_pairs % 2,
         "[judge] need even 2 <= min_pairs <= max_pairs"),
        (s.judge.baseline_runs >= 2, "[judge] baseline_runs must be >= 2"),
        (s.screen.recent_max_age > 0, "[screen] recent_max_age must be > 0"),
        (s.abort.pace_slack >= 0 and s.abort.loss_slack > 0, "[abort] slacks must be positive"),
        (all(isinstance(g, str) for g in s.paths.editable + s.paths.protected), "[paths] globs must be strings"),
        (_one_group(s.length.pattern), "[length] pattern must be a valid regex with exactly one group"),
        (s.length.max_attempts >= 0, "[length] max_attempts must be >= 0"),
        (0 < s.length.min_fraction < 1 < s.length.max_fraction, "[length] need 0 < min_fraction < 1 < max_fraction"),
    ]
    for ok, message in checks:
        if not ok:
            raise SettingsError(f"{FILENAME}: {message}")
    try:  # the statistics' own range checks
        judge_params(s)
        screen_params(s)
    except ValueError as e:
        raise SettingsError(f"{FILENAME}: {e}") from None
    return s


def run_definition(s: Settings) -> dict:
    """The settings that define a timed run and its val loss. A tag's baseline (its times, its target) holds only
    for these: its state records them, and a command on the tag refuses to go on when they differ."""
    return {"train.command": s.train.command, "train.config": s.train.config, "train.nproc": s.train.nproc,
            "eval.tokens": s.eval.tokens, "eval.window": s.eval.window}


def judge_params(s: Settings) -> JudgeParams:
    """The judge's parameters from [judge]."""
    j = s.judge
    return JudgeParams(alpha=j.alpha, min_speedup=j.min_speedup, min_pairs=j.min_pairs, max_pairs=j.max_pairs,
                       val_reject_after=j.val_reject_after, val_reject_margin=j.val_reject_margin,
                       prior_first_look=j.prior_first_look, prior_inflation=j.prior_inflation,
                       prior_max_df=j.prior_max_df, prior_check_alpha=j.prior_check_alpha,
                       futility_power=j.futility_power)


def screen_params(s: Settings) -> ScreenParams:
    """The screen's parameters from [screen] (its minimum speedup is the judge's)."""
    c = s.screen
    return ScreenParams(min_speedup=s.judge.min_speedup, alpha=c.alpha, loss_alpha=c.loss_alpha,
                        min_fraction=c.min_fraction, look_every=c.look_every, loss_min_fraction=c.loss_min_fraction,
                        recent_runs=c.recent_runs, opening_fraction=c.opening_fraction)


def _one_group(pattern: str) -> bool:
    try:
        return re.compile(pattern).groups == 1
    except re.error:
        return False


def load(root: Path) -> Settings:
    path = Path(root) / FILENAME
    if not path.exists():
        raise SettingsError(f"{path} not found: run `ratchet init` first")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: {e}") from None
    return validate(_build(Settings, table, "top level"))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def dumps(s: Settings) -> str:
    """TOML text with each section's keys; comments come from the dataclass definitions above."""
    lines = ["# Ratchet settings for this repo. Protected: the agent can never edit this file.",
             "# Every key is documented in docs/configuration.md."]
    for section in fields(s):
        lines.append(f"\n[{section.name}]")
        table = getattr(s, section.name)
        for f in fields(table):
            lines.append(f"{f.name} = {_toml_value(getattr(table, f.name))}")
    return "\n".join(lines) + "\n"


# presets for nanomodel's named configs: what differs from the defaults
PRESETS = {
    "cpu-test": dict(train=dict(config="cpu-test", first_timeout=300.0), eval=dict(tokens=8192, window=64, batch=32),
                     length=dict(pattern=r'"cpu-test": Config\([^)]*?steps=(\d+)'),
                     judge=dict(baseline_runs=3, min_pairs=4, max_pairs=8), abort=dict(min_fraction=0.25, pace_slack=0.3),
                     screen=dict(recent_runs=0)),
    # CPU presets screen against the lead run only: our shared 2-core machines change load within minutes (measured:
    # a no-op and an 8% win stopped while another process ran), where a dedicated GPU box drifts slowly
    "cpu-tiny": dict(train=dict(config="cpu-tiny", first_timeout=900.0), eval=dict(tokens=65536, window=256, batch=16),
                     screen=dict(recent_runs=0)),
    # The GPU smoke runs 16 sequences a step: 16 splits over 1, 2, 4 and 8 GPUs for every micro batch of 8 or more
    # (train.py takes min(micro, 16 / world) per rank), at least 2 per rank (with 1, a stray squeeze() misleads).
    # llm.c / speedrun GPT-2 small, 10B tokens: an estimated 2.3-3.8 hours a run on 8xH100 with this baseline
    "gpt2-124m": dict(train=dict(config="gpt2-124m", data="~/.cache/ratchet/data/fineweb", first_timeout=21600.0,
                                 smoke_args="--steps 3 --log_every 1 --batch_size 16"),
                      eval=dict(tokens=10485760, window=1024, batch=16, timeout=1800.0),
                      target=dict(policy="fixed", value=3.28),
                      length=dict(pattern=r'"gpt2-124m": Config\([^)]*?steps=(\d+)')),
    # GPT-2 small, 262M tokens: an estimated 5 minutes a run on 8xH100, 2M val tokens; beat the baseline's own loss.
    # Sized for verdicts per night (`ratchet bench night`, docs/judge.md): the screen's per-look alpha 0.01 (at CV
    # 0.3% it stops most edits that change nothing within their first run), a val-loss miss of 0.01 nats (2.5 seed
    # sd at the bench's 0.004, 7 at the speedrun's ~0.0015) rejected after one run, at most 6 pairs and conditional power 0.3 (a 2% win at CV 1%
    # is accepted 17% of the time, 40% with 10 pairs, at a third more runs per verdict)
    "gpt2-research": dict(train=dict(config="gpt2-research", data="~/.cache/ratchet/data/fineweb",
                                     first_timeout=3600.0, smoke_args="--steps 3 --log_every 1 --batch_size 16"),
                          eval=dict(tokens=2097152, window=1024, batch=16, timeout=900.0),
                          target=dict(policy="baseline"),
                          judge=dict(val_reject_margin=0.01, max_pairs=6, futility_power=0.3),
                          screen=dict(alpha=0.01),
                          length=dict(pattern=r'"gpt2-research": Config\([^)]*?steps=(\d+)')),
}


def preset(name: str) -> Settings:
    if name not in PRESETS:
        raise SettingsError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return validate(_build(Settings, PRESETS[name], "preset"))


def with_overrides(s: Settings, assignments: list[str]) -> Settings:
    """`s` with TOML assignments applied, each `section.key = value` (`ratchet init --set`): checked like the file."""
    table = {f.name: asdict(getattr(s, f.name)) for f in fields(s)}
    for assignment in assignments:
        try:
            update = tomllib.loads(assignment)
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"--set {assignment!r}: {e} (strings need quotes: train.data='\"~/data\"')") from None
        for section, values in update.items():
            if section not in table or not isinstance(values, dict):
                raise SettingsError(f"--set {assignment!r}: expected SECTION.KEY=VALUE, SECTION one of "
                                    f"{', '.join(table)}")
            table[section].update(values)
    return validate(_build(Settings, table, "top level"))
