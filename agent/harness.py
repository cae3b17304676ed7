"""One experiment, end to end: edit -> worktree -> guard -> smoke -> timed runs + evaluator -> judge -> git + ledger.

Trust boundaries, in the order an edit crosses them:
  1. guard.path_violation: the edit may touch only editable, unprotected paths (before anything runs)
  2. policy.check_files: AST rules on the edited files reject timer/library patches, processes, network, foreign reads
  3. guard.check_integrity: protected files in the worktree equal their baseline hashes (before every run and evaluation)
  4. sandbox.wrap: runs execute under bubblewrap, no network, only their run dir writable, no validation data mounted
  5. runner.run_training: the training process is timed from outside, as a whole process group; every child's
     environment (training, smoke, evaluator) comes from child_env.child_env: no secrets
  6. evaluate.evaluate: val loss and the causality probe come from a separate process that owns the val data
  7. judge.Judge: interleaved runs and a one-sided test decide; a failed run is a rejection with its reason, never a number
Crash safety: each decision is saved in exp-<id>/result.json before the branch or ledger moves, so `recover()` can
finish it; an experiment without result.json stays in flight with its finished runs (exp-<id>/runs.jsonl) and
resumes from them when the same experiment is asked for again.
"""
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import git
import numpy as np

import agent as agent_pkg
from agent import calibrate, guard, policy, sandbox
from agent.edits import EditError, apply_edit, parse_edit, tree_fingerprint
from agent.evaluate import evaluate
from agent import settings as settings_mod
from agent.judge import (CANDIDATE, INCUMBENT, Judge, JudgeParams, NoisePrior, baseline_runs_needed, noise_prior,
                         target_from_baseline)
from agent.ledger import Ledger
from agent.child_env import child_env, expect_cuda
from agent.launcher import resolve_launcher
from agent.runner import AbortPolicy, Progress, RunResult, cpu_threads_per_rank, kill_leftovers, run_training
from agent.screen import SCREEN_REASON, IncumbentReference, ScreenMonitor
from agent.settings import Settings
from agent.workspace import Workspace, trailers


class HarnessError(RuntimeError):
    """A broken setup (not a verdict on an edit): no baseline, the incumbent itself fails, data missing."""


class Stopped(Exception):
    """A clean stop was requested between two runs; the unfinished experiment resumes with the runs it finished."""


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


class Events:
    """What the harness reports while it works; the CLI's live view overrides these."""
    def experiment(self, exp_id: str, hypothesis: str): pass
    def stage(self, text: str): pass
    def run_started(self, arm: str, index: int, total_steps_hint: int | None): pass
    def progress(self, arm: str, p): pass
    def run_finished(self, m: Measurement): pass
    def decided(self, row: dict): pass


def nproc_for(settings: Settings) -> int:
    if settings.train.nproc:
        return settings.train.nproc
    return max(1, torch.cuda.device_count())


