"""What the harness offers proposers, on the loop's background thread: a read-only snapshot of a commit's tree, the
context a proposer sees (the files, the evidence, the history, known ideas, its notes), and the services its tools
call: a smoke check or a profile of an edit before it is queued (both wait for the devices), and one experiment
in full.

Trust: the logs, summary blocks and profiles shown here come from candidate or incumbent code. They are shown to
the model as information (marked self-reported where the training printed them) and decide nothing.
"""
import contextlib
import shutil
import subprocess
import threading
from pathlib import Path

from agent.edit.apply import dry_run
from agent.evidence import Night, evidence
from agent.edit.fingerprint import tree_fingerprint
from agent.edit.parse import EditError, parse_edit
from agent.guard import integrity
from agent.measure.devices import Devices
from agent.measure.runner import RunnerError
from agent.measure.profile import PROFILE_FILE, ProfileError, ProfileRun, read_profile
from agent.guard.redaction import redact
from agent.propose.base import Context, SmokeResult
from agent.propose.catalog import hints
from agent.propose.history_text import experiment_detail
from agent.propose.rules import hardware_summary, rules_text
from agent.records.ledger import Ledger
from agent.records.types import Arm
from agent.settings import Settings
from agent.verdict.history import noise_prior
from agent.verdict.judge import CANDIDATE, JudgeParams


EXPERIMENT_KINDS = ("try", "run", "calibrate")  # ledger rows the model sees (not baseline or replay rows)
CURVE_POINTS = 20  # a loss curve shown to the model: about this many points
FAILED_LOG_LINES = 60  # a failed run's log shown to the model: torchrun's own report of a failure fills ~35 lines
PROFILE = "Profile of the incumbent"  # the evidence section holding the incumbent's profile (self-reported)


def _log_tail(path: Path, lines: int) -> list[str]:
    """The last lines of a run's log, with anything that looks like a secret redacted; [] without a log."""
    try:
        return redact(path.read_text(errors="replace")).splitlines()[-lines:]
    except OSError:
        return []


def summary_block(lines: list[str]) -> list[str]:
    """The lines after the training's last '---' (its fixed summary block), or none."""
    marks = [i for i, line in enumerate(lines) if line.strip() == "---"]
    return lines[marks[-1] + 1:] if marks else ["(no summary block in the log)"]


