"""The box: GPUs counted apart from torch (fake device nodes, driver files and nvidia-smi), and the run shape `fit`
picks for a config on a number of GPUs of some memory (pure arithmetic: no GPU needed)."""
import dataclasses

import pytest

from agent.measure import box

from agent import settings
from nanomodel.config import get_config

GPT2_124M, GPT2_RESEARCH = get_config("gpt2-124m"), get_config("gpt2-research")
BLIND = box.Gpus(nodes=8, smi=(), driver="550.54.15", torch_count=0, torch_mem_gib=None, torch_version="2.13.0",
                 torch_cuda="13.0")


# ---------------------------------------------------------------------------------------------- what is there
def test_detect_counts_device_nodes_reads_the_driver_and_asks_nvidia_smi(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm", "nvidia-caps"):
        (dev / name).touch()
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
                       "(dvs-builder@U16-I3-B03-4-3)  Tue Jul 29 2025\nGCC version:  gcc version 12.2.0\n")
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\nprintf "NVIDIA H100 80GB HBM3, 81559, 580.65.06\\nNVIDIA H100 80GB HBM3, 81559, '
                   '580.65.06\\n"\n')
    smi.chmod(0o755)
    g = box.detect(nodes=str(dev / "nvidia[0-9]*"), driver_file=str(version), nvidia_smi=str(smi))
    assert g.nodes == 3 and g.driver == "580.65.06" and g.present == 3
    assert [name for name, _ in g.smi] == ["NVIDIA H100 80GB HBM3"] * 2
    assert g.smi[0][1] == pytest.approx(79.65, abs=0.01)


def test_the_proprietary_driver_line_and_nvidia_smi_alone_give_the_driver(tmp_path):
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n")
    g = box.detect(nodes=str(tmp_path / "none[0-9]*"), driver_file=str(version), nvidia_smi="nvidia-smi-missing")
    assert (g.driver, g.nodes, g.smi) == ("550.54.15", 0, ())
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "NVIDIA A100-SXM4-40GB, 40960, 535.104.05"\n')
    smi.chmod(0o755)
    g = box.detect(nodes=str(tmp_path / "none[0-9]*"), driver_file=str(tmp_path / "absent"), nvidia_smi=str(smi))
    assert g.driver == "535.104.05" and g.present == 1 and g.mem_gib == pytest.approx(40.0)


def test_a_failing_nvidia_smi_counts_nothing(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.'\n"
                   "exit 9\n")
    smi.chmod(0o755)
    g = box.detect(nodes=str(tmp_path / "none[0-9]*"), driver_file=str(tmp_path / "absent"), nvidia_smi=str(smi))
    assert (g.smi, g.driver, g.present) == ((), None, 0)


def test_torch_blind_to_gpus_under_an_old_driver_says_so_with_both_fixes():
    problem, fix = box.torch_blind(BLIND)
    assert "8 NVIDIA GPU(s) present (driver 550.54.15) but torch 2.13.0 sees none" in problem
    assert "CUDA 13.0" in problem and ">= 580" in problem
    assert "upgrade the NVIDIA driver to >= 580" in fix and "a torch build for CUDA 12" in fix


def test_torch_blind_with_a_cpu_build_or_a_new_enough_driver():
    problem, fix = box.torch_blind(dataclasses.replace(BLIND, torch_cuda=None))
    assert "CPU-only build" in problem and "CUDA build of torch" in fix
    problem, fix = box.torch_blind(dataclasses.replace(BLIND, driver="580.65.06"))
    assert "sees none" in problem and "CUDA_VISIBLE_DEVICES" in fix
    assert box.driver_too_old(dataclasses.replace(BLIND, driver="580.65.06")) is None


def test_not_blind_without_gpus_with_torch_seeing_them_or_with_them_hidden_on_purpose():
    assert box.torch_blind(dataclasses.replace(BLIND, nodes=0)) is None
    assert box.torch_blind(dataclasses.replace(BLIND, torch_count=8, torch_mem_gib=79.6)) is None
    for hidden in ("", "-1", "none"):
        assert box.torch_blind(dataclasses.replace(BLIND, visible=hidden)) is None
    assert box.torch_blind(dataclasses.replace(BLIND, visible="0,1")) is not None  # named GPUs that torch cannot use


def test_init_presets_refuse_a_cpu_night_on_a_blind_gpu_box():
    with pytest.raises(box.BoxError, match=r">= 580.*--preset cpu-tiny"):
        box.default_preset(BLIND)
    assert box.default_preset(dataclasses.replace(BLIND, nodes=0)) == "cpu-test"
    assert box.default_preset(dataclasses.replace(BLIND, torch_count=8, torch_mem_gib=79.6)) == "gpt2-research"