class Harness:
    def __init__(self, root: Path, settings: Settings, tag: str, events: Events | None = None,
                 require_sandbox: bool = False):
        self.root = Path(root)
        self.settings = settings
        self.ws = Workspace(self.root, tag)
        self.ledger = Ledger(self.root / "runs" / tag)
        self.events = events or Events()
        self.nproc = nproc_for(settings)
        # bubblewrap when it works here; otherwise a loud warning (or an error with --require-sandbox)
        self.sandboxed = sandbox.ensure(require_sandbox)
        self.sandbox_note = sandbox.describe() if self.sandboxed else f"off: {sandbox.available()[1]}"
        # one run on the devices at a time: a proposer's smoke check (background thread) waits for the timed run
        self.device_lock = threading.Lock()
        self.snapshot_lock = threading.Lock()
        self.should_stop = lambda: False
        self._data_verified = False  # the dataset's full check (every sha256) runs once per process

    def lock(self) -> None:
        """One Ratchet process per tag: held until this process exits (the kernel drops it even after kill -9)."""
        self._lock_file = open(self.ledger.dir / "lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            raise HarnessError(f"another ratchet process (pid {self._lock_file.read().strip() or '?'}) is working on "
                               f"tag {self.ws.tag!r}; wait for it or `ratchet stop --tag {self.ws.tag}`") from None
        self._lock_file.truncate(0)
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> dict:
        return self.ledger.load_state()

    def require_baseline(self) -> dict:
        state = self.state
        if "baseline" not in state:
            raise HarnessError(f"no baseline for tag {self.ws.tag!r}: run `ratchet baseline --tag {self.ws.tag}` first")
        return state

    def check_data(self, new_baseline: bool = False) -> None:
        """The dataset is the one the baseline measured: every file's sha256 once per process (a resume, a new
        command), the fingerprint (sizes, the manifest's hash) before every run. A change is a broken setup, not a
        verdict: HarnessError naming the file, and the experiment in flight stays unrecorded.
        `new_baseline`: the full check only; the baseline about to be measured pins the data as it is now."""
        try:
            if not self._data_verified or new_baseline:
                guard.verify_data(self.settings.data_dir)
                self._data_verified = True
            expected = self.state.get("data_fingerprint")
            if expected is not None and not new_baseline:
                guard.check_data(self.settings.data_dir, expected)
        except guard.IntegrityError as e:
            raise HarnessError(f"{e}: the dataset is not the one the baseline measured; restore it, or measure a new "
                               f"baseline under a new tag") from None

    def judge_params(self) -> JudgeParams:
        return settings_mod.judge_params(self.settings)

    def noise_prior(self) -> NoisePrior | None:
        """The run-time noise this machine showed in the interleaved pairs of every experiment of the tag so far
        (each one's finished runs, up to its first failed one; baselines do not count, see judge.noise_prior), for
        the judge; None with [judge] use_history off."""
        if not self.settings.judge.use_history:
            return None
        experiments = []
        for row in self.ledger.rows():
            if row["kind"] == "baseline":
                continue
            runs = []
            for r in row.get("runs", []):
                if r["status"] != "ok":
                    break
                runs.append((r["arm"], r["seconds"]))
            experiments.append(runs)
        return noise_prior(experiments)

    def screen(self, row: dict, first: AbortPolicy) -> ScreenMonitor | None:
        """The monitor of the candidate's first timed run in experiment `row`, with `first` asked before it. Its
        reference: when the first block opened with the incumbent, that lead run, measured just before on the same
        machine; when it opened with the candidate, the incumbent's last [screen] recent_runs runs of experiments
        started within recent_max_age seconds (a change of the machine's load since then reads as the candidate's
        pace: per preset, 0 keeps the screen to lead runs). The noise comes from every earlier finished run, pooled
        within each commit. None when [screen] is off or no reference can be made."""
        c = self.settings.screen
        params = settings_mod.screen_params(self.settings)
        if not c.enabled:
            return None
        by_commit: dict[str, list[tuple[float, dict]]] = {}
        for done in self.ledger.rows():
            for r in done.get("runs", []):
                if r["status"] == "ok" and r.get("curve"):
                    # a candidate's runs are its commit's: the incumbent's when accepted or replayed, noise otherwise
                    commit = done["parent"] if r["arm"] == INCUMBENT else done.get("commit")
                    by_commit.setdefault(commit, []).append((done["time"], r))
        runs = [r for r in row["runs"] if r["arm"] == INCUMBENT and r["status"] == "ok" and r.get("curve")]
        if not runs and params.recent_runs:
            recent = [r for t, r in by_commit.get(row["parent"], []) if time.time() - t <= c.recent_max_age]
            total = recent[-1]["curve"][-1]["total"] if recent else None
            runs = [r for r in recent if r["curve"][-1]["total"] == total][-params.recent_runs:]
        if not runs:
            return None
        try:  # the reference's runs are a group of their own (recent runs: taken out of their commit's)
            earlier = [[r for _, r in g if not any(r is x for x in runs)] for g in by_commit.values()]
            reference = IncumbentReference.from_runs(runs, earlier=earlier)
        except ValueError as e:
            self.events.stage(f"no screen: {e}")
            return None
        if reference.df < params.min_df:  # too few runs to know the noise yet: the runner's abort rules instead
            return None
        return ScreenMonitor(reference, params, first=first)

    # ------------------------------------------------------------------ one run
    def _train_data_view(self) -> Path:
        """A folder that holds links to the training shards only: the run is never pointed at validation data."""
        view = self.ledger.dir / "train-data"
        view.mkdir(exist_ok=True)
        data = self.settings.data_dir
        shards = sorted(data.glob("*_train_*.bin"))
        if not shards:
            raise HarnessError(f"no training shards in {data}: run `ratchet init` (or `python -m nanomodel.prepare`)")
        for shard in shards:
            link = view / shard.name
            if not link.is_symlink():
                link.symlink_to(shard)
        return view

    def _command(self, smoke: bool) -> list[str]:
        t = self.settings.train
        cmd = shlex.split(t.command.format(nproc=self.nproc, config=t.config))
        return resolve_launcher(cmd) + (shlex.split(t.smoke_args) if smoke else [])

    def _env(self, worktree: Path, run_dir: Path, seed: int) -> dict:
        extra = {
            "RATCHET_RUN_DIR": str(run_dir),
            "RATCHET_SEED": str(seed),
            "RATCHET_TRAIN_DATA": str(self._train_data_view()),
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

    def _sandbox(self, cmd: list[str], worktree: Path, run_dir: Path, train: bool) -> list[str]:
        if not self.sandboxed:
            return cmd
        return sandbox.wrap(cmd, sandbox.SandboxSpec(
            worktree=worktree, run_dir=run_dir, train_data=self._train_data_view() if train else None,
            gpus=torch.cuda.is_available()))

    def _eval_wrap(self, worktree: Path, weights_dir: Path):
        """The evaluator's sandbox: it alone sees the validation data; the trusted `agent` package and the weights
        are read-only; it may write only its own scratch dir."""
        trusted = Path(agent_pkg.__file__).resolve().parent
        return lambda cmd, scratch: sandbox.wrap(cmd, sandbox.SandboxSpec(
            worktree=worktree, run_dir=scratch, extra_ro=[self.settings.data_dir.resolve(), trusted, weights_dir],
            gpus=torch.cuda.is_available()))

    def measure(self, arm: str, worktree: Path, run_dir: Path, seed: int, *, timeout: float,
                policy: AbortPolicy | None = None, smoke: bool = False) -> Measurement:
        s = self.settings
        self.check_data()
        expected = self.state.get("protected_hashes")
        if expected is not None:
            guard.check_integrity(worktree, s.paths.protected, expected)
        shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted run left (a final.pt) must not be evaluated
        run_dir.mkdir(parents=True)
        with self.device_lock:
            result: RunResult = run_training(
                self._sandbox(self._command(smoke), worktree, run_dir, train=True), cwd=worktree,
                env=self._env(worktree, run_dir, seed),
                log_path=run_dir / "train.log", timeout=timeout, monitor=policy,
                on_progress=lambda p: self.events.progress(arm, p))
        m = Measurement(arm=arm, seed=seed, status=result.status, seconds=result.seconds, reason=result.reason,
                        log=str(run_dir / "train.log"), curve=[asdict(p) for p in result.curve])
        if result.status == "ok":
            if expected is not None:
                guard.check_integrity(worktree, s.paths.protected, expected)
            weights = run_dir / "final.pt"
            if not weights.exists():
                m.status, m.reason = "crashed", "no final.pt written"
            else:
                with self.device_lock:
                    ev = evaluate(worktree, weights, s.data_dir, s.eval.tokens, s.eval.window, batch=s.eval.batch,
                                  probe_only=smoke, timeout=s.eval.timeout,
                                  wrap=self._eval_wrap(worktree, weights.parent) if self.sandboxed else None)
                if not ev["ok"]:
                    m.status = "probe" if ev.get("causal") is False else "eval"
                    m.reason = "causality probe failed" if m.status == "probe" else f"evaluation failed: {ev['error']}"
                elif not smoke:
                    m.val_loss, m.bits_per_byte = ev["val_loss"], ev["bits_per_byte"]
            weights.unlink(missing_ok=True)  # weights are big and never reused: no run can copy another's
        # compile caches (hundreds of MB per compiled run) are per run by design: nothing reads them again
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
        self.events.run_finished(m)
        return m

    # ------------------------------------------------------------------ baseline
    def baseline(self, force: bool = False, should_stop=lambda: False) -> dict:
        """Measure the incumbent [judge] baseline_runs times and set the target. `should_stop` is asked between
        runs: Stopped leaves no baseline (the next call measures it again)."""
        self.recover()
        if "baseline" in self.state and not force:
            return self.state["baseline"]
        s = self.settings
        head = self.ws.ensure_branch()
        exp_id, done = self._claim(f"baseline of {head}", head)
        runs = [Measurement(**entry) for entry in done]
        exp_dir = self.ledger.exp_dir(exp_id)
        self.events.experiment(exp_id, "baseline")
        if not runs:  # a resumed baseline keeps the data and hashes its finished runs were measured with
            self.check_data(new_baseline=True)
        wt = self.ws.add_worktree("incumbent", head)
        state = self.state
        state.update(protected_hashes=guard.protected_hashes(wt, s.paths.protected),
                     data_fingerprint=state.get("data_fingerprint") if runs else guard.data_fingerprint(s.data_dir))
        self.ledger.save_state(state)
        try:
            for i in range(len(runs), s.judge.baseline_runs):
                if len(runs) >= 2 and baseline_runs_needed(
                        [m.val_loss for m in runs], [m.seconds for m in runs], s.target.tolerance_sigmas,
                        s.target.min_tolerance, s.judge.min_speedup, s.judge.baseline_runs,
                        prior=self.noise_prior()) <= len(runs):
                    self.events.stage(f"baseline: {len(runs)} runs are enough at this noise")
                    break
                if should_stop():
                    raise Stopped()
                self.events.run_started(INCUMBENT, i, None)
                m = self.measure(INCUMBENT, wt, exp_dir / f"run-{i:02d}", seed=1 + i, timeout=s.train.first_timeout,
                                 policy=AbortPolicy())
                if not m.ok:
                    raise HarnessError(f"baseline run {i} failed: {m.status}: {m.reason} (log: {m.log})")
                self.ledger.add_to_journal(exp_id, asdict(m))
                runs.append(m)
        finally:
            self.ws.remove_worktree(wt)
        seconds = [m.seconds for m in runs]
        losses = [m.val_loss for m in runs]
        target = s.target.value if s.target.policy == "fixed" else target_from_baseline(
            losses, s.target.tolerance_sigmas, s.target.min_tolerance)
        baseline = {"commit": head, "seconds": seconds, "val_losses": losses, "target": target,
                    "curve": runs[-1].curve, "id": exp_id}
        state.update(baseline=baseline, incumbent={"commit": head, "seconds": seconds, "val_losses": losses,
                                                    "curve": runs[-1].curve})
        state.pop("inflight", None)
        reason = f"target {target:.4f}"
        if sum(losses) / len(losses) > target:  # only a fixed target can be missed by the baseline itself
            reason += (f"; WARNING: the baseline's own val loss {sum(losses) / len(losses):.4f} misses this fixed target, "
                       f"so only edits that also learn better can be accepted (too few train shards? a short config?)")
            self.events.stage(reason)
        self.ledger.append({
            "id": exp_id, "kind": "baseline", "parent": head, "proposer": "", "hypothesis": "baseline",
            "decision": "baseline", "reason": reason, "runs": [asdict(m) for m in runs],
            "incumbent_s": sum(seconds) / len(seconds), "val_loss": sum(losses) / len(losses), "target": target,
            "time": time.time(), "sandbox": self.sandbox_note})
        self.ledger.save_state(state)
        return baseline

    # ------------------------------------------------------------------ one experiment
    def experiment(self, text: str, proposer: str = "manual", kind: str = "try", extra: dict | None = None,
                   should_stop=lambda: False, calibrate: bool | None = None) -> list[dict]:
        """An edit through the judge, then, when its loss says a different length would win, up to
        [length] max_attempts calibrated variants (see agent/calibrate.py). Returns the ledger rows made by this call.

        extra["proposal_id"] (the loop's) makes this resumable: rows already in the ledger for that proposal, from a
        run that was killed half-way, are reused rather than re-run (a re-run would be rejected as a duplicate)."""
        calibrate = self.settings.length.calibrate if calibrate is None else calibrate
        pid = (extra or {}).get("proposal_id")
        earlier = [r for r in self.ledger.rows() if r.get("proposal_id") == pid] if pid else []
        noise = self._noise() if calibrate else None
        first = next((r for r in earlier if r["kind"] != "calibrate"), None)
        rows = [] if first else [self.try_edit(text, proposer, kind, extra, should_stop, calibrate_noise=noise)]
        if calibrate:
            done = {r["steps_after"]: r for r in earlier if r["kind"] == "calibrate"}
            rows += self._calibrate(text, first or rows[0], proposer, extra, should_stop, noise, done)
        return rows

    def _noise(self) -> float:
        """The seed-to-seed sd of the baseline's val loss (at least [target] min_tolerance)."""
        base = self.require_baseline()["baseline"]
        return max(float(np.std(base["val_losses"], ddof=1)), self.settings.target.min_tolerance)

    def _calibrate(self, text: str, row: dict, proposer: str, extra: dict | None, should_stop, noise: float,
                   done: dict) -> list[dict]:
        """Derived attempts at other lengths; `done`: attempts already in the ledger (by step count), reused."""
        L, base = self.settings.length, self.require_baseline()["baseline"]
        try:
            length = calibrate.read_length(self.ws.repo.git.show(f"{row['commit']}:{L.file}"), L.pattern, L.file) \
                if row.get("commit") else None
        except (calibrate.LengthError, git.GitCommandError) as e:  # no knob in this tree: nothing to calibrate
            self.events.stage(f"no calibration: {e}")
            return []
        if length is None:
            return []
        plan, why = calibrate.plan(row, length, base["target"], noise, self.settings.judge.min_speedup,
                                   L.min_fraction, L.max_fraction)
        if plan is None:
            return []
        self.events.stage(f"calibrating the length ({plan.direction}): {why}")
        rows, steps = [], plan.first
        for _ in range(L.max_attempts):
            r = done.get(steps) or self.try_edit(
                text, proposer, "calibrate", {**(extra or {}), "calibrates": row["id"], "steps_before": length,
                                              "steps_after": steps, "calibration": why},
                should_stop, length=steps, calibrate_noise=noise)
            if steps not in done:
                rows.append(r)
            if r["decision"] == "accepted" or not (r.get("verdict") or {}).get("val_loss_mean"):
                break
            plan.bracket.record(steps, met_target=r["verdict"]["val_loss_mean"] <= base["target"])
            steps = plan.bracket.next(steps)
            if steps is None:
                break
        return rows

    def try_edit(self, text: str, proposer: str = "manual", kind: str = "try", extra: dict | None = None,
                 should_stop=lambda: False, length: int | None = None, calibrate_noise: float | None = None) -> dict:
        """Take an edit (either format) through the whole pipeline; returns its ledger row.
        `length`: write this step count into the length knob after the edit (a calibrated variant).
        `calibrate_noise`: calibration follows, with this seed-to-seed noise; a clearly better edit that is not yet
        significantly faster stops at the judge's first look (see `_judge`).
        `should_stop` is asked between runs; when it says yes, Stopped is raised and the experiment stays in flight."""
        self.recover()
        self.require_baseline()
        self.check_data()
        parent = self.ws.head()
        exp_id, done = self._claim(experiment_key(kind, text, length), parent)
        state = self.state
        exp_dir = self.ledger.exp_dir(exp_id)
        (exp_dir / "edit.txt").write_text(text)
        row = {"id": exp_id, "kind": kind, "parent": parent, "proposer": proposer, "hypothesis": "", "rationale": "",
               "diff": "", "runs": [], "time": time.time(), "sandbox": self.sandbox_note, **(extra or {})}
        self.should_stop = should_stop
        try:
            edit = parse_edit(text)
        except EditError as e:
            return self._finish(row, exp_dir, None, "rejected", f"malformed edit: {e}", "edit")
        row.update(hypothesis=edit.hypothesis, rationale=edit.rationale)
        self.events.experiment(exp_id, edit.hypothesis)
        try:
            violation = guard.path_violation(edit.paths(), self.settings.paths.editable, self.settings.paths.protected)
        except EditError as e:
            return self._finish(row, exp_dir, None, "rejected", f"malformed edit: {e}", "edit")
        if violation:
            return self._finish(row, exp_dir, None, "rejected", violation, "guard")
        cand_wt = self.ws.add_worktree("candidate", parent)
        inc_wt = None
        try:
            try:
                changed = apply_edit(edit, cand_wt)
                if length is not None:
                    calibrate.set_length(cand_wt, self.settings.length.file, self.settings.length.pattern, length)
                    changed = [*changed, self.settings.length.file]
            except (EditError, calibrate.LengthError) as e:
                return self._finish(row, exp_dir, None, "rejected", f"edit does not apply: {e}", "edit")
            commit = self.ws.commit(cand_wt, edit.hypothesis or "ratchet edit")
            row["diff"] = self.ws.diff(commit)
            if not row["diff"].strip():
                return self._finish(row, exp_dir, cand_wt, "rejected", "no change", "edit")
            row["fingerprint"] = tree_fingerprint(self.snapshot(parent), cand_wt, changed)
            duplicate = self._duplicate_of(row["fingerprint"])
            if duplicate:
                return self._finish(row, exp_dir, cand_wt, "rejected", f"duplicate of experiment {duplicate['id']}",
                                    "edit")
            findings = policy.check_files(cand_wt, changed, old_root=self.snapshot(parent))
            row["policy"] = [asdict(f) for f in findings]
            if policy.rejecting(findings):
                return self._finish(row, exp_dir, cand_wt, "rejected",
                                    "policy: " + policy.format_findings(policy.rejecting(findings)), "policy")
            inc_wt = self.ws.add_worktree("incumbent", parent)
            decision, reason, verdict, stage = self._judge(cand_wt, inc_wt, exp_dir, row, state["incumbent"],
                                                           state["baseline"]["target"], calibrate_noise, done)
            row["verdict"] = verdict
            return self._finish(row, exp_dir, cand_wt, decision, reason, stage)
        except guard.IntegrityError as e:
            return self._finish(row, exp_dir, cand_wt, "rejected", str(e), "guard")
        finally:
            for wt in (cand_wt, inc_wt):
                if wt is not None:
                    self.ws.remove_worktree(wt)

    def _judge(self, cand_wt: Path, inc_wt: Path, exp_dir: Path, row: dict, incumbent: dict, target: float,
               calibrate_noise: float | None = None, done: tuple = ()):
        """Smoke run, then interleaved timed runs until the judge decides. -> (decision, reason, verdict dict, stage)
        `done`: the smoke and the timed runs this experiment finished before an interruption (its journal), in order;
        they are taken as measured and only the rest is run.

        With `calibrate_noise`, a candidate that clearly learns better (calibrate.beats) at the judge's first look
        but is not yet significantly faster is rejected there: it learns better than it needs to, so the runs are
        better spent on a shorter variant (calibration) than on proving a small speedup at full length. This
        only removes acceptances, so it cannot raise the judge's false-accept rate."""
        s = self.settings
        inc_seconds = sum(incumbent["seconds"]) / len(incumbent["seconds"])
        done = list(done)
        # smoke: a few untimed steps and the causality probe, before any timed run
        if done:
            smoke = Measurement(**done.pop(0))
            self.events.stage(f"resuming: the smoke run and {len(done)} timed runs were measured before")
        else:
            self.events.stage("smoke run")
            smoke = self.measure(CANDIDATE, cand_wt, exp_dir / "smoke", seed=0, smoke=True, policy=AbortPolicy(),
                                 timeout=s.train.timeout_factor * inc_seconds)
            if smoke.ok:
                self.ledger.add_to_journal(row["id"], asdict(smoke))
        row["smoke"] = asdict(smoke)
        if not smoke.ok:
            return "rejected", failure_reason(smoke), None, "smoke"
        row["order_seed"] = order_seed(self.ws.tag, row["id"])
        prior = self.noise_prior()
        row["prior"] = None if prior is None else {"var": prior.var, "df": prior.df}
        judge = Judge(self.judge_params(), target, row["order_seed"], prior)
        inc_curve = incumbent["curve"]
        for entry in done:
            m = Measurement(**entry)
            row["runs"].append(entry)
            judge.add(m.arm, m.seconds, m.val_loss)
            inc_curve = m.curve if m.arm == INCUMBENT else inc_curve
        index = len(done)
        while True:
            verdict = judge.verdict()
            if verdict.state != "continue":
                break
            # at min_pairs (a look with or without a prior), not after one block: there a calibrated variant that is
            # faster but not yet significant would be sent back to calibrate (seen in the slow tier)
            first_look = len(judge.runs) == 2 * judge.params.min_pairs
            if (first_look and calibrate_noise is not None and calibrate.beats(
                    verdict.val_loss_mean, target, [r["val_loss"] for r in row["runs"] if r["arm"] == INCUMBENT],
                    calibrate_noise)):
                return "rejected", (f"val loss {verdict.val_loss_mean:.4f} beats the target and the incumbent by more than the noise "
                                    f"and not significantly faster at the first look: calibrate"), asdict(verdict), "judge"
            if self.should_stop():
                raise Stopped()
            arm = judge.next_arm()
            pair = index // 2
            recent = [r for r in row["runs"] if r["arm"] == INCUMBENT] or None
            ref_seconds = sum(r["seconds"] for r in recent) / len(recent) if recent else inc_seconds
            timeout = s.train.timeout_factor * ref_seconds
            policy = AbortPolicy()  # the incumbent: NaN checks only
            screen = None
            if arm == CANDIDATE:
                policy = AbortPolicy(ref_seconds, _progress_list(inc_curve), pace_slack=s.abort.pace_slack,
                                     loss_slack=s.abort.loss_slack, min_fraction=s.abort.min_fraction)
                if not any(r["arm"] == CANDIDATE for r in row["runs"]):
                    # the first one is the screen's: it judges pace and loss against the incumbent's noise (after
                    # the NaN rule); later ones, and all when there is no screen, get the abort rules above
                    screen = self.screen(row, first=AbortPolicy())
                    policy = screen or policy
            self.events.run_started(arm, index, None)
            wt = cand_wt if arm == CANDIDATE else inc_wt
            # both arms of a pair share a seed: the pair differs only by the edit
            m = self.measure(arm, wt, exp_dir / f"run-{index:02d}-{arm}", seed=100 + pair, timeout=timeout, policy=policy)
            row["runs"].append(asdict(m))
            index += 1
            if not m.ok:
                if arm == CANDIDATE:
                    screened = screen is not None and m.reason.startswith(SCREEN_REASON)
                    if screened:
                        row["screen"] = screen.last
                    return "rejected", failure_reason(m), asdict(judge.verdict()), "screen" if screened else "run"
                raise HarnessError(f"the incumbent failed ({m.status}: {m.reason}); log: {m.log}")
            if arm == INCUMBENT:
                inc_curve = m.curve
            self.ledger.add_to_journal(row["id"], asdict(m))
            judge.add(arm, m.seconds, m.val_loss)
        return verdict.state, verdict.reason, asdict(verdict), "judge"

    # ------------------------------------------------------------------ the loop's entry points
    def run_proposal(self, proposal, made_on: str, should_stop=lambda: False, proposal_id: str = "") -> list[dict]:
        """One experiment from a proposer's Proposal; a failed proposal is recorded without running anything.
        proposal_id: the loop's id for it; a second call with the same id (a resume) finishes what the first left."""
        extra = {"key": proposal.key, "usage": asdict(proposal.usage), "attempts": proposal.attempts,
                 "proposed_on": made_on, "proposal_id": proposal_id}
        if proposal.error:
            return [self.record_failure(proposal, extra)]
        return self.experiment(proposal.text, proposer=proposal.proposer, kind="run", extra=extra, should_stop=should_stop)

    def record_failure(self, proposal, extra: dict) -> dict:
        self.recover()
        self._drop_inflight()
        row = {"id": self.ledger.next_id(), "kind": "run", "parent": self.ws.head(), "proposer": proposal.proposer,
               "hypothesis": proposal.hypothesis, "decision": "failed", "reason": f"proposer failed: {proposal.error}",
               "runs": [], "time": time.time(), **extra}
        self.ledger.append(row)
        self.events.decided(row)
        return row

    def _duplicate_of(self, fingerprint: str) -> dict | None:
        """The earlier experiment that made the same change (normalized: see edits.normalized_diff), if any."""
        return next((r for r in self.ledger.rows() if r.get("fingerprint") == fingerprint), None)

    def snapshot(self, head: str) -> Path:
        """A plain read-only copy of the tree at `head` (git archive: no git state shared with the main thread)."""
        path = self.ledger.dir / "snapshots" / head[:12]
        with self.snapshot_lock:  # the loop's proposer thread and the main thread may both ask for the same head
            if path.exists():
                return path
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            archive = subprocess.run(["git", "archive", "--format=tar", head], cwd=self.root, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
            tmp.rename(path)
        return path

    def context(self, head: str, pending: list[dict] = ()):
        """What a proposer sees: editable files, the incumbent's numbers, the hardware, the rules, the history, and
        `pending`: proposals queued or training now ({"key", "hypothesis"}), not in the history yet."""
        from agent.propose.base import Context
        from agent.propose.rules import hardware_summary, rules_text
        s = self.settings
        tree = self.snapshot(head)
        files = {}
        for path in sorted(tree.rglob("*")):
            rel = path.relative_to(tree).as_posix()
            if path.is_file() and guard.matches(rel, s.paths.editable) and not guard.matches(rel, s.paths.protected):
                files[rel] = path.read_text(errors="replace")
        state = self.state
        inc = state.get("incumbent", {})
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        incumbent = {"commit": head, "seconds": mean(inc.get("seconds", [])), "val_loss": mean(inc.get("val_losses", [])),
                     "target": state.get("baseline", {}).get("target"), "curve": inc.get("curve", [])[-5:],
                     "baseline_seconds": mean(state.get("baseline", {}).get("seconds", []))}
        history = [{k: r.get(k) for k in ("id", "key", "hypothesis", "decision", "reason", "speedup", "val_loss")}
                   | ({"diff": r.get("diff", "")} if r.get("decision") == "accepted" else {})
                   | ({"policy_flags": [f["message"] for f in r["policy"]]} if r.get("policy") else {})
                   for r in self.ledger.rows() if r["kind"] in ("try", "run", "calibrate")]
        return Context(root=str(tree), editable=s.paths.editable, protected=s.paths.protected, files=files,
                       incumbent=incumbent, hardware=hardware_summary(self.nproc), history=history,
                       rules=rules_text(s), pending=list(pending), smoke=lambda text: self.smoke_check(text, head))

    def smoke_check(self, text: str, head: str):
        """For proposers: apply an edit to a scratch copy of `head` and run the smoke command (waits for the devices)."""
        from agent.propose.base import SmokeResult
        scratch = self.ledger.dir / "scratch" / f"{threading.get_ident()}"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(self.snapshot(head), scratch)
        try:
            edit = parse_edit(text)
            violation = guard.path_violation(edit.paths(), self.settings.paths.editable, self.settings.paths.protected)
            if violation:
                return SmokeResult(False, violation)
            duplicate = self._duplicate_of(tree_fingerprint(self.snapshot(head), scratch, apply_edit(edit, scratch)))
            if duplicate:  # the harness would reject it without a run: say so now, while the proposer can still act
                return SmokeResult(False, f"duplicate of experiment {duplicate['id']} "
                                          f"({duplicate.get('hypothesis', '')}): propose a different change")
            (scratch / "run").mkdir()
            with self.device_lock:
                result = run_training(self._sandbox(self._command(smoke=True), scratch, scratch / "run", train=True),
                                      cwd=scratch, env=self._env(scratch, scratch / "run", 0),
                                      log_path=scratch / "smoke.log", timeout=self.settings.train.first_timeout)
            tail = "\n".join(Path(result.log_path).read_text(errors="replace").splitlines()[-30:])
            return SmokeResult(result.status == "ok", tail if result.status != "ok" else "smoke run passed")
        except EditError as e:
            return SmokeResult(False, f"edit does not apply: {e}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # ------------------------------------------------------------------ replay
    def replay(self, revs: list[str], onto: str | None = None) -> list[dict]:
        """Re-measure each commit against its parent with a fresh judge; with `onto`, first cherry-pick the
        commits in order onto that base and verify each against the one before it."""
        self.recover()
        state = self.require_baseline()
        commits = [self.ws.resolve(r) for r in revs]
        base_wt = None
        if onto is not None:
            base_wt = self.ws.add_worktree("replay-onto", self.ws.resolve(onto))
        rows = []
        try:
            for original in commits:
                if base_wt is not None:
                    parent = self.ws.resolve_in(base_wt, "HEAD")
                    commit = self.ws.cherry_pick(base_wt, original)
                else:
                    parent, commit = self.ws.parent(original), original
                rows.append(self._replay_one(original, parent, commit, state))
            if base_wt is not None and rows:
                self.ws.repo.git.update_ref(f"refs/ratchet/{self.ws.tag}/replayed", rows[-1]["commit"])
        finally:
            if base_wt is not None:
                self.ws.remove_worktree(base_wt)
        return rows

    def _replay_one(self, original: str, parent: str, commit: str, state: dict) -> dict:
        exp_id, done = self._claim(f"replay:{original}", parent)
        exp_dir = self.ledger.exp_dir(exp_id)
        message = self.ws.message(original)
        row = {"id": exp_id, "kind": "replay", "parent": parent, "commit": commit, "replay_of": original,
               "proposer": trailers(message).get("Ratchet-Proposer", ""), "hypothesis": message.splitlines()[0],
               "recorded_speedup": recorded_speedup(message), "diff": self.ws.diff(commit), "runs": [],
               "time": time.time()}
        self.events.experiment(exp_id, f"replay {original[:10]}: {row['hypothesis']}")
        cand_wt = self.ws.add_worktree("candidate", commit)
        inc_wt = self.ws.add_worktree("incumbent", parent)
        # the parent may be any commit since the baseline: until its first run, assume the slowest known time
        reference = max(state["baseline"], state["incumbent"], key=lambda x: sum(x["seconds"]) / len(x["seconds"]))
        try:
            decision, reason, verdict, row["stage"] = self._judge(cand_wt, inc_wt, exp_dir, row, reference,
                                                                  state["baseline"]["target"], done=done)
        finally:
            self.ws.remove_worktree(cand_wt)
            self.ws.remove_worktree(inc_wt)
        row["verdict"] = verdict
        record_decision(row, "reproduced" if decision == "accepted" else "not reproduced", reason)
        self.ledger.append(row)
        self._drop_inflight()
        self.events.decided(row)
        return row

    # ------------------------------------------------------------------ decision -> git + ledger
    def _finish(self, row: dict, exp_dir: Path, cand_wt: Path | None, decision: str, reason: str, stage: str) -> dict:
        """`stage`: what decided: edit, guard, policy, smoke, screen, run (a candidate run failed), judge."""
        record_decision(row, decision, reason)
        row["stage"] = stage
        if cand_wt is not None:
            row["commit"] = self.ws.amend_message(cand_wt, commit_message(row, self.ws.tag))
        self.ledger.write_json(exp_dir / "result.json", row)  # the point of no return: recover() finishes from here
        self._publish(row)
        self.events.decided(row)
        return row

    def _publish(self, row: dict) -> None:
        """Move git and the ledger to match a saved decision. Idempotent: recover() calls it again after a crash."""
        commit = row.get("commit")
        if commit and row["decision"] == "accepted":
            if self.ws.head() == row["parent"]:
                self.ws.advance(commit, row["parent"])
        elif commit:
            row["ref"] = self.ws.keep_rejected(row["id"], commit)
        if self.ledger.row(row["id"]) is None:
            self.ledger.append(row)
        state = self.state
        if row["decision"] == "accepted":
            cand = [r for r in row["runs"] if r["arm"] == CANDIDATE]
            state["incumbent"] = {"commit": commit, "seconds": [r["seconds"] for r in cand],
                                  "val_losses": [r["val_loss"] for r in cand], "curve": cand[-1]["curve"]}
        state.pop("inflight", None)
        self.ledger.save_state(state)

    def recover(self) -> None:
        """After a crash or kill -9: kill its orphaned runs and finish a saved decision. An experiment interrupted
        before its decision stays in flight with the runs it finished (its journal): `_claim` resumes it when the
        same experiment is asked for again and discards it when another is."""
        kill_leftovers(str(self.ledger.dir) + "/")
        inflight = self.state.get("inflight")
        if inflight:
            result = self.ledger.exp_dir(inflight["id"]) / "result.json"
            if result.exists():
                self._publish(json.loads(result.read_text()))
        self.ws.remove_all_worktrees()

    def _drop_inflight(self) -> None:
        """Forget the experiment in flight; its folder goes too unless the ledger already has its row."""
        state = self.state
        inflight = state.pop("inflight", None)
        if inflight is None:
            return
        if self.ledger.row(inflight["id"]) is None:
            shutil.rmtree(self.ledger.exp_dir(inflight["id"]), ignore_errors=True)
        self.ledger.save_state(state)

    def _claim(self, key: str, parent: str) -> tuple[str, list]:
        """(id, finished runs) of the experiment `key` on `parent`, now in flight: the interrupted one when it is
        the same experiment (its runs as recorded in its journal), else a new one (an interrupted other is dropped)."""
        inflight = self.state.get("inflight")
        if inflight and inflight.get("key") == key and inflight["parent"] == parent:
            return inflight["id"], self.ledger.journal(inflight["id"])
        self._drop_inflight()
        state = self.state
        exp_id = self.ledger.next_id()
        self.ledger.exp_dir(exp_id).mkdir(parents=True, exist_ok=True)
        state["inflight"] = {"id": exp_id, "parent": parent, "key": key}
        self.ledger.save_state(state)
        return exp_id, []


def experiment_key(kind: str, text: str, length: int | None) -> str:
    """What makes two requests the same experiment, for resume: the edit's text, its kind and calibrated length."""
    return f"{kind}:{length}:" + hashlib.sha256(text.encode()).hexdigest()


def order_seed(tag: str, exp_id: str) -> int:
    """The seed of an experiment's run order (the judge's coin flip per block): fixed per experiment, so a resume
    re-runs the same order, and unrelated to anything the machine does (see agent/judge.py, Order)."""
    return zlib.crc32(f"{tag}/{exp_id}".encode())


def _progress_list(curve: list[dict]) -> list[Progress]:
    return [Progress(**p) for p in curve]


def record_decision(row: dict, decision: str, reason: str) -> None:
    """Decision, reason, and the verdict's headline numbers as top-level ledger fields."""
    v = row.get("verdict") or {}
    row.update(decision=decision, reason=reason, speedup=v.get("speedup"), candidate_s=v.get("candidate_mean"),
               incumbent_s=v.get("incumbent_mean"), p_value=v.get("p_value"), val_loss=v.get("val_loss_mean"),
               target=v.get("target_val_loss"))


def failure_reason(m: Measurement) -> str:
    if m.status == "crashed":
        return f"crashed ({m.reason})"
    if m.status == "timeout":
        return f"timed out after {m.seconds:.0f}s"
    return m.reason  # aborted (slower, NaN, loss), probe, evaluation: the reason says it all


def commit_message(row: dict, tag: str) -> str:
    """The contract's commit message: hypothesis, rationale, then Ratchet-* trailers with the evidence."""
    lines = [row.get("hypothesis") or "ratchet edit", ""]
    if row.get("rationale"):
        lines += [row["rationale"].strip(), ""]
    if row.get("calibrates"):
        lines += [f"Step calibration: the edit of experiment {row['calibrates']} with the length moved from "
                  f"{row['steps_before']} to {row['steps_after']} steps ({row['calibration']}).", ""]
    lines.append(f"Ratchet-Experiment: {tag}/{row['id']}")
    if row.get("calibrates"):
        lines.append(f"Ratchet-Calibrated: steps {row['steps_before']} -> {row['steps_after']} (from {tag}/{row['calibrates']})")
    if row.get("candidate_s") is not None and row.get("incumbent_s") is not None:
        change = row["candidate_s"] / row["incumbent_s"] - 1
        p = "n/a" if row.get("p_value") is None else f"{row['p_value']:.2g}"
        n = (row.get("verdict") or {}).get("n_pairs", 0)
        lines.append(f"Ratchet-Wall-Clock: {row['candidate_s']:.2f}s vs {row['incumbent_s']:.2f}s "
                     f"({change:+.1%}, n={n}, p={p})")
    if row.get("val_loss") is not None:
        lines.append(f"Ratchet-Val-Loss: {row['val_loss']:.4f} (target {row['target']:.4f})")
    lines.append(f"Ratchet-Proposer: {row.get('proposer') or 'manual'}")
    if row["decision"] != "accepted":
        lines.append(f"Ratchet-Decision: {row['decision']}: {row['reason']}".splitlines()[0])
    return "\n".join(lines) + "\n"


def recorded_speedup(message: str) -> float | None:
    """The speedup a commit's Ratchet-Wall-Clock trailer claims, for replay."""
    wall = trailers(message).get("Ratchet-Wall-Clock")
    if not wall:
        return None
    cand, inc = wall.split(" vs ")
    return 1 - float(cand.rstrip("s")) / float(inc.split("s")[0])
