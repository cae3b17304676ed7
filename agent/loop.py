"""`ratchet run`: propose -> harness -> judge -> git, all night, within budgets, resumable.

The GPUs never wait on the LLM when the LLM is faster than an experiment: while experiment k trains, a background
thread asks the proposer for experiment k+1. Every proposal is saved in runs/<tag>/loop.json (the queue) the
moment it arrives, until it has run, so a resume runs the same edits (and an LLM is not paid twice for one). A
budget stop waits for the proposal being made; a user's stop does not wait, and keeps it only if it has arrived.

The proposer is paced: a pre-flight request at start stops the loop at once on a refused key or an unknown model
(ProposerFatal, raised out of run()); failed proposals are recorded but are not experiments, each one in a row waits
longer before the next ask, and a run of them stops the loop (Pacing). When an experiment takes far longer than a
proposal, the loop asks just in time instead of ahead, so the proposal sees the latest result. A proposal made
before an accept is checked against the new head before it runs, and one that no longer applies is rebased by its
proposer (a catalog entry is proposed again). For a proposer that reads the evidence (the LLMs: `reads_profile`), the incumbent
is profiled after the baseline and after each accept (ProposerServices.incumbent_profile).

Stopping: `ratchet stop`, a STOP file in runs/<tag>/, SIGTERM or a first Ctrl-C finish the current training run
and stop cleanly (the same command resumes the unfinished experiment with the runs it finished); a second Ctrl-C
kills the run at once. No run outlives the loop: a proposer's smoke run in flight is killed, and a proposal still being made (a daemon thread)
can start no other.
"""
import signal
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from typing import Callable

from agent.baseline import measure_baseline
from agent.comparison import Stopped
from agent.edit.parse import EditError
from agent.evidence import Night
from agent.experiment import run_proposal
from agent.harness import Harness
from agent.propose.answers import check_edit
from agent.propose.base import Proposal, Proposer, Usage
from agent.propose.chat_api import ProposalFailed
from agent.records.types import Arm, Decision

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


@dataclass
class Pacing:
    """How the loop paces its proposer."""
    backoff_s: float = 10.0          # the wait after a failed proposal, doubled for each more in a row ...
    max_backoff_s: float = 300.0     # ... up to this: an API that is down for a while is not asked every second
    max_failures: int = 5            # failed proposals in a row that stop the loop: something is broken for good
    # no asking ahead when an experiment takes at least just_in_time_ratio times as long as a proposal and at least
    # long_experiment_s: the devices then wait at most 1/ratio of their time for a proposal that has seen the latest
    # result; shorter experiments gain more from the overlap than from one more result
    just_in_time_ratio: float = 20.0
    long_experiment_s: float = 600.0

    def backoff(self, failures: int) -> float:
        return min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s)

    def ask_ahead(self, proposal_s: list[float], experiment_s: float | None) -> bool:
        """Whether to ask for the next proposal while this experiment runs, from the times of proposals asked just
        in time and the expected experiment time (None: not known yet)."""
        if not proposal_s or experiment_s is None:
            return True
        return not (experiment_s >= self.long_experiment_s and experiment_s >= self.just_in_time_ratio * mean(proposal_s))


