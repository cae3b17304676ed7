"""`ratchet doctor` and `ratchet init` on this CPU machine and on fake GPU boxes, the CPU suite's own setting
(GPUs hidden, Triton interpreted), and `make gpu-check` where there is no GPU."""
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from agent.measure import box

from agent.ui import cli, doctor

from agent import settings
from agent.guard.child_env import child_env
from tests import conftest
from tests.fakerepo import REPO, make_real_repo

GPU_CHECKS = ("GPUs", "driver", "box shape", "C compiler", "runs: GPUs", "runs: Triton kernel")
NAMES = ["settings", "torch", "GPUs", "driver", "box shape", "C compiler", "bubblewrap", "runs: GPUs",
         "runs: all-reduce", "runs: Triton kernel", "runs: free disk", "data", "git identity"]
CPU_BOX = box.Gpus(nodes=0, smi=(), driver=None, torch_count=0, torch_mem_gib=None, torch_version="2.13.0",
                   torch_cuda="13.0")
BLIND = dataclasses.replace(CPU_BOX, nodes=8, driver="550.54.15")
H100S = dataclasses.replace(CPU_BOX, nodes=8, driver="580.65.06", torch_count=8, torch_mem_gib=79.1,
                            smi=(("NVIDIA H100 80GB HBM3", 79.6),) * 8)


@pytest.fixture
def repo(tmp_path, dataset, monkeypatch):
    root = make_real_repo(tmp_path / "target", dataset, baseline_runs=2)
    monkeypatch.chdir(root)
    return root


