"""What the harness offers proposers, on the loop's background thread: a read-only snapshot of a commit's tree, the
context a proposer sees, and a smoke check of an edit before it is queued (it waits for the devices).
"""
import shutil
import subprocess
import threading
from pathlib import Path

from agent.edit.apply import dry_run
from agent.edit.fingerprint import tree_fingerprint
from agent.edit.parse import EditError, parse_edit
from agent.guard import integrity
from agent.measure.devices import Devices
from agent.propose.base import Context, SmokeResult
from agent.propose.rules import hardware_summary, rules_text
from agent.records.ledger import Ledger
from agent.settings import Settings


class ProposerServices:
    def __init__(self, root: Path, settings: Settings, ledger: Ledger, devices: Devices):
        self.root, self.settings, self.ledger, self.devices = Path(root), settings, ledger, devices
        self.snapshot_lock = threading.Lock()

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

    def context(self, head: str, pending: list[dict] = ()) -> Context:
        """What a proposer sees: editable files, the incumbent's numbers, the hardware, the rules, the history, and
        `pending`: proposals queued or training now ({"key", "hypothesis"}), not in the history yet."""
        s = self.settings
        tree = self.snapshot(head)
        files = {}
        for path in sorted(tree.rglob("*")):
            rel = path.relative_to(tree).as_posix()
            if path.is_file() and integrity.matches(rel, s.paths.editable) and not integrity.matches(rel, s.paths.protected):
                files[rel] = path.read_text(errors="replace")
        state = self.ledger.load_state()
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
                       incumbent=incumbent, hardware=hardware_summary(self.devices.nproc), history=history,
                       rules=rules_text(s), pending=list(pending), smoke=lambda text: self.smoke_check(text, head))

    def smoke_check(self, text: str, head: str) -> SmokeResult:
        """For proposers: a dry run of an edit on a scratch copy of `head`, then the smoke command there (waits for the
        devices)."""
        tree = self.snapshot(head)
        scratch = self.ledger.dir / "scratch" / f"{threading.get_ident()}"
        shutil.rmtree(scratch, ignore_errors=True)  # left over by a run that was killed
        try:
            edit = parse_edit(text)
            violation = integrity.path_violation(edit.paths(), self.settings.paths.editable, self.settings.paths.protected)
            if violation:
                return SmokeResult(False, violation)
            duplicate = self.duplicate_of(tree_fingerprint(tree, scratch, dry_run(edit, tree, scratch)))
            if duplicate:  # the harness would reject it without a run: say so now, while the proposer can still act
                return SmokeResult(False, f"duplicate of experiment {duplicate['id']} "
                                          f"({duplicate.get('hypothesis', '')}): propose a different change")
            result = self.devices.smoke(scratch, scratch / "run", scratch / "smoke.log")
            tail = "\n".join(Path(result.log_path).read_text(errors="replace").splitlines()[-30:])
            return SmokeResult(result.status == "ok", tail if result.status != "ok" else "smoke run passed")
        except EditError as e:
            return SmokeResult(False, f"edit does not apply: {e}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
