"""`ratchet run`: propose -> harness -> judge -> git, all night, within budgets, resumable.

The GPUs never wait on the LLM when the LLM is faster than a run: while experiment k trains, a background
thread asks the proposer for experiment k+1. The proposal waiting to run is saved in state.json, so a resume
runs the same edit (and an LLM is not paid twice for it).

Stopping: `ratchet stop`, a STOP file in runs/<tag>/, SIGTERM or a first Ctrl-C finish the current training run
and stop cleanly (the unfinished experiment re-runs on resume); a second Ctrl-C kills the run at once.
"""
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.harness import Harness, Stopped
from agent.propose.base import Proposal, Proposer, Usage


@dataclass
class Budgets:
    max_experiments: int | None = None   # experiments for this tag, across resumes
    hours: float | None = None           # active loop time for this tag, across resumes
    budget_usd: float | None = None      # LLM spend for this tag, across resumes

    def exhausted(self, loop: dict) -> str | None:
        if self.max_experiments is not None and loop["experiments"] >= self.max_experiments:
            return f"max experiments reached ({loop['experiments']})"
        if self.hours is not None and loop["active_s"] >= self.hours * 3600:
            return f"time budget reached ({loop['active_s'] / 3600:.2f} h)"
        if self.budget_usd is not None and loop["spent_usd"] >= self.budget_usd:
            return f"spend budget reached (${loop['spent_usd']:.2f})"
        return None


def proposal_to_dict(p: Proposal) -> dict:
    return asdict(p)


def proposal_from_dict(d: dict) -> Proposal:
    return Proposal(**{**d, "usage": Usage(**d["usage"])})


class StopSignals:
    """SIGTERM / first SIGINT ask for a clean stop; a second SIGINT raises KeyboardInterrupt (kill the run now)."""

    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __call__(self) -> bool:
        return self.requested or self.stop_file.exists()


class Loop:
    def __init__(self, harness: Harness, proposer: Proposer, budgets: Budgets, console=None):
        self.h = harness
        self.proposer = proposer
        self.budgets = budgets
        self.say = console.print if console is not None else print
        self.stop_file = harness.ledger.dir / "STOP"
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="propose")

    # --- loop state, persisted in state.json under "loop"
    def _loop_state(self) -> dict:
        state = self.h.state
        return state.get("loop") or {"experiments": 0, "active_s": 0.0, "spent_usd": 0.0, "pending": None,
                                     "proposer": self.proposer.name}

    def _save_loop(self, loop: dict) -> None:
        state = self.h.state
        state["loop"] = loop
        self.h.ledger.save_state(state)

    def _propose(self) -> tuple[Proposal | None, str, float]:
        """Runs in the background thread: (proposal, the head it was made against, seconds it took)."""
        t0 = time.perf_counter()
        head = self.h.ws.head()
        proposal = self.proposer.propose(self.h.context(head))
        return proposal, head, time.perf_counter() - t0

    def run(self) -> str:
        h = self.h
        h.recover()
        self.stop_file.unlink(missing_ok=True)
        if "baseline" not in h.state:
            self.say("no baseline for this tag yet: measuring it first")
            h.baseline()
        loop = self._loop_state()
        stop = StopSignals(self.stop_file)
        with stop:
            pending: Future | None = None
            while True:
                reason = self.budgets.exhausted(loop)
                if reason is None and stop():
                    reason = "stop requested"
                if reason:
                    break
                started = time.perf_counter()
                if loop["pending"] is not None:
                    proposal, made_on = proposal_from_dict(loop["pending"]["proposal"]), loop["pending"]["head"]
                else:
                    future = pending or self.pool.submit(self._propose)
                    pending = None
                    proposal, made_on, llm_s = future.result()
                    if proposal is None:
                        reason = "the proposer has nothing left"
                        break
                    loop["spent_usd"] += proposal.usage.cost_usd
                    loop["pending"] = {"proposal": proposal_to_dict(proposal), "head": made_on}
                    self._save_loop(loop)
                if made_on != h.ws.head() and proposal.key:
                    # a catalog entry prepared before the last accept: propose again against the new head (free)
                    loop["pending"] = None
                    self._save_loop(loop)
                    continue
                # the next proposal is prepared while this one trains
                pending = self.pool.submit(self._propose) if self.budgets.exhausted(
                    {**loop, "experiments": loop["experiments"] + 1}) is None else None
                try:
                    rows = h.run_proposal(proposal, made_on, should_stop=stop)
                except Stopped:
                    reason = "stop requested (the interrupted experiment re-runs on resume)"
                    break
                loop = self._loop_state()
                loop["experiments"] += len(rows)
                loop["pending"] = None
                loop["active_s"] += time.perf_counter() - started
                self._save_loop(loop)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.say(f"loop stopped: {reason}")
        return reason
