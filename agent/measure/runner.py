"""Launch one training run, time it from outside, follow its progress, stop it early, leave no process behind.

Trust boundary: everything the training process prints is untrusted. Its progress lines feed the live view and the
early abort only, never the verdict; the time that counts is ours: `time.perf_counter()` from just before launch to
the exit of the run's whole process group, so work moved into a background process is timed (or flagged) too.

Cleanup, in layers:
  1. the run leads a new session and process group; timeouts, aborts and Ctrl-C kill the whole group;
  2. group members that linger after the leader exits are killed and the run is flagged (`survivors`);
  3. a process that left the group with setsid() is found by the unique RATCHET_RUN_ID in its environment;
  4. an output pipe still open after all that means something we could not find outlived the run: flagged too.
Layers 3 and 4 are a fallback: the real guard is the sandbox (bubblewrap with its own PID namespace, dying with us).
Linux only (/proc, sessions).
"""
import math
import os
import queue
import re
import select
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

import numpy as np

RUN_ID_VAR = "RATCHET_RUN_ID"  # tags every process of a run, so that escapees from the group can be found
TERM_GRACE = 3.0       # seconds between SIGTERM and SIGKILL when we stop a run (lets torchrun stop its workers)
KILL_WAIT = 10.0       # seconds to wait for SIGKILLed processes to go (a process in the D state takes a while)
DRAIN_SECONDS = 1.0    # once every process is gone the output pipe must reach EOF this fast, else someone holds it
POLL = 0.005           # seconds between group-liveness checks: bounds the error of our end time
MAX_LINE = 8192        # bytes of one output line handed to parsing and callbacks (the log keeps every byte)
TAIL_LINES = 500       # last output lines kept in memory to explain a crash
OUTLIVED = "process outlived the run (background work)"

# `step {s}/{total} loss {x:.4f} elapsed {t:.2f}s`, the whole line; digit counts bounded because the text is untrusted
PROGRESS_RE = re.compile(r"step (\d{1,12})/(\d{1,12}) loss (-?\d{1,12}\.\d{1,12}|-?nan|-?inf) elapsed (\d{1,12}\.\d{1,12})s")
# an explicit error line: "error: ..." as nanomodel.train prints it, or argparse's "prog: error: ..."
ERROR_LINE_RE = re.compile(r"(?:^|: )error: ")
RANK_PREFIX_RE = re.compile(r"^\[(?:rank|default)\d+\]:\s?")  # torchrun's per-rank prefix when it tees worker output


class RunnerError(Exception):
    """Bad arguments or a command that cannot be launched (a setup problem, not a verdict on the run)."""


@dataclass
class Progress:
    step: int
    total: int
    loss: float     # self-reported: display and early abort only
    elapsed: float  # self-reported seconds since the run's own start
    wall: float     # OUR clock: seconds from launch to the line's arrival


@dataclass
class RunResult:
    status: str       # "ok" | "crashed" | "timeout" | "aborted"
    seconds: float    # our wall-clock, launch -> whole group gone
    exit_code: int | None  # the leader's, as Popen reports it (negative: killed by that signal)
    reason: str       # "" when ok
    log_path: str
    curve: list[Progress]
    survivors: bool   # a process outlived the run and had to be killed (or could not be found)


def parse_progress(line: str, wall: float) -> Progress | None:
    """A Progress for a well-formed progress line, else None (any other line is just logged)."""
    m = PROGRESS_RE.fullmatch(line.strip())
    if m is None:
        return None
    step, total = int(m[1]), int(m[2])
    if not 0 <= step <= total or total == 0:
        return None
    return Progress(step, total, float(m[3]), float(m[4]), wall)


