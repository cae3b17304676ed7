"""One experiment, end to end: edit -> worktree -> guard -> opening -> timed runs + evaluator -> judge -> git + ledger.

Trust boundaries, in the order an edit crosses them:
  1. integrity.path_violation: the edit may touch only editable, unprotected paths (before anything runs)
  2. policy.check_files: AST rules on the edited files reject timer/library patches, processes, network, foreign reads
  3. integrity.check_integrity: protected files in the worktree equal their baseline hashes (before every run and evaluation)
  4. sandbox.wrap (measure.devices): runs execute under bubblewrap, no network, only their run dir writable, no
     validation data mounted; every child's environment comes from child_env.child_env: no secrets
  5. runner.run_training: the training process is timed from outside, as a whole process group
  6. evaluate.evaluate: val loss and the causality probe come from a separate process that owns the val data
  7. judge.Judge: interleaved runs and a one-sided test decide; a failed run is a rejection with its reason, never a number
The harness composes the stages: the comparison (agent/comparison.py) runs the opening run and the timed runs
until the judge decides, the devices (agent/measure/devices.py) launch runs, the records
(agent/records/experiments.py) say what is in flight and land decisions crash-safely, the proposer services
(agent/proposer_services.py) serve the loop's proposer thread. Built on it: an edit and its calibrated variants
(agent/experiment.py), the baseline (agent/baseline.py), replay (agent/replay.py).
"""
import time
from dataclasses import asdict
from pathlib import Path

from agent import settings as settings_mod
from agent.comparison import Comparison, HarnessError
from agent.edit.apply import apply_edit
from agent.edit.fingerprint import tree_fingerprint
from agent.edit.parse import EditError, parse_edit
from agent.edit.workspace import Workspace
from agent.guard import integrity, policy
from agent.measure.devices import Devices, Measurement
from agent.measure.runner import AbortPolicy
from agent.proposer_services import ProposerServices
from agent.records.experiments import Experiments, TagBusy, experiment_key
from agent.records.ledger import Ledger
from agent.records.types import Decision, Experiment, Stage
from agent.settings import Settings
from agent.verdict import history
from agent.verdict.judge import JudgeParams, NoisePrior
from agent.verdict.screen import ScreenMonitor


class Events:
    """What the harness reports while it works; the CLI's live view overrides these."""
    def experiment(self, exp_id: str, hypothesis: str): pass
    def stage(self, text: str): pass
    def run_started(self, arm: str, index: int, total_steps_hint: int | None): pass
    def progress(self, arm: str, p): pass
    def run_finished(self, m: Measurement): pass
    def decided(self, row: dict): pass


