"""`python` and `torchrun` in a run's command are Ratchet's own, whatever comes first on PATH."""
import os
import subprocess
import sys

import pytest

from agent.measure.launcher import resolve_launcher


@pytest.fixture
def foreign_path(tmp_path, monkeypatch):
    """A PATH whose first directory holds another `python`, `python3` and `torchrun` (a system or conda one) that
    would leave a mark if they ever ran."""
    marker = tmp_path / "foreign-ran"
    for name in ("python", "python3", "torchrun"):
        script = tmp_path / name
        script.write_text(f"#!/bin/sh\ntouch {marker}\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return marker


def test_torchrun_is_ratchets_own_even_when_another_comes_first_on_path(foreign_path):
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "nanomodel.train", "--config", "cpu-test"]
    assert resolve_launcher(cmd) == [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]


@pytest.mark.parametrize("name", ["python", "python3"])
def test_python_is_ratchets_own_interpreter(foreign_path, name):
    resolved = resolve_launcher([name, "-c", "import sys; print(sys.executable)"])
    ran = subprocess.run(resolved, capture_output=True, text=True, timeout=60)
    assert ran.stdout.strip() == sys.executable, ran.stderr
    assert not foreign_path.exists()


def test_any_other_command_is_taken_as_written():
    assert resolve_launcher(["/opt/conda/bin/torchrun", "-m", "x"]) == ["/opt/conda/bin/torchrun", "-m", "x"]