def cpu_threads_per_rank(nproc: int) -> int:
    """Threads per rank that fill this process's CPUs without oversubscribing (for OMP_NUM_THREADS)."""
    if nproc < 1:
        raise RunnerError(f"nproc must be at least 1, got {nproc}")
    return max(1, len(os.sched_getaffinity(0)) // nproc)


LOSS_LINES = 3  # progress lines averaged by AbortPolicy's loss rule


@dataclass
class AbortPolicy:
    """Early abort for `run_training(monitor=...)`: a reason once the run can no longer beat the incumbent.

    One instance per run: it remembers the run's progress lines to measure its recent pace. Without an incumbent
    (a baseline run) only the NaN/inf rule applies.
    """
    incumbent_seconds: float | None = None  # the incumbent's measured wall-clock; None: no pace rule
    incumbent_curve: list[Progress] = field(default_factory=list)  # the incumbent's progress lines; empty: no loss rule
    pace_slack: float = 0.2     # abort when the projected time exceeds the incumbent's by more than this fraction
                                # (generous: a pace read from a few progress lines is noisy, and an abort is final)
    loss_slack: float = 1.0     # abort when the loss (last LOSS_LINES lines) exceeds the incumbent's at the same steps by this (nats)
    min_fraction: float = 0.15  # the pace and loss rules wait for this fraction of the steps
    pace_window: float = 0.2    # pace is measured over the lines in the last this fraction of the steps
    seen: list[Progress] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if self.incumbent_seconds is not None and not (math.isfinite(self.incumbent_seconds) and self.incumbent_seconds > 0):
            raise RunnerError(f"incumbent_seconds must be a positive number, got {self.incumbent_seconds}")
        if self.pace_slack < 0 or self.loss_slack < 0:
            raise RunnerError(f"slacks must be >= 0, got pace {self.pace_slack}, loss {self.loss_slack}")
        if not (0 <= self.min_fraction <= 1 and 0 < self.pace_window <= 1):
            raise RunnerError(f"min_fraction must be in [0, 1] and pace_window in (0, 1], got {self.min_fraction}, {self.pace_window}")
        reference = sorted((p.step, p.loss) for p in self.incumbent_curve if math.isfinite(p.loss))
        self._ref_steps = np.array([s for s, _ in reference], dtype=float)
        self._ref_losses = np.array([x for _, x in reference], dtype=float)

    def __call__(self, p: Progress) -> str | None:
        if not math.isfinite(p.loss):
            return f"loss is {p.loss} at step {p.step}"
        self.seen.append(p)
        if p.step / p.total < self.min_fraction:
            return None
        if self.incumbent_seconds is not None:
            pace = self._recent_pace()
            if pace is not None:
                projected = p.wall + (1 - p.step / p.total) * pace
                if projected > self.incumbent_seconds * (1 + self.pace_slack):
                    return f"slower: projected {projected:.1f}s vs incumbent {self.incumbent_seconds:.1f}s at step {p.step}/{p.total}"
        # the loss rule reads the mean of the last LOSS_LINES lines: one batch's loss depends on which data the
        # seed put there (a cpu-tiny batch of unusual text reads ~2 nats high), a model that has gone wrong stays high
        recent = [q for q in self.seen[-LOSS_LINES:]
                  if len(self._ref_steps) and self._ref_steps[0] <= q.step <= self._ref_steps[-1]]
        if len(recent) == LOSS_LINES:
            loss = float(np.mean([q.loss for q in recent]))
            reference = float(np.mean(np.interp([q.step for q in recent], self._ref_steps, self._ref_losses)))
            if loss > reference + self.loss_slack:
                return f"loss {loss:.2f} at steps {recent[0].step}-{p.step} vs incumbent {reference:.2f}"
        return None

    def _recent_pace(self) -> float | None:
        """Wall seconds per unit of progress fraction, from the earliest line inside the window (at least the
        previous line) to now. The launch -> first line interval, where start-up and compilation land, never counts."""
        *earlier, now = self.seen
        if not earlier:
            return None
        done = now.step / now.total
        inside = [q for q in earlier if q.step / q.total >= done - self.pace_window]
        start = inside[0] if inside else earlier[-1]
        progressed = done - start.step / start.total
        return (now.wall - start.wall) / progressed if progressed > 0 else None


def run_training(cmd: list[str], *, cwd: str | os.PathLike, env: Mapping[str, str], log_path: str | os.PathLike,
                 timeout: float, monitor: Callable[[Progress], str | None] | None = None,
                 on_line: Callable[[str], None] | None = None, on_progress: Callable[[Progress], None] | None = None,
                 grace: float = 5.0) -> RunResult:
    """Run `cmd` in a new session under `cwd` with exactly `env` (plus RATCHET_RUN_ID), stdout+stderr to `log_path`.

    `monitor` sees each progress line while the run is live; a non-None return aborts the run with that reason.
    `grace`: seconds that group members may outlive the leader before they are killed and the run flagged.
    Ctrl-C (or any exception from a callback) kills the whole group, then propagates.
    """
    if not cmd or not all(isinstance(a, str) for a in cmd):
        raise RunnerError(f"cmd must be a non-empty list of strings, got {cmd!r}")
    if not (timeout > 0 and math.isfinite(timeout)) or not grace >= 0:
        raise RunnerError(f"timeout must be > 0 and grace >= 0 seconds, got {timeout} and {grace}")
    run_id = uuid.uuid4().hex
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    curve: list[Progress] = []
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    def take(line: str, wall: float, live: bool) -> str | None:
        """Handle one output line; returns an abort reason from the monitor (consulted only while the run is live)."""
        tail.append(line)
        if on_line:
            on_line(line)
        p = parse_progress(line, wall)
        if p is None:
            return None
        curve.append(p)
        if on_progress:
            on_progress(p)
        return monitor(p) if monitor and live else None

    events: queue.Queue = queue.Queue()  # ("line", text, wall) | ("eof",) | ("exit", code), in arrival order
    stop_reading = threading.Event()
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env={**env, RUN_ID_VAR: run_id}, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise RunnerError(f"cannot launch {cmd[0]!r} in {cwd}: {e}") from e
        pgid = proc.pid  # start_new_session: the leader's pid names the session and the group
        reader = threading.Thread(target=_pump, args=(proc.stdout.fileno(), log, events, t0, stop_reading), daemon=True)
        waiter = threading.Thread(target=lambda: events.put(("exit", proc.wait())), daemon=True)
        reader.start()
        waiter.start()
        status, reason, lingered = "ok", "", False
        try:
            deadline = t0 + timeout
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    status, reason = "timeout", f"timed out after {timeout:g}s"
                    break
                try:
                    event = events.get(timeout=remaining)
                except queue.Empty:
                    continue
                if event[0] == "exit":
                    lingered = not _wait_group_gone(pgid, grace)
                    break
                if event[0] == "line" and (abort := take(event[1], event[2], live=True)) is not None:
                    status, reason = "aborted", abort
                    break
        finally:
            _stop_group(pgid)
            seconds = time.perf_counter() - t0
            escaped = _kill_escaped(run_id)
            pipe_held = not _finish_reading(reader, stop_reading)
            waiter.join(KILL_WAIT)  # returncode stays None only if the leader could not be killed
            proc.stdout.close()

    while True:  # lines that arrived after the leader's exit: logged and plotted, too late to abort anything
        try:
            event = events.get_nowait()
        except queue.Empty:
            break
        if event[0] == "line":
            take(event[1], event[2], live=False)

    reasons = [reason] if reason else []
    if status == "ok" and proc.returncode != 0:
        status = "crashed"
        reasons.append(_exit_reason(proc.returncode, list(tail)))
    # after an abort or a timeout we killed the group ourselves: processes still dying then are not work that
    # outlived the run (inside the sandbox they live a few ms longer than bwrap), so only a run that ended on its
    # own can be flagged
    survivors = lingered or ((escaped or pipe_held) and status == "ok")
    if survivors:
        status = "crashed" if status == "ok" else status  # a timeout or an abort keeps its own status
        reasons.append(OUTLIVED)
    return RunResult(status, seconds, proc.returncode, "; ".join(reasons), str(log_path), curve, survivors)


def _pump(fd: int, log: BinaryIO, events: queue.Queue, t0: float, stop: threading.Event) -> None:
    """Reader thread: copy the child's output to the log as it arrives (flushed, so a crash leaves it) and queue it
    line by line, stamped with our clock. Longer lines than MAX_LINE are cut for parsing; the log has them whole."""
    pending = b""
    while not stop.is_set():
        if not select.select([fd], [], [], 0.1)[0]:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        log.write(chunk)
        log.flush()
        wall = time.perf_counter() - t0
        *lines, pending = (pending + chunk).split(b"\n")
        pending = pending[:MAX_LINE]
        for raw in lines:
            events.put(("line", _decode(raw), wall))
    if pending:
        events.put(("line", _decode(pending), time.perf_counter() - t0))
    events.put(("eof",))


def _decode(raw: bytes) -> str:
    return raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")


def _live_processes():
    """(pid, process group) of every process that has not exited; zombies have exited and are skipped."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:  # exited meanwhile
            continue
        state, _ppid, pgrp = stat[stat.rindex(b")") + 2:].split()[:3]  # the command name may hold spaces and ')'
        if state not in (b"Z", b"X"):
            yield int(name), int(pgrp)


def _group_alive(pgid: int) -> bool:
    """True while a process of the group is running. killpg(pgid, 0) alone is not enough: it counts zombies, and
    some container inits (this team's CI machines' among them) leave orphaned zombies unreaped for a long time."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(pgrp == pgid for _, pgrp in _live_processes())


def _wait_group_gone(pgid: int, seconds: float) -> bool:
    deadline = time.perf_counter() + seconds
    while _group_alive(pgid):
        if time.perf_counter() >= deadline:
            return False
        time.sleep(POLL)
    return True


def _stop_group(pgid: int) -> None:
    """SIGTERM the whole group, SIGKILL whatever is left after TERM_GRACE; returns at once if the group is gone."""
    for sig, wait in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, KILL_WAIT)):
        if not _group_alive(pgid):
            return
        with suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        if _wait_group_gone(pgid, wait):
            return