class Harness:
    def __init__(self, root: Path, settings: Settings, tag: str, events: Events | None = None,
                 require_sandbox: bool = False):
        self.root = Path(root)
        self.settings = settings
        self.ws = Workspace(self.root, tag)
        self.ledger = Ledger(self.root / "runs" / tag)
        self.events = events or Events()
        self.devices = Devices(settings, self.ledger.dir, require_sandbox)
        self.records = Experiments(self.ledger, self.ws)
        self.services = ProposerServices(self.root, settings, self.ledger, self.devices)
        self._data_verified = False  # the dataset's full check (every sha256) runs once per process

    def lock(self) -> None:
        """One Ratchet process per tag (records.lock), as a setup error when another holds it."""
        try:
            self.records.lock()
        except TagBusy as e:
            raise HarnessError(str(e)) from None

    def recover(self) -> None:
        """After a crash or kill -9: kill its orphaned runs and finish a saved decision (records.recover)."""
        self.devices.kill_leftovers()
        self.records.recover()

    # what the loop's proposer thread is offered (agent/proposer_services.py)
    def context(self, head: str, pending: list[dict] = (), night=None):
        """What a proposer sees (ProposerServices.context); `night`: the loop's budgets (evidence.Night)."""
        return self.services.context(head, pending, self.judge_params(), self.settings.judge.use_history, night)

    def profile_incumbent(self):
        """The incumbent's profile for proposers, made now if missing (after the baseline, after an accept)."""
        return self.services.incumbent_profile(self.ws.head())

    def smoke_check(self, text: str, head: str):
        return self.services.smoke_check(text, head)

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> dict:
        return self.ledger.load_state()

    def require_baseline(self) -> dict:
        """The tag's state, with a baseline measured under the settings in force now (settings.run_definition; a
        tag from before that record is taken as it is)."""
        state, tag = self.state, self.ws.tag
        if "baseline" not in state:
            raise HarnessError(f"no baseline for tag {tag!r}: run `ratchet baseline --tag {tag}` first")
        now = settings_mod.run_definition(self.settings)
        changed = [f"{key} {was!r} -> {now.get(key)!r}" for key, was in state.get("run_definition", {}).items()
                   if now.get(key) != was]
        if changed:
            raise HarnessError(f"{settings_mod.FILENAME} changed since tag {tag!r}'s baseline ({'; '.join(changed)}): "
                               f"its times and target hold only for the settings they were measured with; restore "
                               f"them, or use a new --tag")
        return state

    def check_data(self, new_baseline: bool = False) -> None:
        """The dataset is the one the baseline measured: every file's sha256 once per process (a resume, a new
        command), the fingerprint (sizes, the manifest's hash) before every run. A change is a broken setup, not a
        verdict: HarnessError naming the file, and the experiment in flight stays unrecorded.
        `new_baseline`: the full check only; the baseline about to be measured pins the data as it is now."""
        try:
            if not self._data_verified or new_baseline:
                integrity.verify_data(self.settings.data_dir)
                self._data_verified = True
            expected = self.state.get("data_fingerprint")
            if expected is not None and not new_baseline:
                integrity.check_data(self.settings.data_dir, expected)
        except integrity.IntegrityError as e:
            raise HarnessError(f"{e}: the dataset is not the one the baseline measured; restore it, or measure a new "
                               f"baseline under a new tag") from None

    def judge_params(self) -> JudgeParams:
        return settings_mod.judge_params(self.settings)

    def noise_prior(self) -> NoisePrior | None:
        """The run-time noise of every experiment of the tag so far, for the judge ([judge] use_history)."""
        return history.noise_prior(self.ledger.rows()) if self.settings.judge.use_history else None

    def screen(self, row: dict, first: AbortPolicy, until: float = 1.0) -> ScreenMonitor | None:
        """The monitor of the candidate's screen run or first timed run in experiment `row`
        (history.screen_reference), with `first` asked before it and stopping the run at `until` of its steps; None
        when [screen] is off or no reference can be made."""
        if not self.settings.screen.enabled:
            return None
        params = settings_mod.screen_params(self.settings)
        try:
            reference = history.screen_reference(self.ledger.rows(), row, params, self.settings.screen.recent_max_age)
        except ValueError as e:
            self.events.stage(f"no screen: {e}")
            return None
        return None if reference is None else ScreenMonitor(reference, params, first=first, until=until)

    # ------------------------------------------------------------------ one run
    def measure(self, arm: str, worktree: Path, run_dir: Path, seed: int, *, timeout: float,
                policy: AbortPolicy | None = None, smoke: bool = False) -> Measurement:
        """One run on the devices, with the dataset and the protected files checked before it trains and before
        it is evaluated."""
        expected = self.state.get("protected_hashes")

        def check():
            self.check_data()
            if expected is not None:
                integrity.check_integrity(worktree, self.settings.paths.protected, expected)

        m = self.devices.measure(arm, worktree, run_dir, seed, timeout=timeout, policy=policy, smoke=smoke,
                                 check=check, on_progress=lambda p: self.events.progress(arm, p))
        self.events.run_finished(m)
        return m

    # ------------------------------------------------------------------ one edit
    def try_edit(self, text: str, proposer: str = "manual", kind: str = "try", extra: dict | None = None,
                 should_stop=lambda: False, calibrate_noise: float | None = None) -> dict:
        """Take an edit (either format) through the whole pipeline; returns its ledger row.
        `calibrate_noise`: calibration follows, with this seed-to-seed noise; a clearly better edit that is not yet
        significantly faster may stop at the judge's first look (Judge's learns_better_noise).
        `should_stop` is asked between runs; when it says yes, Stopped is raised and the experiment stays in flight."""
        self.recover()
        self.require_baseline()
        self.check_data()
        parent = self.ws.head()
        exp_id, done = self.records.claim(experiment_key(kind, text), parent)
        state = self.state
        (self.ledger.exp_dir(exp_id) / "edit.txt").write_text(text)
        exp = Experiment(exp_id, kind, parent, time.time(), proposer, sandbox=self.devices.sandbox_note,
                         extra=dict(extra or {}))
        try:
            edit = parse_edit(text)
        except EditError as e:
            return self._finish(exp, None, Decision.REJECTED, f"malformed edit: {e}", Stage.EDIT)
        exp.hypothesis, exp.rationale = edit.hypothesis, edit.rationale
        self.events.experiment(exp_id, edit.hypothesis)
        try:
            violation = integrity.path_violation(edit.paths(), self.settings.paths.editable, self.settings.paths.protected)
        except EditError as e:
            return self._finish(exp, None, Decision.REJECTED, f"malformed edit: {e}", Stage.EDIT)
        if violation:
            return self._finish(exp, None, Decision.REJECTED, violation, Stage.GUARD)
        cand_wt = self.ws.add_worktree("candidate", parent)
        inc_wt = None
        try:
            try:
                changed = apply_edit(edit, cand_wt)
            except EditError as e:
                return self._finish(exp, None, Decision.REJECTED, f"edit does not apply: {e}", Stage.EDIT)
            commit = self.ws.commit(cand_wt, edit.hypothesis or "ratchet edit")
            exp.diff = self.ws.diff(commit)
            if not exp.diff.strip():
                return self._finish(exp, cand_wt, Decision.REJECTED, "no change", Stage.EDIT)
            exp.fingerprint = tree_fingerprint(self.services.snapshot(parent), cand_wt, changed)
            duplicate = self.services.duplicate_of(exp.fingerprint)
            if duplicate:
                return self._finish(exp, cand_wt, Decision.REJECTED, f"duplicate of experiment {duplicate['id']}",
                                    Stage.EDIT)
            findings = policy.check_files(cand_wt, changed, old_root=self.services.snapshot(parent))
            exp.policy = [asdict(f) for f in findings]
            if policy.rejecting(findings):
                return self._finish(exp, cand_wt, Decision.REJECTED,
                                    "policy: " + policy.format_findings(policy.rejecting(findings)), Stage.POLICY)
            inc_wt = self.ws.add_worktree("incumbent", parent)
            comparison = Comparison(self, exp, cand_wt, inc_wt, state["incumbent"], state["baseline"]["target"],
                                    calibrate_noise, should_stop)
            decision, reason, exp.verdict, stage = comparison.run(done)
            return self._finish(exp, cand_wt, decision, reason, stage)
        except integrity.IntegrityError as e:
            return self._finish(exp, cand_wt, Decision.REJECTED, str(e), Stage.GUARD)
        finally:
            for wt in (cand_wt, inc_wt):
                if wt is not None:
                    self.ws.remove_worktree(wt)

    def _finish(self, exp: Experiment, cand_wt: Path | None, decision: Decision, reason: str, stage: Stage) -> dict:
        row = self.records.finish(exp, cand_wt, decision, reason, stage)
        self.events.decided(row)
        return row

