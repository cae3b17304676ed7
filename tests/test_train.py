"""nanomodel's training contract: progress lines, summary block, final.pt, same math at any world size, clear errors."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanomodel.config import ConfigError, get_config, parse_args
from nanomodel.model import build_model

REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^step (\d+)/(\d+) loss (\d+\.\d{4}) elapsed (\d+\.\d{2})s$", re.M)


def train(tmp_path: Path, dataset: Path, *args: str, nproc: int = 1, torchrun: bool = True):
    run_dir = tmp_path / f"run-{nproc}-{len(list(tmp_path.iterdir()))}"
    env = {**os.environ, "RATCHET_RUN_DIR": str(run_dir), "RATCHET_SEED": "7", "RATCHET_TRAIN_DATA": str(dataset),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if torchrun \
        else [sys.executable]
    proc = subprocess.run(launcher + ["-m", "nanomodel.train", "--config", "cpu-test", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    return proc, run_dir


def summary(stdout: str) -> dict:
    block = stdout.split("\n---\n", 1)[1]
    return dict(line.split(":", 1) for line in block.strip().splitlines())


def test_one_and_two_processes_run_the_same_math(tmp_path, dataset):
    one, dir1 = train(tmp_path, dataset, nproc=1)
    two, dir2 = train(tmp_path, dataset, nproc=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    for proc, run_dir in ((one, dir1), (two, dir2)):
        steps = PROGRESS.findall(proc.stdout)
        assert steps and steps[-1][0] == steps[-1][1] == "40"
        assert (run_dir / "final.pt").exists()
        s = summary(proc.stdout)
        assert {"final_train_loss", "val_loss", "steps", "tokens", "tokens_per_sec", "peak_memory_mb", "mfu_percent"} <= set(s)
    loss1, loss2 = float(summary(one.stdout)["final_train_loss"]), float(summary(two.stdout)["final_train_loss"])
    assert abs(loss1 - loss2) / loss1 < 0.01
    assert summary(two.stdout)["world_size"].strip() == "2"


def test_final_weights_reload_and_reproduce_the_in_run_val_loss(tmp_path, dataset):
    proc, run_dir = train(tmp_path, dataset, "--val_tokens", "2048", torchrun=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reported = float(summary(proc.stdout)["val_loss"])
    # a fresh process: build_model + final.pt, loss on the same held tokens
    code = f"""
import torch, torch.nn.functional as F
from nanomodel.model import build_model
from nanomodel.data import val_tokens
ck = torch.load({str(run_dir / 'final.pt')!r}, weights_only=True)
m = build_model(ck['config']); m.load_state_dict(ck['model']); m.eval()
T = ck['config']['seq_len']; n = 2048 // T
tok = val_tokens({str(dataset)!r}, n * T + 1)
with torch.no_grad():
    logits = m(tok[:-1].view(n, T))
print(F.cross_entropy(logits.flatten(0, 1), tok[1:]).item())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(reported, abs=1e-3)
    assert reported < 8.0  # learned something: ln(4096) = 8.32 is the loss of a uniform guess


def test_loss_decreases_and_nan_is_a_one_line_error(tmp_path, dataset):
    proc, _ = train(tmp_path, dataset, "--lr", "1e6", torchrun=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: loss is (nan|inf) at step \d+", last), proc.stderr[-500:]


@pytest.mark.parametrize("args, env, message", [
    (["--config", "nope"], {}, "unknown config 'nope'"),
    ([], {"RATCHET_TRAIN_DATA": "/nonexistent/data"}, "/nonexistent/data"),
])
def test_bad_config_and_missing_data_are_one_line_errors(tmp_path, args, env, message):
    cmd = [sys.executable, "-m", "nanomodel.train", *(args or ["--config", "cpu-test"])]
    proc = subprocess.run(cmd, env={**os.environ, **env, "RATCHET_RUN_DIR": str(tmp_path)}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_truncated_shard_is_a_one_line_error(tmp_path, dataset):
    broken = tmp_path / "broken"
    broken.mkdir()
    shard = next(dataset.glob("*_train_*.bin"))
    (broken / shard.name).write_bytes(shard.read_bytes()[:5000])
    proc = subprocess.run([sys.executable, "-m", "nanomodel.train", "--config", "cpu-test"], cwd=REPO,
                          env={**os.environ, "RATCHET_TRAIN_DATA": str(broken), "RATCHET_RUN_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "truncated" in proc.stderr and shard.name in proc.stderr


def test_config_overrides_and_validation():
    cfg = parse_args(["--config", "cpu-test", "--steps", "12", "--lr", "0.01"])
    assert (cfg.steps, cfg.lr, cfg.n_layer) == (12, 0.01, get_config("cpu-test").n_layer)
    with pytest.raises(ConfigError, match="not divisible"):
        get_config("cpu-test", n_embd=65)
    with pytest.raises(ConfigError, match="unknown config field"):
        get_config("cpu-test", bogus=1)


def test_model_contract_shapes_and_tied_head():
    cfg = {"vocab_size": 50, "seq_len": 16, "n_layer": 1, "n_head": 2, "n_embd": 8}
    model = build_model(cfg)
    logits = model(torch.randint(0, 50, (3, 16)))
    assert logits.shape == (3, 16, 50)
    assert model.lm_head.weight is model.wte.weight
    assert not any("mask" in k for k in model.state_dict())  # the causal mask is not part of the weights
