"""The proposer interface: every source of edits (the built-in catalog, an LLM) answers `propose(context)`.

A proposal is edit text in the contract's format (HYPOTHESIS/RATIONALE + SEARCH/REPLACE blocks or a unified
diff); the harness parses, guards, tests and judges it. Proposers never touch git or run training themselves:
the only code they may run is the smoke check the loop hands them (`Context.smoke`).
"""
from dataclasses import dataclass, field
from typing import Callable, Protocol


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0       # prompt-cache hits, billed at the cached rate
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0

    def add(self, other: "Usage") -> None:
        for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cost_usd", "calls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class SmokeResult:
    ok: bool
    log_tail: str                    # last lines of the smoke run's log (the error, when it failed)


@dataclass
class Context:
    """What a proposer knows when it proposes. Built by the loop from the repo, the state and the ledger."""
    root: str                                  # worktree of the incumbent (read-only for the proposer)
    editable: list[str]                        # editable globs
    protected: list[str]                       # protected globs
    files: dict[str, str]                      # editable files: repo-relative path -> content
    incumbent: dict                            # {"commit", "seconds", "val_loss", "target", ...}: headline numbers
    hardware: str                              # e.g. "CPU: 2 cores, no GPU; torch 2.13.0" or "8x NVIDIA H100 80GB"
    history: list[dict]                        # ledger rows so far: id, hypothesis, decision, reason, speedup, diff
    rules: str                                 # what counts, what is protected, that the length is calibrated
    pending: list[dict] = field(default_factory=list)  # queued or training now, not in history: {"key", "hypothesis"}
    smoke: Callable[[str], SmokeResult] | None = None  # apply an edit text in a scratch worktree and run the smoke check
    # the evidence (agent/evidence.py): section title -> text, in the order shown ("Where the time goes", "What the
    # judge can detect", "Profile of the incumbent", "Hardware facts"); numbers measured by us, or read from the
    # incumbent's own output and marked so
    evidence: dict[str, str] = field(default_factory=dict)
    hints: list[dict] = field(default_factory=list)   # known ideas (the catalog): {"name", "idea", "effect", "tried"}
    notes: list[str] = field(default_factory=list)    # the model's own notes from earlier proposals, oldest first
    profile: Callable[[str], str] | None = None       # edit text -> a profile summary of it (waits for the devices)
    show_experiment: Callable[[str], str] | None = None  # experiment id -> its diff, numbers, runs and log tail


@dataclass
class Proposal:
    text: str                                  # the edit, in the contract's format
    proposer: str                              # "catalog", "anthropic:<model>", "openai:<model>"
    hypothesis: str = ""
    usage: Usage = field(default_factory=Usage)
    attempts: list[dict] = field(default_factory=list)  # smoke/debug attempts, each {"edit", "ok", "log_tail"}
    key: str = ""                              # a stable id (catalog entry name) so an entry is never tried twice
    error: str = ""                            # a failed proposal: recorded, not run (malformed reply, API error)
    notes: str = ""                            # what the model wants to remember (submit_edit's notes), shown later


class Proposer(Protocol):
    """Optional, asked by the loop where present (the LLM proposers have them): preflight() before the night,
    rebase(proposal, context, problem) for a queued edit an accept made stale, and reads_profile (True: the loop
    profiles the incumbent for it after the baseline and each accept)."""
    name: str                                  # "catalog", "anthropic:<model>", ...

    def propose(self, context: Context) -> Proposal | None:
        """The next edit to try, or None when this proposer has nothing left."""
        ...
