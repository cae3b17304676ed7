"""The devices: the one object that launches training runs and evaluations on this machine's accelerators.

One run at a time (`lock`): a proposer's smoke check on the loop's background thread waits for the timed run on
the main thread, and `close` takes the lock for good when the loop stops. Everything a run is given is decided here,
by trusted code: the command (`python` and `torchrun` resolved to Ratchet's own), the environment (child_env: no
secrets; compile caches inside the run's folder; RATCHET_EXPECT_CUDA where there are GPUs), the sandbox (training
sees its worktree, the training shards only, and its run dir; the evaluator alone sees the validation data), and
what a run leaves behind (weights and compile caches deleted after it is measured).
"""
import shlex
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

import agent as agent_pkg
from agent.guard import sandbox
from agent.guard.child_env import child_env, expect_cuda
from agent.measure.evaluate import evaluate
from agent.measure.launcher import resolve_launcher
from agent.measure.profile import WRAPPER, Profile, ProfileRun, profile_command, profile_outcome
from agent.measure.runner import AbortPolicy, RunResult, RunnerError, cpu_threads_per_rank, kill_leftovers, run_training
from agent.settings import Settings


@dataclass
class Measurement:
    """One training run of one arm, evaluated."""
    arm: str
    seed: int
    status: str                       # "ok" or the runner's / evaluator's failure status
    seconds: float                    # wall-clock of the whole process group
    reason: str = ""
    val_loss: float | None = None
    bits_per_byte: float | None = None
    log: str = ""
    curve: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def failure_reason(m: Measurement) -> str:
    if m.status == "crashed":
        return f"crashed ({m.reason})"
    if m.status == "timeout":
        return f"timed out after {m.seconds:.0f}s"
    return m.reason  # aborted (slower, NaN, loss), probe, evaluation: the reason says it all


def nproc_for(settings: Settings) -> int:
    if settings.train.nproc:
        return settings.train.nproc
    return max(1, torch.cuda.device_count())


