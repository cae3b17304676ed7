"""`ratchet run`: propose -> harness -> judge -> git, all night, within budgets, resumable.

The GPUs never wait on the LLM when the LLM is faster than an experiment: while experiment k trains, a background
thread asks the proposer for experiment k+1. Every proposal is saved in runs/<tag>/loop.json (the queue) the
moment it arrives, until it has run, so a resume runs the same edits (and an LLM is not paid twice for one). A
budget stop waits for the proposal being made; a user's stop does not wait, and keeps it only if it has arrived.

Stopping: `ratchet stop`, a STOP file in runs/<tag>/, SIGTERM or a first Ctrl-C finish the current training run
and stop cleanly (the same command resumes the unfinished experiment with the runs it finished); a second Ctrl-C
kills the run at once. No run outlives the loop: a proposer's smoke run in flight is killed, and a proposal still being made (a daemon thread)
can start no other.
"""
import json
import signal
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from agent.baseline import measure_baseline
from agent.experiment import run_proposal
from agent.harness import Harness, Stopped
from agent.propose.base import Proposal, Proposer, Usage
from agent.measure.runner import kill_leftovers

USER_STOP = "stop requested"


@dataclass
class Budgets:
    max_experiments: int | None = None   # experiments for this tag, across resumes
    hours: float | None = None           # active loop time for this tag, across resumes
    budget_usd: float | None = None      # LLM spend for this tag, across resumes

    def exhausted(self, loop: dict, asking: bool = False) -> str | None:
        """Why the loop must stop now, or with asking=True why it must not ask for one more proposal ahead (that
        proposal counts as one more experiment). The spend budget only stops asking: queued proposals are paid
        for, so they run first."""
        experiments = loop["experiments"] + asking
        if self.max_experiments is not None and experiments >= self.max_experiments:
            return f"max experiments reached ({loop['experiments']})"
        if self.hours is not None and loop["active_s"] >= self.hours * 3600:
            return f"time budget reached ({loop['active_s'] / 3600:.2f} h)"
        if self.budget_usd is not None and loop["spent_usd"] >= self.budget_usd and (asking or not loop["queue"]):
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
    def __init__(self, harness: Harness, proposer: Proposer, budgets: Budgets, console=None, prefetch: bool = True):
        self.h = harness
        self.proposer = proposer
        self.budgets = budgets
        self.say = console.print if console is not None else print
        self.stop_file = harness.ledger.dir / "STOP"
        self.path = harness.ledger.dir / "loop.json"  # budgets used and the queue, across resumes
        self.prefetch = prefetch  # False: ask for the next proposal only once the experiment is done (bench_loop)
        self.waited_s = 0.0       # seconds the loop waited for a proposal with the devices idle (bench_loop)
        # loop.json is changed by this thread and by the proposer thread (a proposal is queued the moment it
        # arrives); every change is a read-modify-write under this lock. `closed`: the loop has exited, and a
        # proposal that arrives now is not queued (a user's stop does not wait for one).
        self.lock = threading.Lock()
        self.closed = False

    # --- loop.json
    def _load(self) -> dict:
        """loop.json, or the state of a loop that has not started (call it under the lock)."""
        if self.path.exists():
            return json.loads(self.path.read_text())
        return {"experiments": 0, "active_s": 0.0, "spent_usd": 0.0, "queue": [], "proposer": self.proposer.name}

    def _read(self) -> dict:
        with self.lock:
            return self._load()

    def _update(self, change: Callable[[dict], None]) -> None:
        with self.lock:
            if self.closed:
                return
            loop = self._load()
            change(loop)
            self.h.ledger.write_json(self.path, loop)

    def _enqueue(self, proposal: Proposal, made_on: str) -> None:
        """A proposal has arrived: it is paid for, and saved at once until it has run (a kill -9 loses nothing)."""
        def add(loop):
            loop["spent_usd"] += proposal.usage.cost_usd
            loop["queue"].append({"proposal": proposal_to_dict(proposal), "head": made_on, "id": uuid.uuid4().hex[:12]})
        self._update(add)

    def _dequeue(self, queued: dict, **changes) -> None:
        def drop(loop):
            loop["queue"] = [q for q in loop["queue"] if q["id"] != queued["id"]]
            loop.update(changes)
        self._update(drop)

    # --- the proposer, in a daemon thread: a proposal still in flight never holds up the exit
    def _ask(self) -> Future:
        """The next proposal, made against the current head; it queues itself on arrival. The queued proposals
        (the one training now among them) go into the context, so the proposer does not make them again."""
        pending = [{"key": q["proposal"]["key"], "hypothesis": q["proposal"]["hypothesis"]}
                   for q in self._read()["queue"]]
        future = Future()

        def work():
            try:
                head = self.h.ws.head()
                proposal = self.proposer.propose(self.h.context(head, pending))
                if proposal is not None:
                    self._enqueue(proposal, head)
                future.set_result(proposal)
            except BaseException as e:  # noqa: BLE001 (as concurrent.futures does: the waiting thread re-raises it)
                future.set_exception(e)
        threading.Thread(target=work, name="propose", daemon=True).start()
        return future

    def _close(self, ahead: Future | None, budget_stop: bool) -> None:
        """At exit: after a budget stop (or the proposer's end), wait for the proposal being made (it queues
        itself); after a user's stop or an interrupt, keep it only if it has arrived. Then make sure no run outlives
        the loop: the harness's devices stay locked from here on (one Loop per Harness, as `ratchet run` makes them)."""
        if ahead is not None and budget_stop:
            ahead.exception()  # waits; a proposer error is not this exit's business
        with self.lock:
            self.closed = True
        scratch = f"{self.h.ledger.dir / 'scratch'}/"  # where proposers' smoke runs live (Harness.smoke_check)
        while not self.h.devices.lock.acquire(timeout=1.0):  # held until exit: no smoke run starts after this
            kill_leftovers(scratch)

    def run(self) -> str:
        h = self.h
        h.recover()
        self.stop_file.unlink(missing_ok=True)
        stop = StopSignals(self.stop_file)
        ahead: Future | None = None  # the next proposal, being made while an experiment runs
        reason, by_user = None, False  # why the loop stops (for people), and whether the user asked
        with stop:
            try:
                if "baseline" not in h.state:
                    self.say("no baseline for this tag yet: measuring it first")
                    measure_baseline(h, should_stop=stop)
                while True:
                    loop = self._read()
                    reason = self.budgets.exhausted(loop)
                    if reason is None and stop():
                        reason, by_user = USER_STOP, True
                    if reason:
                        break
                    started = time.perf_counter()
                    if not loop["queue"]:
                        if ahead is not None and ahead.done():
                            ahead.result()  # re-raises a proposer error; its proposal was queued and has been taken
                            ahead = None
                        future, ahead = ahead or self._ask(), None
                        waiting = time.perf_counter()
                        proposal = future.result()
                        self.waited_s += time.perf_counter() - waiting
                        if proposal is None:
                            reason = "the proposer has nothing left"
                            break
                        if stop():  # asked while we waited: the proposal is saved and runs on resume
                            reason, by_user = USER_STOP, True
                            break
                        loop = self._read()
                    queued = loop["queue"][0]
                    proposal, made_on = proposal_from_dict(queued["proposal"]), queued["head"]
                    if made_on != h.ws.head() and proposal.key:
                        # a catalog entry prepared before the last accept: propose again against the new head (free)
                        self._dequeue(queued)
                        continue
                    # the next proposal is prepared while this one trains
                    if self.prefetch and len(loop["queue"]) == 1 and self.budgets.exhausted(loop, asking=True) is None:
                        ahead = self._ask()
                    try:
                        run_proposal(h, proposal, made_on, should_stop=stop, proposal_id=queued.get("id", ""))
                    except Stopped:
                        elapsed = time.perf_counter() - started
                        self._update(lambda loop: loop.update(active_s=loop["active_s"] + elapsed))
                        reason, by_user = f"{USER_STOP} (the same command resumes the interrupted experiment)", True
                        break
                    # counted from the ledger: a resume that finishes a half-done experiment counts it once
                    done = sum(1 for r in h.ledger.rows() if r.get("proposal_id"))
                    self._dequeue(queued, experiments=done,
                                  active_s=loop["active_s"] + time.perf_counter() - started)
            except Stopped:  # during the baseline
                reason, by_user = f"{USER_STOP} (the baseline is measured again on resume)", True
            finally:
                self._close(ahead, budget_stop=reason is not None and not by_user)
        self.say(f"loop stopped: {reason}")
        return reason