class ProposerServices:
    def __init__(self, root: Path, settings: Settings, ledger: Ledger, devices: Devices):
        self.root, self.settings, self.ledger, self.devices = Path(root), settings, ledger, devices
        self.snapshot_lock = threading.Lock()
        self.profile_lock = threading.Lock()  # the main thread (after an accept) and a profile tool call may both ask

    def duplicate_of(self, fingerprint: str) -> dict | None:
        """The earlier experiment that made the same change (normalized: see patch.normalized_diff), if any."""
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
            archive = subprocess.run(["git", "archive", "--format=tar", head], cwd=self.root, capture_output=True,
                                     check=True)
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
            tmp.rename(path)
        return path

    def context(self, head: str, pending: list[dict] = (), params: JudgeParams | None = None,
                use_history: bool = True, night: Night | None = None) -> Context:
        """What a proposer sees: editable files, the incumbent's numbers and the evidence on them (`params` and, with
        `use_history`, the noise prior: the judge's, for what it can detect; `night`: the loop's budgets), the
        hardware, the rules, the history, known
        ideas, its notes, and `pending`: proposals queued or training now ({"key", "hypothesis"}), not in the
        history yet."""
        s = self.settings
        tree = self.snapshot(head)
        files = {}
        for path in sorted(tree.rglob("*")):
            rel = path.relative_to(tree).as_posix()
            if path.is_file() and integrity.matches(rel, s.paths.editable) and not integrity.matches(rel, s.paths.protected):
                files[rel] = path.read_text(errors="replace")
        state = self.ledger.load_state()
        incumbent = {"commit": head}
        if "incumbent" in state:  # before the baseline there is none
            inc, base = Arm.from_state(state["incumbent"]), Arm.from_state(state["baseline"])
            incumbent |= {"seconds": inc.mean_seconds, "runs": len(inc.seconds), "val_loss": inc.mean_val_loss,
                          "target": state["baseline"]["target"], "baseline_seconds": base.mean_seconds}
        rows = self.ledger.rows()
        found = {}
        if "incumbent" in state and params is not None:
            prior = noise_prior(rows) if use_history else None
            found = evidence(rows, state, params, prior, self.devices.nproc, night)
            if profile := self.incumbent_profile(head, run=False):
                found = {**found, PROFILE: profile.text}
        history = [self.view(r) for r in rows if r["kind"] in EXPERIMENT_KINDS]
        notes = [r["notes"] for r in rows if r.get("notes")]
        hardware = hardware_summary(self.devices.nproc)
        return Context(root=str(tree), editable=s.paths.editable, protected=s.paths.protected, files=files,
                       incumbent=incumbent, hardware=hardware, history=history,
                       rules=rules_text(s), pending=list(pending), smoke=lambda text: self.smoke_check(text, head),
                       evidence=found, hints=hints(history, hardware), notes=notes,
                       show_experiment=self.show_experiment, profile=lambda text: self.profile_check(text, head))

    def view(self, row: dict, log_lines: int = 3) -> dict:
        """A ledger row as the model sees it (agent/propose/history_text.py): the evidence behind its decision, with
        the end of the failed run's log when one failed; accepted rows keep their diff."""
        keep = ("id", "kind", "key", "hypothesis", "decision", "stage", "reason", "proposer", "calibrates",
                "steps_before", "steps_after", "verdict", "speedup", "val_loss", "target", "notes")
        view = {k: row.get(k) for k in keep if row.get(k) is not None}
        if row.get("decision") == "accepted":
            view["diff"] = row.get("diff", "")
        failed = [m for m in [row.get("smoke") or {}, *row.get("runs", [])] if m.get("status") not in (None, "ok")]
        if failed and failed[-1].get("log"):
            view["log_tail"] = _log_tail(Path(failed[-1]["log"]), log_lines)
        return view

    def show_experiment(self, exp_id: str) -> str:
        """The show_experiment tool: one experiment in full (its diff, rejected ones included, runs, curve, log)."""
        row = self.ledger.row(exp_id.strip()) or self.ledger.row(exp_id.strip().zfill(4))
        if row is None or row["kind"] not in EXPERIMENT_KINDS:
            raise ValueError(f"no experiment {exp_id!r}; the ids are those the history lists")
        view = self.view(row, log_lines=30) | {"diff": row.get("diff", ""), "runs": row.get("runs", [])}
        candidate = [m for m in row.get("runs", []) if m.get("arm") == CANDIDATE and m.get("curve")]
        if candidate:
            curve = candidate[-1]["curve"]
            view["curve"] = [(p["step"], p["loss"]) for p in curve[::max(1, len(curve) // CURVE_POINTS)]]
        return experiment_detail(view)

    @contextlib.contextmanager
    def _scratch(self, text: str, head: str):
        """A scratch copy of `head` with the edit applied (an empty edit: the incumbent as it is), removed after
        use. EditError when the edit does not parse, touches a path it may not, does not apply, or was tried."""
        tree = self.snapshot(head)
        scratch = self.ledger.dir / "scratch" / f"{threading.get_ident()}"
        shutil.rmtree(scratch, ignore_errors=True)  # left over by a run that was killed
        try:
            if not text.strip():
                shutil.copytree(tree, scratch)
            else:
                edit = parse_edit(text)
                violation = integrity.path_violation(edit.paths(), self.settings.paths.editable,
                                                     self.settings.paths.protected)
                if violation:
                    raise EditError(violation)
                try:
                    changed = dry_run(edit, tree, scratch)
                except EditError as e:
                    raise EditError(f"edit does not apply: {e}") from e
                duplicate = self.duplicate_of(tree_fingerprint(tree, scratch, changed))
                if duplicate:  # the harness would reject it without a run: say so while the proposer can still act
                    raise EditError(f"duplicate of experiment {duplicate['id']} ({duplicate.get('hypothesis', '')}): "
                                    "propose a different change")
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def smoke_check(self, text: str, head: str) -> SmokeResult:
        """For proposers: the edit on a scratch copy of `head`, then the smoke command there (waits for the
        devices); on success the training's summary block, on failure the end of its log."""
        try:
            with self._scratch(text, head) as scratch:
                result = self.devices.smoke(scratch, scratch / "run", scratch / "smoke.log")
                lines = _log_tail(Path(result.log_path), FAILED_LOG_LINES)
        except EditError as e:
            return SmokeResult(False, str(e))
        if result.status != "ok":
            return SmokeResult(False, "\n".join(lines))
        return SmokeResult(True, "smoke run passed; its summary block (self-reported by the training):\n"
                                 + "\n".join(summary_block(lines)))

    def profile_check(self, text: str, head: str) -> str:
        """The profile tool: the edit profiled on a scratch copy of `head` (waits for the devices), beside the
        incumbent's profile; an empty edit: the incumbent's own. ValueError (a tool error) when the edit is bad."""
        incumbent = self.incumbent_profile(head)
        if not text.strip():
            return incumbent.text
        try:
            with self._scratch(text, head) as scratch:
                return self.devices.profile(scratch, scratch / "profile", incumbent=incumbent.profile).text
        except EditError as e:
            raise ValueError(str(e)) from e

    def incumbent_profile(self, head: str, run: bool = True) -> ProfileRun | None:
        """The profile of the tree at `head`, kept in runs/<tag>/profiles/<commit>/; made when missing (a short run
        that waits for the devices) unless run=False, which then answers None. The loop makes it after the
        baseline and after each accept, so a proposer reads it without waiting."""
        with self.profile_lock:
            return self._incumbent_profile(head, run)

    def _incumbent_profile(self, head: str, run: bool) -> ProfileRun | None:
        run_dir = self.ledger.dir / "profiles" / head[:12]
        summary = run_dir / "summary.txt"
        if summary.exists():
            try:
                profile = read_profile(run_dir / PROFILE_FILE)
            except ProfileError:
                profile = None  # a failed profile keeps its reason in summary.txt
            return ProfileRun(profile is not None, summary.read_text(), profile)
        if not run:
            return None
        try:
            with self._scratch("", head) as scratch:  # not the snapshot itself: the run would write into it
                outcome = self.devices.profile(scratch, run_dir)
        except (ProfileError, RunnerError) as e:  # a training command it cannot wrap, or launch: said, not retried
            outcome = ProfileRun(False, f"no profile: {e}", None)
            run_dir.mkdir(parents=True, exist_ok=True)
        partial = summary.with_suffix(".tmp")  # a kill -9 while writing leaves no half summary to be read back
        partial.write_text(outcome.text)
        partial.replace(summary)
        return outcome