class Devices:
    """Runs and evaluations on this machine, one at a time. `runs_dir`: the tag's folder (runs/<tag>); runs live
    below it, and the training-data view sits in it."""

    def __init__(self, settings: Settings, runs_dir: Path, require_sandbox: bool = False):
        self.settings = settings
        self.runs_dir = Path(runs_dir)
        self.nproc = nproc_for(settings)
        # bubblewrap when it works here; otherwise a loud warning (or an error with --require-sandbox)
        self.sandboxed = sandbox.ensure(require_sandbox)
        self.sandbox_note = sandbox.describe() if self.sandboxed else f"off: {sandbox.available()[1]}"
        self.lock = threading.Lock()

    def kill_leftovers(self) -> None:
        """After a crash or kill -9: the runs an earlier process left running below runs_dir."""
        kill_leftovers(str(self.runs_dir) + "/")

    def close(self) -> None:
        """Take the run lock for good, so that no run starts after this; a run that holds it now (a proposer's smoke
        check on another thread) is killed."""
        while not self.lock.acquire(timeout=1.0):
            self.kill_leftovers()

    def train_data_view(self) -> Path:
        """A folder that holds links to the training shards only: the run is never pointed at validation data."""
        view = self.runs_dir / "train-data"
        view.mkdir(exist_ok=True)
        data = self.settings.data_dir
        shards = sorted(data.glob("*_train_*.bin"))
        if not shards:
            raise RunnerError(f"no training shards in {data}: run `ratchet init` (or `python -m nanomodel.prepare`)")
        for shard in shards:
            link = view / shard.name
            if not link.is_symlink():
                link.symlink_to(shard)
        return view

    def command(self, smoke: bool) -> list[str]:
        t = self.settings.train
        cmd = shlex.split(t.command.format(nproc=self.nproc, config=t.config))
        return resolve_launcher(cmd) + (shlex.split(t.smoke_args) if smoke else [])

    def env(self, worktree: Path, run_dir: Path, seed: int) -> dict:
        extra = {
            "RATCHET_RUN_DIR": str(run_dir),
            "RATCHET_SEED": str(seed),
            "RATCHET_TRAIN_DATA": str(self.train_data_view()),
            "PYTHONPATH": str(worktree),
            # compile caches live in the run's own folder: nothing compiled by one run reaches another
            "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "cache" / "inductor"),
            "TRITON_CACHE_DIR": str(run_dir / "cache" / "triton"),
            "OMP_NUM_THREADS": str(cpu_threads_per_rank(self.nproc)),
            **expect_cuda(self.nproc, torch.cuda.is_available()),  # a run that loses its GPUs stops, never on the CPU
        }
        if not torch.cuda.is_available():
            extra["GLOO_SOCKET_IFNAME"] = "lo"
        return sandbox.loopback_env(child_env(extra)) if self.sandboxed else child_env(extra)

    def wrap(self, cmd: list[str], worktree: Path, run_dir: Path, extra_ro: tuple[Path, ...] = ()) -> list[str]:
        """A training command as it runs: under bubblewrap when the machine has it. `extra_ro`: trusted files it
        reads besides its worktree (the profiled run's wrapper)."""
        if not self.sandboxed:
            return cmd
        return sandbox.wrap(cmd, sandbox.SandboxSpec(
            worktree=worktree, run_dir=run_dir, train_data=self.train_data_view(), extra_ro=list(extra_ro),
            gpus=torch.cuda.is_available()))

    def _evaluator_wrap(self, worktree: Path, weights_dir: Path):
        """The evaluator's sandbox: it alone sees the validation data; the trusted `agent` package and the weights
        are read-only; it may write only its own scratch dir."""
        if not self.sandboxed:
            return None
        trusted = Path(agent_pkg.__file__).resolve().parent
        return lambda cmd, scratch: sandbox.wrap(cmd, sandbox.SandboxSpec(
            worktree=worktree, run_dir=scratch, extra_ro=[self.settings.data_dir.resolve(), trusted, weights_dir],
            gpus=torch.cuda.is_available()))

    def measure(self, arm: str, worktree: Path, run_dir: Path, seed: int, *, timeout: float,
                policy: AbortPolicy | None = None, smoke: bool = False, check: Callable[[], None] = lambda: None,
                on_progress=lambda p: None) -> Measurement:
        """Train `worktree` in a fresh `run_dir` and evaluate its weights (the smoke run: the causality probe only).
        `check` (the guard's) runs before the training and again before the evaluation: it raises to stop."""
        s = self.settings
        check()
        shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted run left (a final.pt) must not be evaluated
        run_dir.mkdir(parents=True)
        with self.lock:
            result: RunResult = run_training(
                self.wrap(self.command(smoke), worktree, run_dir), cwd=worktree, env=self.env(worktree, run_dir, seed),
                log_path=run_dir / "train.log", timeout=timeout, monitor=policy, on_progress=on_progress)
        m = Measurement(arm=arm, seed=seed, status=result.status, seconds=result.seconds, reason=result.reason,
                        log=str(run_dir / "train.log"), curve=[asdict(p) for p in result.curve])
        if result.status == "ok":
            check()
            weights = run_dir / "final.pt"
            if not weights.exists():
                m.status, m.reason = "crashed", "no final.pt written"
            else:
                with self.lock:
                    ev = evaluate(worktree, weights, s.data_dir, s.eval.tokens, s.eval.window, batch=s.eval.batch,
                                  probe_only=smoke, timeout=s.eval.timeout,
                                  wrap=self._evaluator_wrap(worktree, weights.parent))
                if not ev["ok"]:
                    m.status = "probe" if ev.get("causal") is False else "eval"
                    m.reason = "causality probe failed" if m.status == "probe" else f"evaluation failed: {ev['error']}"
                elif not smoke:
                    m.val_loss, m.bits_per_byte = ev["val_loss"], ev["bits_per_byte"]
            weights.unlink(missing_ok=True)  # weights are big and never reused: no run can copy another's
        # compile caches (hundreds of MB per compiled run) are per run by design: nothing reads them again
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
        return m

    def smoke(self, tree: Path, run_dir: Path, log_path: Path) -> RunResult:
        """The smoke command on a scratch tree (a proposer's check before it commits to an edit): training only."""
        run_dir.mkdir(parents=True, exist_ok=True)
        with self.lock:
            return run_training(self.wrap(self.command(smoke=True), tree, run_dir), cwd=tree,
                                env=self.env(tree, run_dir, 0), log_path=log_path,
                                timeout=self.settings.train.first_timeout)

    def profile(self, tree: Path, run_dir: Path, incumbent: Profile | None = None) -> ProfileRun:
        """One short profiled run of `tree` at the real world size (agent/measure/profile.py), training only, in a
        fresh `run_dir`, under the lock and time limit of the smoke run: its summary (beside `incumbent`'s when
        given), or why there is none with the log's tail. Information for the model; no verdict reads it.
        The sandbox shows the run the wrapper file alone, read-only, beside its worktree: not the `agent` package,
        which the run never imports (profiled_train.py says why)."""
        shutil.rmtree(run_dir, ignore_errors=True)  # an earlier run's profile.json must not pass for this one's
        run_dir.mkdir(parents=True)
        with self.lock:
            result = run_training(self.wrap(profile_command(self.command(smoke=False)), tree, run_dir, (WRAPPER,)),
                                  cwd=tree, env=self.env(tree, run_dir, 0), log_path=run_dir / "profile.log",
                                  timeout=self.settings.train.first_timeout)
        outcome = profile_outcome(result, run_dir, incumbent)
        (run_dir / "final.pt").unlink(missing_ok=True)  # weights and compile caches, as after a measured run
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
        return outcome
