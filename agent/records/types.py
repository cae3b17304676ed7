"""The typed records: an experiment (a ledger row), an arm (one commit's timed runs, as state.json keeps the baseline
and the incumbent), and the decisions and stages. Decisions and stages are string enums: they compare equal to, and
serialize as, the strings the ledger has always held, so rows written by earlier versions load unchanged.
"""
from dataclasses import asdict, dataclass, field, fields
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


# a row's headline numbers: top-level in every ledger row (results.tsv, `ratchet log`, earlier versions read them),
# derived from the verdict (a baseline: from its runs), never set on their own
HEADLINE = ("speedup", "candidate_s", "incumbent_s", "p_value", "val_loss")


@dataclass
class Experiment:
    """One ledger row, typed: an edit's experiment, a baseline, a replay, or a proposer's failure. It is filled in as
    the experiment goes; `to_row()` is what the ledger, result.json and `ratchet try --json` hold, and `from_row()`
    reads the rows of every earlier version (keys it does not know stay in `extra`)."""
    id: str
    kind: str                          # "baseline", "try", "run" (the loop's), "calibrate" (a variant), "replay"
    parent: str                        # the incumbent commit it is measured against
    time: float                        # when it started (time.time())
    proposer: str = ""                 # "manual", "catalog", "anthropic:<model>", ...; "" for a baseline
    hypothesis: str = ""
    rationale: str = ""
    diff: str = ""                     # the candidate commit's change against parent
    commit: str | None = None          # the candidate commit (its message amended with the trailers)
    ref: str | None = None             # where a rejected commit is kept (refs/ratchet/<tag>/rejected/<id>)
    sandbox: str = ""                  # how the runs were isolated
    fingerprint: str | None = None     # the change's fingerprint (duplicates)
    policy: list | None = None         # the static policy's findings
    smoke: dict | None = None          # the opening run (a smoke or screen run), as measured
    runs: list = field(default_factory=list)  # the timed runs in order, as measured (Measurement dicts)
    screen: dict | None = None         # the screen's numbers where it rejected
    prior: dict | None = None          # the noise prior the judge used: {"var", "df"}
    order_seed: int | None = None      # the seed of the judge's coin flips
    verdict: dict | None = None        # the judge's Verdict
    decision: Decision | None = None
    reason: str = ""                   # for people: the sentence that says why
    stage: Stage | None = None         # what decided
    target: float | None = None        # the val-loss target it was held to (a baseline: the one it set)
    extra: dict = field(default_factory=dict)  # the caller's: a proposal's (key, usage, notes, ...), a calibrated
                                               # variant's (calibrates, steps_before, steps_after), a replay's

    @property
    def headline(self) -> dict:
        """speedup, candidate_s, incumbent_s, p_value, val_loss: the verdict's, or a baseline's runs'."""
        v = self.verdict or {}
        if self.kind == "baseline" and self.runs:
            arm = Arm("", [r["seconds"] for r in self.runs], [r["val_loss"] for r in self.runs])
            return dict.fromkeys(HEADLINE) | {"incumbent_s": arm.mean_seconds, "val_loss": arm.mean_val_loss}
        return {"speedup": v.get("speedup"), "candidate_s": v.get("candidate_mean"),
                "incumbent_s": v.get("incumbent_mean"), "p_value": v.get("p_value"), "val_loss": v.get("val_loss_mean")}

    def decide(self, decision: Decision, reason: str, stage: Stage | None = None) -> None:
        self.decision, self.reason, self.stage = Decision(decision), reason, None if stage is None else Stage(stage)
        if self.verdict:
            self.target = self.verdict.get("target_val_loss")

    def to_row(self) -> dict:
        # None is left out, but for the keys readers look up directly, and the prior of a judged experiment ("none")
        kept = ("target", "verdict") + (("prior",) if self.order_seed is not None else ())
        row = {k: v for k, v in asdict(self).items() if k != "extra" and (v is not None or k in kept)}
        return {**self.extra, **row, **self.headline}

    @classmethod
    def from_row(cls, row: dict) -> "Experiment":
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in row.items() if k in known}
        for name, kind in (("decision", Decision), ("stage", Stage)):
            if values.get(name) in kind.__members__.values():  # a word no longer in use stays the string it was
                values[name] = kind(values[name])
        return cls(**values, extra={k: v for k, v in row.items() if k not in known and k not in HEADLINE})
