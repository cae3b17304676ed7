"""agent/measure/runner.py: timing from outside, progress parsing, early abort, and no process outliving a run.

Training commands here are tiny scripts (Python or sh). Each run's environment carries a marker of the test's own,
inherited by every descendant, so `live_with_mark` checks for leftovers independently of the runner's tag.
"""
import dataclasses
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

from agent.measure import runner
from agent.guard.child_env import child_env
from agent.guard.redaction import is_secret_name
from agent.measure.runner import (OUTLIVED, AbortPolicy, Progress, RunnerError, cpu_threads_per_rank, parse_progress,
                          run_training)

MARK = "RUNNER_TEST_MARK"


def live_with_mark(mark: str) -> list[int]:
    """Pids of running processes whose environment holds the marker (a zombie's environment reads empty)."""
    tag = f"{MARK}={mark}".encode()
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = open(f"/proc/{name}/environ", "rb").read()
        except OSError:
            continue
        if tag in environ.split(b"\0"):
            pids.append(int(name))
    return pids


def launch(tmp_path, cmd: list[str], **kwargs):
    """run_training with a fresh marker in the environment; returns (result, marker)."""
    mark = uuid.uuid4().hex
    env = child_env({MARK: mark, "PYTHONUNBUFFERED": "1"})
    kwargs.setdefault("timeout", 20)
    result = run_training(cmd, cwd=tmp_path, env=env, log_path=tmp_path / "exp" / "run.log", **kwargs)
    return result, mark


def python(tmp_path, source: str) -> list[str]:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(source))
    return [sys.executable, str(path)]


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


# progress lines

def test_parse_progress_valid():
    assert parse_progress("step 12/40 loss 4.1234 elapsed 3.21s\r", 5.0) == Progress(12, 40, 4.1234, 3.21, 5.0)


@pytest.mark.parametrize("line", [
    "",
    "step 12/40 loss 4.1234 elapsed 3.21",          # no unit
    "step 12/40 loss 4.1234 elapsed 3.21s extra",   # trailing text
    "[rank0]: step 12/40 loss 4.1234 elapsed 3.21s",  # prefix
    "Step 12/40 loss 4.1234 elapsed 3.21s",
    "step 41/40 loss 4.1234 elapsed 3.21s",         # past the end
    "step 0/0 loss 4.1234 elapsed 3.21s",
    "step x/40 loss 4.1234 elapsed 3.21s",
    "step 12/40 loss 4,12 elapsed 3.21s",
    "step 1234567890123/99999999999999 loss 4.1234 elapsed 3.21s",  # absurd step counts
])
def test_parse_progress_rejects_malformed(line):
    assert parse_progress(line, 1.0) is None


def test_parse_progress_keeps_nan_and_inf():
    assert math.isnan(parse_progress("step 3/40 loss nan elapsed 1.00s", 1.0).loss)
    assert parse_progress("step 3/40 loss -inf elapsed 1.00s", 1.0).loss == -math.inf


# runs

def test_normal_run_is_timed_from_outside_and_logged(tmp_path):
    cmd = python(tmp_path, """
        import os, time
        print("starting", os.environ["RATCHET_RUN_ID"] != "", os.getsid(0) == os.getpid())
        for step in range(1, 4):
            time.sleep(0.1)
            print(f"step {step}/3 loss {5 - step:.4f} elapsed 99.00s")  # a self-report we must not believe
    """)
    log_path = tmp_path / "exp" / "run.log"
    seen_in_log, progress = [], []
    on_line = lambda line: seen_in_log.append(line in log_path.read_text())  # written before we are told
    result, _ = launch(tmp_path, cmd, on_line=on_line, on_progress=progress.append)
    assert (result.status, result.exit_code, result.reason, result.survivors) == ("ok", 0, "", False)
    assert result.seconds >= 0.3
    assert [p.step for p in result.curve] == [1, 2, 3] and progress == result.curve
    assert result.curve[-1].elapsed == 99.0 and result.curve[-1].wall <= result.seconds
    assert all(a.wall < b.wall for a, b in zip(result.curve, result.curve[1:]))
    assert seen_in_log == [True] * 4
    assert log_path.read_text().splitlines()[0] == "starting True True"  # tagged, leads its own session
    assert json.loads(json.dumps(dataclasses.asdict(result)))["curve"][0]["step"] == 1


def test_crash_reason_is_the_exception_line(tmp_path):
    cmd = python(tmp_path, """
        print("step 1/4 loss 5.0000 elapsed 0.10s")
        def train(): return 1 / 0
        train()
    """)
    result, _ = launch(tmp_path, cmd)
    assert (result.status, result.exit_code) == ("crashed", 1)
    assert result.reason == "exit 1: ZeroDivisionError: division by zero"
    assert "Traceback" in open(result.log_path).read() and len(result.curve) == 1


