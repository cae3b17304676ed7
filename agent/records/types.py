"""The typed parts of a record. Decisions and stages are string enums: they compare equal to, and serialize as,
the strings the ledger has always held, so rows written by earlier versions load unchanged. An arm is one commit's
timed runs as state.json keeps the baseline and the incumbent.
"""
from dataclasses import asdict, dataclass, field
from enum import StrEnum


class Decision(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"                  # the proposer failed: nothing ran
    BASELINE = "baseline"
    REPRODUCED = "reproduced"          # replay
    NOT_REPRODUCED = "not reproduced"  # replay


class Stage(StrEnum):
    """What decided an experiment, in the order an edit meets them."""
    EDIT = "edit"      # malformed, does not apply, no change, a duplicate
    GUARD = "guard"    # a protected or non-editable path; a protected file changed in the worktree
    POLICY = "policy"  # the static policy rejected a pattern
    SMOKE = "smoke"    # the opening run (smoke or screen run) failed, or the probe on the smoke run's weights
    SCREEN = "screen"  # the screen stopped the screen run or the first timed run
    RUN = "run"        # a timed candidate run failed (crash, timeout, abort, evaluation)
    JUDGE = "judge"    # the sequential test (or the calibration stop at its first look)


@dataclass
class Arm:
    """One commit's timed runs: the baseline's, or the incumbent's (its accepted candidate runs)."""
    commit: str
    seconds: list[float]
    val_losses: list[float]
    curve: list = field(default_factory=list)  # the last run's progress lines (the abort rules' reference)

    @property
    def mean_seconds(self) -> float:
        return sum(self.seconds) / len(self.seconds)

    @property
    def mean_val_loss(self) -> float:
        return sum(self.val_losses) / len(self.val_losses)

    @classmethod
    def from_state(cls, d: dict) -> "Arm":
        """From state.json's "baseline" or "incumbent" (which may hold more keys: the baseline's target and id)."""
        return cls(d["commit"], list(d["seconds"]), list(d["val_losses"]), list(d.get("curve", [])))

    def to_state(self) -> dict:
        return asdict(self)