def doctor_json(root, path: str | None = None) -> tuple[int, dict]:
    """`ratchet doctor --json` as a command of its own, with PATH replaced when given."""
    env = child_env({} if path is None else {"PATH": path})
    done = subprocess.run([sys.executable, "-m", "agent.ui.cli", "doctor", "--json"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout + done.stderr[-2000:]
    return done.returncode, json.loads(lines[0])


def by_name(report: dict) -> dict:
    return {c["name"]: c for c in report["checks"]}


# ---------------------------------------------------------------------------------------------- doctor
@pytest.mark.sandbox
def test_doctor_json_on_this_cpu_machine_passes_with_gpu_checks_skipped(repo):
    code, report = doctor_json(repo)
    assert [c["name"] for c in report["checks"]] == NAMES
    assert all(set(c) == {"name", "ok", "skipped", "detail", "fix"} and c["detail"] for c in report["checks"])
    checks = by_name(report)
    for name in GPU_CHECKS:
        assert checks[name]["ok"] is None and checks[name]["skipped"] is True, checks[name]
    assert checks["bubblewrap"]["ok"] is True
    assert checks["runs: all-reduce"]["ok"] is True and checks["runs: all-reduce"]["detail"] == \
        "gloo over 2 ranks in the sandbox"
    assert checks["runs: free disk"]["ok"] is True and checks["settings"]["ok"] and checks["data"]["ok"]
    assert report["ok"] is True and code == 0
    assert not any(p.name.startswith(".doctor-") for p in (repo / "runs").iterdir())  # the probe's dir is gone


def test_doctor_without_bubblewrap_fails_that_check_with_the_install_line(repo, tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with git alone: no bwrap, no compiler, no nvidia-smi
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    code, report = doctor_json(repo, path=str(bin_dir))
    checks = by_name(report)
    assert checks["bubblewrap"] == {"name": "bubblewrap", "ok": False, "skipped": False,
                                    "detail": "bwrap not installed: apt-get install bubblewrap",
                                    "fix": "apt-get install bubblewrap"}
    # runs then go unsandboxed, and so does the probe: it still reports
    assert checks["runs: all-reduce"]["ok"] is True and "unsandboxed" in checks["runs: all-reduce"]["detail"]
    assert report["ok"] is False and code == 1


def test_gpus_and_driver_checks_fail_loudly_when_torch_is_blind_to_the_gpus():
    gpus, driver = doctor.gpus_check(BLIND), doctor.driver_check(BLIND)
    assert gpus.ok is False and "8 NVIDIA GPU(s) present (driver 550.54.15) but torch 2.13.0 sees none" in gpus.detail
    assert "upgrade the NVIDIA driver to >= 580" in gpus.fix
    assert driver.ok is False and "needs NVIDIA driver >= 580" in driver.detail
    hidden = dataclasses.replace(BLIND, visible="")  # the test suite's own setting, on a GPU box
    assert doctor.gpus_check(hidden).ok is None and "hidden from torch by CUDA_VISIBLE_DEVICES=''" in \
        doctor.gpus_check(hidden).detail
    assert doctor.driver_check(hidden).ok is None


def test_gpu_checks_on_a_gpu_box_report_what_they_found():
    gpus = doctor.gpus_check(H100S)
    assert gpus.ok is True and gpus.detail == "NVIDIA H100 80GB HBM3, 79 GiB each; torch sees 8 of 8"
    assert doctor.driver_check(H100S).detail == "580.65.06 (torch's CUDA 13.0 needs >= 580)"


def test_box_shape_check_names_the_settings_that_fit():
    s = settings.preset("gpt2-124m")
    six = dataclasses.replace(H100S, torch_count=6)
    check = doctor.shape_check(s, six)  # nproc 0: all 6 GPUs, and 512 does not split over 6
    assert check.ok is False and "does not split over 6 GPUs" in check.detail and "[train] nproc = 4" in check.fix
    small = dataclasses.replace(H100S, torch_mem_gib=39.4)
    check = doctor.shape_check(s, small)
    assert check.ok is False and "micro-batch 32 needs ~49.6 GiB" in check.detail
    assert "--micro_batch_size 16 at the end of [train] command" in check.fix
    box.configure(s, small.torch_count, small.mem_gib)
    check = doctor.shape_check(s, small)
    assert check.ok is True and "micro-batch 16 x 4" in check.detail and "~3.0 h a run (estimated)" in check.detail
    assert doctor.shape_check(s, CPU_BOX).ok is None


def test_compiler_check_is_needed_on_gpu_boxes_only(monkeypatch, tmp_path):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'fatal error: Python.h: No such file or directory' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    check = doctor.compiler_check(cuda=True)
    assert check.ok is False and "Python.h: No such file" in check.detail and "build-essential python3-dev" in check.fix
    assert doctor.compiler_check(cuda=False).ok is None
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    assert doctor.compiler_check(cuda=True).detail.endswith("missing-cc not found")


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("clang") is None, reason="no C compiler here")
def test_compiler_check_compiles_against_this_pythons_header(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    check = doctor.compiler_check(cuda=True)
    assert check.ok is True and "compiles against" in check.detail and "Python.h" in check.detail


def test_probe_findings_become_checks_with_fixes(tmp_path):
    s = settings.preset("gpt2-research")
    found = {"ranks": 2, "backend": "nccl", "allreduce": "DistBackendError: NCCL error", "gpus": 0, "free_gib": 2.0,
             "triton": "CalledProcessError: Command '['/usr/bin/gcc', ...]' returned non-zero exit status 1."}
    where = "in the sandbox"
    visible = doctor._visible_check(found, s, H100S, where)
    assert visible.ok is False and "0 GPU(s) visible in the sandbox, torch sees 8 outside" in visible.detail
    allreduce = doctor._allreduce_check(found, where)
    assert allreduce.ok is False and "NCCL_DEBUG=INFO" in allreduce.fix
    triton = doctor._triton_check(found, True, where)
    assert triton.ok is False and triton.fix == doctor.COMPILER_FIX
    disk = doctor._disk_check(found, tmp_path)
    assert disk.ok is False and "2.0 GiB free" in disk.detail


# ---------------------------------------------------------------------------------------------- init
def test_init_refuses_to_write_a_cpu_preset_on_a_gpu_box_torch_cannot_see(repo, monkeypatch, capsys):
    (repo / "ratchet.toml").unlink()
    monkeypatch.setattr(box, "detect", lambda: BLIND)
    assert cli.main(["init"]) == 2
    err = capsys.readouterr().err
    assert "sees none" in err and ">= 580" in err and "--preset cpu-tiny" in err
    assert not (repo / "ratchet.toml").exists()


def test_init_fits_the_box_and_applies_set(repo, dataset, monkeypatch, capsys):
    monkeypatch.setattr(box, "detect", lambda: dataclasses.replace(H100S, torch_count=6, torch_mem_gib=39.4))
    monkeypatch.setattr(doctor, "run", lambda root, gpus: [])  # the probe would want NCCL on these fake GPUs
    assert cli.main(["init", "--force", "--preset", "gpt2-research", "--set", f'train.data = "{dataset}"',
                     "--set", "judge.max_pairs = 2", "--set", "judge.min_pairs = 2"]) == 0
    s = settings.load(repo)
    assert s.train.nproc == 4 and box.command_micro_batch(s.train.command) == 16
    assert (s.train.data, s.judge.min_pairs, s.judge.max_pairs, s.train.config) == (str(dataset), 2, 2, "gpt2-research")
    assert "4 GPU process(es), micro-batch 16" in capsys.readouterr().err


def test_init_preset_and_set_need_force_over_an_existing_toml_and_bad_assignments_are_named(repo, capsys):
    before = (repo / "ratchet.toml").read_text()
    assert cli.main(["init", "--set", "judge.max_pairs = 2"]) == 2
    assert "(add --force)" in " ".join(capsys.readouterr().err.split())  # rich folds the line
    assert cli.main(["init", "--preset", "cpu-tiny"]) == 2  # `make run PRESET=cpu-tiny` over another preset's file
    assert "(add --force)" in " ".join(capsys.readouterr().err.split())
    assert (repo / "ratchet.toml").read_text() == before
    assert cli.main(["init", "--force", "--set", "judge.nope = 2"]) == 2
    assert "unknown key [judge] nope" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the CPU suite
@pytest.mark.skipif(not conftest.CPU_SUITE, reason="TRITON_INTERPRET=0: the GPU run of the kernel tests")
def test_the_suite_hides_the_gpus_and_interprets_triton_for_itself_and_its_children():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ["TRITON_INTERPRET"] == "1"
    assert torch.cuda.device_count() == 0
    code = ("import os, torch; "
            "print(torch.cuda.device_count(), repr(os.environ['CUDA_VISIBLE_DEVICES']), os.environ['TRITON_INTERPRET'])")
    out = subprocess.run([sys.executable, "-c", code], env=child_env({}), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "''", "1"]


def test_cpu_suite_hides_gpus_unless_triton_interpret_0_asks_for_them():
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert conftest.cpu_suite(env) is True and env == {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    env = {"TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert conftest.cpu_suite(env) is False and env == {"TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "0,1"}


# ---------------------------------------------------------------------------------------------- make gpu-check
@pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")), reason="a GPU box: gpu-check would run for real")
def test_gpu_check_without_a_gpu_fails_at_once_with_one_line():
    done = subprocess.run([str(REPO / "scripts" / "gpu-check")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "gpu-check: no NVIDIA GPU on this machine (no /dev/nvidia[0-9]* device): nothing to check here"]
