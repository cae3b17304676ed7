"""A training module run under torch.profiler: `python profiled_train.py MODULE [ARG...]` does what
`python -m MODULE [ARG...]` does (and likewise as torchrun's program), and leaves a profile of a few steps.

agent/measure/profile.py rewrites the training command to this and reads what it writes. Started by its file path,
never as `-m agent...`: this process must not import the `agent` package, because the training's own packages
come from PYTHONPATH (the worktree) and Ratchet's root may hold other copies of them (`nanomodel` beside `agent`
in Ratchet's own repository). It imports only the standard library and torch before the training module.

Steps: torch's global optimizer post-hook steps the profiler after each optimizer step of the first optimizer that
steps (a training loop with two optimizers still counts training steps, not optimizer steps). Profiler step s is
training step s, from the end of optimizer step s-1 to the end of optimizer step s: WAIT steps skip start-up and
compilation, WARMUP starts the profiler, ACTIVE steps are recorded. The device is synchronised at both ends of the
active window (not inside it), so the window's wall-clock holds all of its device work.

Output: at the end of the window, rank 0 writes PROFILE_FILE into RATCHET_RUN_DIR (every rank is profiled, so that
the profiler's overhead is the same on all of them):
    {"version": 1, "measure": "cuda" | "cpu", "world_size": n, "steps": ACTIVE,
     "wall_us": the active steps' wall-clock, "busy_us": time in which at least one measured event ran,
     "ops": [{"name", "device": "cpu" | "cuda", "in_optimizer", "count", "self_us"}, ...]}
Rows are what key_averages() makes of the events, split by whether they ran in an optimizer step (`optimizer_test`):
self time on the row's own device (a CUDA kernel's device time; an operator's CPU time outside its children).
"measure" says which side counts: CUDA kernels where CUDA is up, else CPU operators. The profiler's ProfilerStep
ranges and record-function ranges mirrored on the GPU timeline are left out: they cover other events and would
count their time twice.

Trust: this is Ratchet's code, but it runs inside the candidate's process, which can patch the profiler, the hook or
the clock, or write the file itself. The profile is information for the model, never a verdict: no decision reads it.
"""
import os
import sys

# run by its path, this file's folder comes first on sys.path: its modules (profile.py) must not shadow the standard
# library's (cProfile imports `profile`), so it goes before anything else is imported
if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    del sys.path[0]

import json
import runpy
import time

import torch
from torch.autograd import DeviceType
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

WAIT, WARMUP, ACTIVE = 2, 1, 3  # training steps: skipped (start-up, compilation), profiler warm-up, recorded
STEPS = WAIT + WARMUP + ACTIVE  # the run's length: the window closes at its last optimizer step
PROFILE_FILE = "profile.json"
VERSION = 1
MAX_NAME = 1000  # characters of an event name kept: kernel names spell out C++ templates, the categories read them
STEP_MARKER = "ProfilerStep"  # the profiler's own range around each step ("ProfilerStep*" once parsed)
OPTIMIZER_MARKER = "Optimizer.step#"  # torch's range around every optimizer step ("Optimizer.step#AdamW.step")


