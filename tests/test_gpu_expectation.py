"""On a machine whose GPUs Ratchet sees, runs and evaluations must see them too: a CUDA failure inside the sandbox
stops them with a reason instead of letting them train or score on the CPU without a word."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from agent.guard.child_env import EXPECT_CUDA, child_env, expect_cuda
from agent.measure.captured import EvalError
from agent.measure.evaluate import child_device, evaluate
from agent.measure.evaluator import parse_args, run
from agent.measure.devices import Devices

REPO = Path(__file__).resolve().parent.parent


def test_a_gpu_machine_tells_each_run_how_many_gpus_it_must_see():
    assert expect_cuda(8, cuda_here=True) == {EXPECT_CUDA: "8"}
    assert expect_cuda(1, cuda_here=False) == {}
    assert EXPECT_CUDA not in child_env({}, base={EXPECT_CUDA: "8"})  # only the harness sets it, never the parent


@pytest.mark.parametrize("cuda_here", [True, False])
def test_the_harness_gives_the_expectation_to_its_runs(monkeypatch, tmp_path, cuda_here):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_here)
    devices = SimpleNamespace(sandboxed=False, nproc=2, train_data_view=lambda: tmp_path)
    env = Devices.env(devices, tmp_path, tmp_path / "run", seed=1)
    assert env.get(EXPECT_CUDA) == ("2" if cuda_here else None)


def run_train(tmp_path, env_extra: dict) -> subprocess.CompletedProcess:
    """nanomodel.train on cpu-test, pointed at a data dir that does not exist (a run that got that far fails there)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RATCHET_RUN_DIR": str(tmp_path / "run"),
           "RATCHET_TRAIN_DATA": str(tmp_path / "no-data"), **env_extra}
    return subprocess.run([sys.executable, "-m", "nanomodel.train", "--config", "cpu-test"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_training_told_to_expect_more_gpus_than_it_sees_stops_before_anything_is_built(tmp_path):
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    stopped = run_train(tmp_path, {EXPECT_CUDA: str(found + 1)})
    assert stopped.returncode == 1
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"error: expected {found + 1} CUDA devices ({EXPECT_CUDA}={found + 1}), this process sees {found}: "
        f"the GPUs or their driver are not reachable here")
    assert "nanomodel:" not in stopped.stdout  # no model was built, no step taken
    untold = run_train(tmp_path, {})  # without the expectation the same run gets as far as the (missing) data
    assert untold.returncode == 1 and "CUDA" not in untold.stderr and "no-data" in untold.stderr, untold.stderr


def test_the_evaluator_is_asked_for_cuda_where_the_harness_sees_it(monkeypatch, tmp_path):
    assert (child_device("auto", cuda_here=True), child_device("auto", cuda_here=False)) == ("cuda", "cpu")
    assert child_device("cpu", cuda_here=True) == "cpu"
    argv = tmp_path / "argv"
    python = tmp_path / "python"  # records the evaluator's command line instead of evaluating
    python.write_text(f'#!/bin/sh\necho "$@" > {argv}\n')
    python.chmod(0o755)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = evaluate(tmp_path, tmp_path / "final.pt", tmp_path, tokens=64, window=16, python=str(python))
    assert not result["ok"]
    assert " --device cuda " in f" {argv.read_text().strip()} "


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_an_evaluator_asked_for_cuda_without_it_fails_rather_than_scoring_on_the_cpu(tmp_path):
    args = parse_args(["--code", str(tmp_path), "--weights", str(tmp_path / "final.pt"), "--data", str(tmp_path),
                       "--tokens", "64", "--window", "16", "--device", "cuda", "--out", str(tmp_path / "result")])
    with pytest.raises(EvalError, match="--device cuda: no CUDA device is available"):
        run(args, {})
