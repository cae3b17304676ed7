"""Launch the evaluator on a candidate's final weights, in a process of its own, and read back its result.

`evaluate(code_dir, weights, data_dir, tokens, window)` runs
    python -m agent.measure.evaluator --code WORKTREE --weights RUN/final.pt --data DATASET --tokens N --window T --result-fd FD
and returns its result, one JSON object:
    {"ok", "val_loss", "bits_per_byte", "tokens", "window", "causal", "probe_max_diff", "error", "seconds"}
Any failure, the candidate's or ours, is {"ok": false, "error": "<Type>: <message>"}, never a number.
The candidate's code runs in the child (agent/measure/evaluator.py says what it checks), never in this process.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from agent.guard.child_env import child_env
from agent.measure.evaluator import RESULT_KEYS

TRUSTED_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds the `agent` package


def evaluate(code_dir, weights, data_dir, tokens: int, window: int, batch: int = 8, device: str = "auto",
             probe_only: bool = False, timeout: float = 600, env: dict | None = None,
             python: str = sys.executable, wrap=None) -> dict:
    """Run the evaluator on `weights` with the model code of `code_dir` in a child process; return its result.

    The child imports `agent` from TRUSTED_ROOT (PYTHONPATH), never from the worktree, which it puts on sys.path only
    after `agent` is loaded. Its working directory is a fresh empty folder, and PYTHONSAFEPATH keeps even that off
    sys.path: the run directory is candidate-written and must not shadow `agent`, `torch` or `numpy`.
    `env` (default: this process's environment) reaches the child without secrets (agent/guard/child_env.py).
    `device` "auto" is decided here, where it can be trusted (`child_device`).
    """
    read_fd, write_fd = os.pipe()
    command = [python, "-m", "agent.measure.evaluator", "--code", str(Path(code_dir).resolve()),
               "--weights", str(Path(weights).resolve()), "--data", str(Path(data_dir).expanduser().resolve()),
               "--tokens", str(tokens), "--window", str(window), "--batch", str(batch),
               "--device", child_device(device, torch.cuda.is_available()),
               "--result-fd", str(write_fd)] + (["--probe-only"] if probe_only else [])
    env = child_env({"PYTHONPATH": str(TRUSTED_ROOT), "PYTHONSAFEPATH": "1"}, base=env)
    with tempfile.TemporaryDirectory(prefix="ratchet-eval-") as cwd, tempfile.TemporaryFile() as log:
        if wrap is not None:  # the sandbox: `wrap(command, writable_dir)` -> the command to launch
            command = wrap(command, Path(cwd))
        try:
            process = subprocess.Popen(command, cwd=cwd, env=env, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            os.close(write_fd)
        try:
            process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # the whole group, also on Ctrl-C: a timed-out evaluator and anything the candidate started
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        raw = _read_available(read_fd)
        log.seek(0)
        last_line = (log.read().decode(errors="replace").strip().splitlines() or [""])[-1]
    if timed_out:
        return _failure(f"evaluator timed out after {timeout:g}s: {last_line}", window)
    lines = raw.decode(errors="replace").splitlines()
    if process.returncode != 0 or not lines:
        return _failure(f"evaluator died: exit {process.returncode}: {last_line}", window)
    if len(lines) > 1:
        return _failure(f"the result pipe held {len(lines)} results: candidate code wrote to it", window)
    try:
        result = json.loads(lines[0])
    except json.JSONDecodeError as e:
        return _failure(f"unreadable evaluator result: {e}", window)
    if not isinstance(result, dict) or set(result) != set(RESULT_KEYS):
        return _failure(f"malformed evaluator result: {lines[0][:200]}", window)
    return result


def child_device(device: str, cuda_here: bool) -> str:
    """The evaluator's --device for `device`: "auto" becomes "cuda" where this (trusted) process sees CUDA, else
    "cpu". The evaluator runs on this machine, so it must find the GPUs too: with "cuda" it fails when they are
    hidden from it (a sandbox without the devices, a driver that fails inside it) rather than score on the CPU,
    which its own "auto" would do without a word. The run's CUDA is checked here, by trusted code."""
    if device != "auto":
        return device
    return "cuda" if cuda_here else "cpu"


def _read_available(fd: int) -> bytes:
    """Everything in the pipe now, without waiting for writers that outlived the group (a setsid'd grandchild)."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks)


def _failure(error: str, window: int) -> dict:
    result = dict.fromkeys(RESULT_KEYS)
    result.update(ok=False, tokens=0, window=window, error=error, seconds=0.0)
    return result