class Window:
    """The recorded steps as the optimizer hook sees them: our wall-clock at both ends."""

    def __init__(self, prof: profile, cuda: bool):
        self.prof = prof
        self.cuda = cuda
        self.optimizer = None  # the first optimizer that steps: its steps are the training steps
        self.start: float | None = None
        self.end: float | None = None

    def on_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self.optimizer is None:
            self.optimizer = optimizer
        if optimizer is not self.optimizer:
            return
        ended = self.prof.step_num  # the training step that ends now
        if ended in (WAIT + WARMUP - 1, STEPS - 1):  # the step before the window, the window's last step
            self.synchronize()
        if ended == STEPS - 1:
            self.end = time.perf_counter()
        self.prof.step()  # at the window's end this stops the profiler and calls `write` (on_trace_ready)
        if ended == WAIT + WARMUP - 1:
            self.start = time.perf_counter()

    def synchronize(self) -> None:
        if self.cuda and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def write(self, prof: profile) -> None:
        """on_trace_ready: rank 0 writes the summary, once the whole window has been recorded."""
        if self.start is None or self.end is None or int(os.environ.get("RANK", 0)) != 0:
            return
        measure = DeviceType.CUDA if self.cuda else DeviceType.CPU
        events = prof.events()
        in_optimizer = optimizer_test(events)
        counted = [e for e in events if counts(e)]
        rows: dict[tuple[str, str, bool], dict] = {}  # like key_averages(), also keyed by in_optimizer
        for e in counted:
            key = (e.key[:MAX_NAME], device_name(e.device_type), in_optimizer(e))
            row = rows.setdefault(key, {"name": key[0], "device": key[1], "in_optimizer": key[2], "count": 0,
                                        "self_us": 0.0})
            row["count"] += 1
            row["self_us"] += e.self_cpu_time_total if e.device_type == DeviceType.CPU else e.self_device_time_total
        summary = {"version": VERSION, "measure": device_name(measure),
                   "world_size": int(os.environ.get("WORLD_SIZE", 1)), "steps": ACTIVE,
                   "wall_us": (self.end - self.start) * 1e6,
                   "busy_us": union_us([e.time_range for e in counted if e.device_type == measure]),
                   "ops": list(rows.values())}
        run_dir = os.environ.get("RATCHET_RUN_DIR", "out")
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, PROFILE_FILE), "w") as f:
            json.dump(summary, f)


def counts(event) -> bool:
    """An event whose self time is its own: not a ProfilerStep range (it covers the whole step), not a
    record-function range mirrored on the device timeline, not an event that ended elsewhere than it began (the
    last step's Optimizer.step range, still open when the profiler stops)."""
    if event.key.startswith(STEP_MARKER) or event.is_async:
        return False
    return event.device_type == DeviceType.CPU or not event.is_user_annotation


def optimizer_test(events):
    """A test: was this event part of an optimizer step? A CPU event is when it starts inside an Optimizer.step
    range of its thread; a device event (a kernel) is when the CPU operator that launched it (linked by correlation
    id, as torch's own profiler links them) is. By time rather than by the event tree: the hook steps the profiler
    from inside Optimizer.step, so the window's last Optimizer.step range never closes and has no children."""
    ranges: dict[int, list] = {}  # thread -> Optimizer.step time ranges on it
    for e in events:
        if e.device_type == DeviceType.CPU and e.key.startswith(OPTIMIZER_MARKER):
            ranges.setdefault(e.thread, []).append(e.time_range)
    launchers = {e.id: e for e in events if e.device_type == DeviceType.CPU and e.linked_correlation_id == 0}

    def in_optimizer(event) -> bool:
        if event.device_type != DeviceType.CPU:
            event = launchers.get(event.linked_correlation_id)
            if event is None:
                return False
        return any(r.start <= event.time_range.start < r.end for r in ranges.get(event.thread, ()))
    return in_optimizer


def device_name(device_type: DeviceType) -> str:
    return "cpu" if device_type == DeviceType.CPU else "cuda"


def union_us(ranges) -> float:
    """Microseconds covered by at least one of the intervals (streams and threads overlap)."""
    total, reach = 0.0, float("-inf")
    for r in sorted(ranges, key=lambda r: r.start):
        if r.end > reach:
            total += r.end - max(r.start, reach)
            reach = r.end
    return total


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: profiled_train.py MODULE [ARG...]")
    module, *args = argv
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1))
    window = Window(prof, cuda)
    prof.on_trace_ready = window.write
    register_optimizer_step_post_hook(window.on_optimizer_step)
    sys.argv = [module, *args]  # run_module puts the module's path in argv[0]; the training parses argv[1:]
    with prof:
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