def _kill_escaped(run_id: str) -> bool:
    """Kill live processes tagged with this run's RATCHET_RUN_ID (they left the group with setsid); True if any.
    A fallback only: a process can rewrite its environment. The sandbox's PID namespace is the real guard."""
    tag = f"{RUN_ID_VAR}={run_id}".encode()
    return _kill_matching(lambda environ: tag in environ)


def kill_leftovers(run_dir_prefix: str) -> bool:
    """Kill runs a crashed Ratchet left behind: live processes whose RATCHET_RUN_DIR lies under the prefix."""
    prefix = f"RATCHET_RUN_DIR={run_dir_prefix}".encode()
    return _kill_matching(lambda environ: any(var.startswith(prefix) for var in environ))


def _kill_matching(match: Callable[[list[bytes]], bool]) -> bool:
    """SIGKILL every live process whose environment (a list of b"NAME=value") matches, until none is left."""
    found = False
    deadline = time.perf_counter() + KILL_WAIT
    while time.perf_counter() < deadline:
        tagged = []
        for pid, _ in _live_processes():
            with suppress(OSError):  # other users' processes are unreadable; ours may exit meanwhile
                if match(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
                    tagged.append(pid)
        if not tagged:
            break
        found = True
        for pid in tagged:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(POLL)
    return found


def _finish_reading(reader: threading.Thread, stop: threading.Event) -> bool:
    """Wait for the reader to see EOF; False when the pipe stays open, i.e. some process we did not find holds it."""
    reader.join(DRAIN_SECONDS)
    reached_eof = not reader.is_alive()
    stop.set()
    reader.join()
    return reached_eof


def _exit_reason(code: int, lines: list[str]) -> str:
    """"exit N: <the output line that best explains the crash>", the line cut to 200 characters."""
    head = f"exit {code}"
    if code < 0:
        with suppress(ValueError):
            head += f" ({signal.Signals(-code).name})"
    line = _error_line([RANK_PREFIX_RE.sub("", line) for line in lines])
    return f"{head}: {line[:200]}" if line else head


def _error_line(lines: list[str]) -> str:
    """The last "error: ..." line; else the exception line of the last Python traceback (skipping torchrun's
    ChildFailedError, which only says that a worker failed: the worker's traceback above it names the cause);
    else the last non-empty line that is not a rule of '=' or '-'."""
    for line in reversed(lines):
        if ERROR_LINE_RE.search(line):
            return line.strip()
    exceptions, in_traceback = [], False
    for line in lines:
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif in_traceback and line.strip() and not line[0].isspace():  # frames are indented; the exception is not
            in_traceback = False
            if "ChildFailedError" not in line:
                exceptions.append(line.strip())
    if exceptions:
        return exceptions[-1]
    return next((line.strip() for line in reversed(lines) if line.strip(" =-")), "")