# ---------------------------------------------------------------------------------------------- what fits
def test_gpt2_124m_at_micro_batch_32_needs_about_50_gb():
    assert 45 <= box.memory_gib(GPT2_124M, 32) <= 55
    assert box.memory_gib(GPT2_124M, 16) < box.memory_gib(GPT2_124M, 32) / 1.8  # activations dominate


@pytest.mark.parametrize("gpus, nproc", [(1, 1), (2, 2), (3, 2), (4, 4), (5, 4), (6, 4), (7, 4), (8, 8), (16, 8)])
def test_nproc_is_the_most_gpus_the_batch_splits_over(gpus, nproc):
    shape = box.fit(GPT2_124M, gpus, 80.0)
    assert shape.nproc == nproc and GPT2_124M.batch_size % nproc == 0
    assert (nproc < gpus) == any(note.startswith(f"uses {nproc} of {gpus} GPUs") for note in shape.notes)


@pytest.mark.parametrize("gpus", range(1, 9))
@pytest.mark.parametrize("mem", [8.0, 24.0, 40.0, 80.0, 141.0])
@pytest.mark.parametrize("config", ["gpt2-124m", "gpt2-research"])
def test_every_shape_splits_the_batch_as_train_py_demands_and_fits(config, gpus, mem):
    cfg = get_config(config)
    shape = box.fit(cfg, gpus, mem)
    assert shape.nproc * shape.micro_batch * shape.grad_accum == cfg.batch_size  # train.py's split, no remainder
    assert 1 <= shape.micro_batch <= cfg.micro_batch_size
    assert shape.gib == pytest.approx(box.memory_gib(cfg, shape.micro_batch)) and shape.gib <= box.usable_gib(mem)
    if shape.micro_batch < min(cfg.micro_batch_size, cfg.batch_size // shape.nproc):  # the largest that fits
        bigger = [m for m in range(shape.micro_batch + 1, cfg.micro_batch_size + 1)
                  if (cfg.batch_size // shape.nproc) % m == 0]
        assert all(box.memory_gib(cfg, m) > box.usable_gib(mem) for m in bigger)


def test_memory_lowers_the_micro_batch_and_says_why():
    assert box.fit(GPT2_124M, 8, 80.0).micro_batch == 32
    shape = box.fit(GPT2_124M, 8, 40.0)
    assert shape.micro_batch == 16 and shape.grad_accum == 4
    assert any(note.startswith("micro-batch 16 instead of 32") for note in shape.notes)


def test_a_gpu_too_small_for_one_sequence_is_refused_with_the_numbers():
    with pytest.raises(box.BoxError, match=r"one sequence of 1024 tokens per forward needs ~\d+\.\d GiB per GPU"):
        box.fit(GPT2_124M, 8, 4.0)
    with pytest.raises(box.BoxError, match="no GPU"):
        box.fit(GPT2_124M, 0, 80.0)


def test_run_time_estimates_match_the_docs_and_flag_a_day_long_run():
    assert 2.3 <= box.fit(GPT2_124M, 8, 80.0).run_hours <= 3.8  # docs/configuration.md: 2.3-3.8 h on 8xH100
    assert 4.1 <= box.fit(GPT2_RESEARCH, 8, 80.0).run_hours * 60 <= 6.4  # and 4.1-6.4 min
    one = box.fit(GPT2_124M, 1, 141.0)
    assert one.run_hours > 20 and any("a baseline of 2-5 runs takes days" in note for note in one.notes)
    assert not any("takes days" in note for note in box.fit(GPT2_RESEARCH, 1, 141.0).notes)


def test_configure_writes_nproc_and_a_micro_batch_only_where_memory_demands_it():
    roomy = settings.preset("gpt2-research")
    assert box.configure(roomy, 6, 80.0).nproc == 4
    assert roomy.train.nproc == 4 and roomy.train.command == settings.Train().command
    tight = settings.preset("gpt2-research")
    box.configure(tight, 8, 40.0)
    assert tight.train.nproc == 8 and tight.train.command.endswith(" --micro_batch_size 16")
    assert box.command_micro_batch(tight.train.command) == 16
    own = settings.preset("cpu-tiny")
    own.train.config = "my-model"  # a repo of one's own: its shape is not ours to pick
    assert box.configure(own, 8, 80.0) is None and own.train.nproc == 0


def test_command_micro_batch_reads_both_spellings_and_refuses_garbage():
    assert box.command_micro_batch("torchrun -m nanomodel.train --config x") is None
    assert box.command_micro_batch("torchrun -m nanomodel.train --micro_batch_size=8") == 8
    with pytest.raises(box.BoxError, match="not a positive number"):
        box.command_micro_batch("torchrun -m nanomodel.train --micro_batch_size many")