def test_crash_prefers_the_error_line_and_cuts_it(tmp_path):
    cmd = python(tmp_path, """
        import sys
        print("error: shard missing " + "x" * 500, file=sys.stderr)
        print("cleaning up")
        sys.exit(2)
    """)
    result, _ = launch(tmp_path, cmd)
    assert result.status == "crashed"
    assert result.reason.startswith("exit 2: error: shard missing xxx") and len(result.reason) == len("exit 2: ") + 200


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_torchrun_crash_names_the_worker_exception(tmp_path):
    script = python(tmp_path, """
        print("step 1/4 loss 5.0000 elapsed 0.10s")
        1 / 0
    """)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", script[1]]
    result, mark = launch(tmp_path, cmd, timeout=60)
    assert result.reason == "exit 1: ZeroDivisionError: division by zero"  # not torchrun's ChildFailedError
    assert len(result.curve) == 1 and live_with_mark(mark) == []


def test_timeout_kills_a_silent_group(tmp_path):
    result, mark = launch(tmp_path, sh("sleep 30 & sleep 30 & sleep 30"), timeout=0.5)
    assert (result.status, result.reason, result.survivors) == ("timeout", "timed out after 0.5s", False)
    assert result.seconds < 30
    assert live_with_mark(mark) == []


def test_timeout_escalates_to_sigkill(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "TERM_GRACE", 0.2)
    result, mark = launch(tmp_path, sh("trap '' TERM; sleep 30 & sleep 30"), timeout=0.5)
    assert (result.status, result.exit_code) == ("timeout", -signal.SIGKILL)
    assert live_with_mark(mark) == []