def _wait(seconds: float, should_stop: Callable[[], bool]) -> None:
    """Sleep, but no longer than until a stop is asked for (checked every half second)."""
    deadline = time.monotonic() + seconds
    while not should_stop() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(0.5, left))


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
    def __init__(self, harness: Harness, proposer: Proposer, budgets: Budgets, console=None, prefetch: bool = True,
                 pacing: Pacing | None = None, wait: Callable[[float, Callable[[], bool]], None] | None = None):
        self.h = harness
        self.proposer = proposer
        self.budgets = budgets
        self.say = console.print if console is not None else print
        self.stop_file = harness.ledger.dir / "STOP"
        self.prefetch = prefetch  # False: ask for the next proposal only once the experiment is done (bench_loop)
        self.waited_s = 0.0       # seconds the loop waited for a proposal with the devices idle (bench_loop)
        self.pacing = pacing or Pacing()
        self.wait = wait or _wait  # (seconds, should_stop): the back-off's sleep (tests pass one that does not sleep)
        self.failures = 0         # failed proposals in a row
        self.proposal_s: list[float] = []    # how long each proposal asked just in time took
        self.experiment_s: list[float] = []  # how long each experiment took
        # loop.json (budgets used and the queue, across resumes) is changed by this thread and by the proposer
        # thread (a proposal is queued the moment it arrives), each change under the store's lock. `closed`: the
        # loop has exited, and a proposal that arrives now is not queued (a user's stop does not wait for one).
        self.closed = False

    # --- loop.json, in the tag's store (agent/records/ledger.py)
    def _fresh(self) -> dict:
        """The state of a loop that has not started."""
        return {"experiments": 0, "active_s": 0.0, "spent_usd": 0.0, "queue": [], "proposer": self.proposer.name}

    def _read(self) -> dict:
        return self.h.ledger.load_loop(self._fresh())

    def _update(self, change: Callable[[dict], None]) -> None:
        with self.h.ledger.lock:
            if not self.closed:
                self.h.ledger.update_loop(change, self._fresh())

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
    def _night(self) -> Night:
        """The budgets and what is used of them, for the proposer's "what is left of the night"."""
        loop = self._read()
        return Night(self.budgets.hours, loop["active_s"], self.budgets.max_experiments, loop["experiments"])

    def _pending(self) -> list[dict]:
        """The queued proposals (the one training now among them), for a context: not to be made again."""
        return [{"key": q["proposal"]["key"], "hypothesis": q["proposal"]["hypothesis"]} for q in self._read()["queue"]]

    def _ask(self, ahead: bool = False) -> Future:
        """The next proposal, made against the current head; it queues itself on arrival. `ahead`: asked while an
        experiment runs (its time, smoke runs waiting for the devices, says nothing of a proposal's)."""
        pending = self._pending()
        future = Future()

        def work():
            try:
                started = time.perf_counter()
                head = self.h.ws.head()
                proposal = self.proposer.propose(self.h.context(head, pending, self._night()))
                if not ahead:
                    self.proposal_s.append(time.perf_counter() - started)
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
        with self.h.ledger.lock:
            self.closed = True
        self.h.devices.close()  # no smoke run starts after this; one in flight is killed

    # --- before a proposal runs
    def _preflight(self) -> None:
        """The proposer's pre-flight request, if it has one (the LLMs'): a refused key or an unknown model raises
        ProposerFatal before the baseline is measured; another failure is only said, as the server may be back by
        the first proposal."""
        preflight = getattr(self.proposer, "preflight", None)
        if preflight is None:
            return
        try:
            preflight()
        except ProposalFailed as e:
            self.say(f"{self.proposer.name}: the pre-flight request failed ({e}); going on")

    def _started(self, queued: dict) -> bool:
        """Whether the ledger has rows of this queued proposal already (a resume finishes it where it was)."""
        return any(r.get("proposal_id") == queued["id"] for r in self.h.ledger.rows())

    def _stale(self, queued: dict, proposal: Proposal) -> bool:
        """A proposal made before the last accept, at the head of the queue: True when it was taken out of the queue
        (a catalog entry, proposed again against the new head for free) or replaced (an LLM's edit that no longer
        passes the check on the new head: by its rebase, or by the rebase's failure). False: it runs as it is (it
        still applies, it has started already, or its proposer cannot rebase)."""
        if proposal.key:
            self._dequeue(queued)
            return True
        rebase = getattr(self.proposer, "rebase", None)
        if proposal.error or rebase is None or self._started(queued):
            return False
        head = self.h.ws.head()
        context = self.h.context(head, self._pending(), self._night())
        try:
            check_edit(proposal.text, context)
            return False
        except EditError as e:
            problem = str(e)
        self.say(f"{proposal.hypothesis or 'a proposal'}: made before the last accept, it no longer applies; "
                 "asking for a rebase")
        rebased = rebase(proposal, context, problem)
        if rebased.error:
            rebased.error = f"no rebase after an accept ({problem.splitlines()[0]}): {rebased.error}"
        self._replace(queued, rebased, head)
        return True

    def _replace(self, queued: dict, rebased: Proposal, head: str) -> None:
        """The queued proposal replaced in place by its rebase onto `head`: the rebase's spend is counted, and its
        row will show what the proposal cost in all."""
        spent = rebased.usage.cost_usd
        rebased.usage.add(proposal_from_dict(queued["proposal"]).usage)

        def swap(loop):
            loop["spent_usd"] += spent
            for q in loop["queue"]:
                if q["id"] == queued["id"]:
                    q.update(proposal=proposal_to_dict(rebased), head=head)
        self._update(swap)

    def _ask_ahead(self) -> bool:
        """Pacing.ask_ahead with the times measured so far; until an experiment has run, one of the incumbent's
        runs stands for it (an experiment takes at least one)."""
        if self.experiment_s:
            return self.pacing.ask_ahead(self.proposal_s, mean(self.experiment_s))
        incumbent = self.h.state.get("incumbent")
        return self.pacing.ask_ahead(self.proposal_s, Arm.from_state(incumbent).mean_seconds if incumbent else None)

    def _failed(self, queued: dict, proposal: Proposal, made_on: str, loop: dict, started: float,
                should_stop) -> str | None:
        """A failed proposal: recorded (a ledger row; nothing ran), not counted as an experiment. Then, unless it
        is the max_failures-th in a row (-> why the loop stops), the back-off's wait before the next ask."""
        run_proposal(self.h, proposal, made_on, proposal_id=queued["id"])
        self._dequeue(queued, active_s=loop["active_s"] + time.perf_counter() - started)
        self.failures += 1
        if self.failures >= self.pacing.max_failures:
            return f"the proposer failed {self.failures} times in a row (the last: {proposal.error})"
        seconds = self.pacing.backoff(self.failures)
        self.say(f"{self.proposer.name}: no proposal ({self.failures} failed in a row); asking again in {seconds:.0f} s")
        waiting = time.perf_counter()
        self.wait(seconds, should_stop)
        waited = time.perf_counter() - waiting
        self._update(lambda loop: loop.update(active_s=loop["active_s"] + waited))
        return None

    def run(self) -> str:
        """The night, until a budget, the proposer or the user stops it; returns why. ProposerFatal (a refused key,
        an unknown model) goes up to the caller, after the same clean exit."""
        h = self.h
        h.recover()
        self.stop_file.unlink(missing_ok=True)
        stop = StopSignals(self.stop_file)
        ahead: Future | None = None  # the next proposal, being made while an experiment runs
        reason, by_user = None, False  # why the loop stops (for people), and whether the user asked
        with stop:
            try:
                self._preflight()
                if "baseline" not in h.state:
                    self.say("no baseline for this tag yet: measuring it first")
                    measure_baseline(h, should_stop=stop)
                h.require_baseline()  # measured under these settings: refused before any proposal is paid for
                while True:
                    if getattr(self.proposer, "reads_profile", False):
                        h.profile_incumbent()  # after the baseline and after an accept: a short run; else kept
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
                    if made_on != h.ws.head() and self._stale(queued, proposal):
                        continue  # dropped or replaced: the queue is read again
                    if proposal.error:
                        if reason := self._failed(queued, proposal, made_on, loop, started, stop):
                            break
                        continue
                    self.failures = 0
                    # the next proposal is prepared while this one trains, unless it would better wait for its result
                    if (self.prefetch and len(loop["queue"]) == 1 and self._ask_ahead()
                            and self.budgets.exhausted(loop, asking=True) is None):
                        ahead = self._ask(ahead=True)
                    try:
                        running = time.perf_counter()
                        run_proposal(h, proposal, made_on, should_stop=stop, proposal_id=queued.get("id", ""))
                        self.experiment_s.append(time.perf_counter() - running)
                    except Stopped:
                        elapsed = time.perf_counter() - started
                        self._update(lambda loop: loop.update(active_s=loop["active_s"] + elapsed))
                        reason, by_user = f"{USER_STOP} (the same command resumes the interrupted experiment)", True
                        break
                    # counted from the ledger: a resume that finishes a half-done experiment counts it once
                    done = sum(1 for r in h.ledger.rows() if r.get("proposal_id") and r["decision"] != Decision.FAILED)
                    self._dequeue(queued, experiments=done,
                                  active_s=loop["active_s"] + time.perf_counter() - started)
            except Stopped:  # during the baseline
                reason, by_user = f"{USER_STOP} (the baseline is measured again on resume)", True
            finally:
                self._close(ahead, budget_stop=reason is not None and not by_user)
        self.say(f"loop stopped: {reason}")
        return reason