def test_monitor_abort_kills_quickly(tmp_path):
    cmd = python(tmp_path, """
        import subprocess, time
        subprocess.Popen(["sleep", "30"])
        for step in range(1, 401):
            print(f"step {step}/400 loss 5.0000 elapsed {step * 0.05:.2f}s")
            time.sleep(0.05)
    """)
    calls = []
    monitor = lambda p: calls.append(p.step) or ("too slow" if p.step == 3 else None)
    result, mark = launch(tmp_path, cmd, monitor=monitor)
    assert (result.status, result.reason, result.survivors) == ("aborted", "too slow", False)
    assert calls == [1, 2, 3]  # never consulted after the abort
    assert result.seconds < 20  # the child alone would have run 20 s
    assert live_with_mark(mark) == []


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler, also when pytest was started in the background (which ignores SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_keyboard_interrupt_kills_the_group_and_propagates(tmp_path, ctrl_c_raises):
    def interrupt(line):
        if line == "ready":
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this (the harness's) process
    mark = uuid.uuid4().hex
    env = child_env({MARK: mark})
    with pytest.raises(KeyboardInterrupt):
        run_training(sh("sleep 30 & echo ready; sleep 30"), cwd=tmp_path, env=env, log_path=tmp_path / "run.log",
                     timeout=20, on_line=interrupt)
    assert live_with_mark(mark) == []
    assert (tmp_path / "run.log").read_text() == "ready\n"


def test_background_child_within_grace_is_timed(tmp_path):
    result, _ = launch(tmp_path, sh("sleep 0.5 & echo leader done"), grace=5)
    assert (result.status, result.survivors) == ("ok", False)
    assert result.seconds >= 0.5  # the group's exit, not the leader's


def test_lingering_child_is_killed_and_flagged(tmp_path):
    result, mark = launch(tmp_path, sh("sleep 30 & echo leader done"), grace=0.3)
    assert (result.status, result.exit_code, result.reason, result.survivors) == ("crashed", 0, OUTLIVED, True)
    assert live_with_mark(mark) == []


def test_setsid_escapee_is_found_by_its_tag(tmp_path):
    cmd = python(tmp_path, """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    """)
    result, mark = launch(tmp_path, cmd, grace=0.3)
    assert (result.status, result.reason, result.survivors) == ("crashed", OUTLIVED, True)
    assert live_with_mark(mark) == []


def test_untagged_escapee_holding_the_output_is_flagged(tmp_path):
    # Left the group and wiped its environment: only the still-open output pipe gives it away.
    cmd = python(tmp_path, """
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True, env={})
        print("escapee", p.pid)
    """)
    result, _ = launch(tmp_path, cmd, grace=0.3)
    pid = int(open(result.log_path).read().split()[1])
    try:
        assert (result.status, result.reason, result.survivors) == ("crashed", OUTLIVED, True)
    finally:
        os.kill(pid, signal.SIGKILL)


def test_zombies_do_not_keep_a_group_alive():
    # Some container inits leave orphaned zombies unreaped; killpg still counts them, the runner must not.
    proc = subprocess.Popen(["true"], start_new_session=True)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        os.killpg(proc.pid, 0)
        assert not runner._group_alive(proc.pid)
    finally:
        proc.wait()


def test_bad_arguments_raise_runner_error(tmp_path):
    with pytest.raises(RunnerError, match="non-empty"):
        run_training([], cwd=tmp_path, env={}, log_path=tmp_path / "run.log", timeout=1)
    with pytest.raises(RunnerError, match="timeout"):
        run_training(["true"], cwd=tmp_path, env={}, log_path=tmp_path / "run.log", timeout=0)
    with pytest.raises(RunnerError, match="no-such-trainer"):
        run_training(["no-such-trainer"], cwd=tmp_path, env={}, log_path=tmp_path / "run.log", timeout=1)


# abort policy, on synthetic curves: 40 steps, incumbent 20 s

def steady(seconds_per_step: float, start: float = 0.0, loss: float = 5.0) -> list[Progress]:
    return [Progress(s, 40, loss, 0.0, start + seconds_per_step * s) for s in range(1, 41)]


def first_abort(policy: AbortPolicy, curve: list[Progress]) -> tuple[int, str] | None:
    return next(((p.step, reason) for p in curve if (reason := policy(p)) is not None), None)


def test_pace_rule_aborts_a_slow_run_at_min_fraction():
    # 0.75 s/step: at step 6 (15%) wall 4.5 s, pace 30 s per run -> 4.5 + 0.85 * 30 = 30 s projected
    assert first_abort(AbortPolicy(20.0, []), steady(0.75)) == (6, "slower: projected 30.0s vs incumbent 20.0s at step 6/40")


def test_pace_rule_tolerates_slack_and_a_slow_start():
    assert first_abort(AbortPolicy(20.0, []), steady(0.5 * 1.03)) is None  # 3% slower, within the slack
    # an 8 s first step (compilation) then 0.25 s/step: 17.75 s in all. The average pace at step 6
    # (9.25 s for 15%) would project 62 s; the recent pace does not.
    compiled = [Progress(s, 40, 5.0, 0.0, 8.0 + 0.25 * (s - 1)) for s in range(1, 41)]
    assert first_abort(AbortPolicy(20.0, []), compiled) is None


def test_loss_rule_compares_the_recent_mean_at_the_same_steps():
    incumbent = [Progress(s, 40, loss, 0.0, 0.5 * s) for s, loss in [(10, 6.0), (20, 5.0), (30, 4.5), (40, 4.0)]]
    policy = AbortPolicy(20.0, incumbent)
    assert policy(Progress(4, 40, 9.0, 0.0, 2.0)) is None      # before min_fraction
    # ~0.2 nats above the incumbent, and one hard batch at step 22 (+2 nats): the 3-line mean stays within 1 nat
    for step, loss in [(15, 5.7), (20, 5.2), (22, 6.9), (25, 4.95), (28, 4.8), (31, 6.5)]:
        assert policy(Progress(step, 40, loss, 0.0, 0.5 * step)) is None, step
    # the model has gone wrong: the mean of steps 28-34 is 5.97 where the incumbent's is 4.45
    assert policy(Progress(34, 40, 6.6, 0.0, 17.0)) == "loss 5.97 at steps 28-34 vs incumbent 4.45"


def test_nan_rule_and_baseline_without_incumbent():
    baseline = AbortPolicy()
    assert baseline(Progress(1, 40, math.nan, 0.0, 1.0)) == "loss is nan at step 1"
    assert baseline(Progress(3, 40, math.inf, 0.0, 1.0)) == "loss is inf at step 3"
    assert first_abort(AbortPolicy(), steady(10.0, loss=50.0)) is None  # slow and bad, but nothing to compare with
    with pytest.raises(RunnerError, match="incumbent_seconds"):
        AbortPolicy(incumbent_seconds=math.nan)


# environment

def test_child_env_drops_secrets_and_parent_ratchet_vars_but_keeps_the_user_knobs():
    base = {"PATH": "/bin", "HOME": "/h", "OMP_NUM_THREADS": "8", "ANTHROPIC_API_KEY": "a", "OPENAI_API_KEY": "o",
            "HF_TOKEN": "h", "GITHUB_TOKEN": "g", "AWS_ACCESS_KEY_ID": "k", "AWS_REGION": "r", "DB_PASSWORD": "p",
            "SSH_AUTH_SOCK": "s", "GOOGLE_APPLICATION_CREDENTIALS": "c", "client_secret": "x", "DB_PASSWD": "q",
            "GPG_PRIVATE": "z", "RATCHET_SEED": "1", "RATCHET_RUN_ID": "parent", "RATCHET_KERNELS": "reference"}
    env = child_env({"RATCHET_RUN_DIR": "/run", "OMP_NUM_THREADS": "2"}, base=base)
    assert env == {"PATH": "/bin", "HOME": "/h", "OMP_NUM_THREADS": "2", "RATCHET_RUN_DIR": "/run",
                   "RATCHET_KERNELS": "reference"}
    assert base["RATCHET_SEED"] == "1"  # the caller's mapping is untouched
    # one definition of a secret: what the children never see is what the ledger and logs redact
    assert all(is_secret_name(k) for k in set(base) - set(env) if not k.startswith("RATCHET_"))


def test_cpu_threads_per_rank():
    assert cpu_threads_per_rank(1) == len(os.sched_getaffinity(0))
    assert cpu_threads_per_rank(10_000) == 1
    with pytest.raises(RunnerError, match="nproc"):
        cpu_threads_per_rank(0)
