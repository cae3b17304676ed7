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


# --- the GPU configs and their presets (CPU-only arithmetic: no GPU run here) ----------------------------------
GPU_PRESETS = ("gpt2-124m", "gpt2-research")
WORLD_SIZES = (1, 2, 4, 8)  # the GPU counts the GPU configs and their smoke runs are claimed to split over


def splits(batch_size: int, micro_batch_size: int, world: int) -> int | None:
    """train.py's split of a global batch: the micro-batch per rank, or None where train.py raises ConfigError."""
    micro = min(micro_batch_size, batch_size // world)
    return None if micro == 0 or batch_size % (world * micro) else micro


def catalog_micro_batches() -> set[int]:
    """Every micro_batch_size a catalog entry that can run on a GPU assigns (smaller-batch: 24)."""
    from agent.propose.catalog_entries import ENTRIES
    return {e.assign["micro_batch_size"] for e in ENTRIES
            if e.hardware in ("gpu", "any") and "micro_batch_size" in e.assign}


def test_research_config_is_gpt2_small_on_262m_fineweb_tokens():
    from nanomodel.config import CONFIGS
    cfg, full = get_config("gpt2-research"), get_config("gpt2-124m")
    # the documented arithmetic (docs/configuration.md): 1000 steps x 256 sequences x 1024 tokens
    assert cfg.batch_size * cfg.seq_len == 262_144
    assert cfg.steps * cfg.batch_size * cfg.seq_len == 262_144_000
    assert full.steps * full.batch_size * full.seq_len == 9_999_745_024  # llm.c's 10B tokens
    same = ("dataset", "vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "lr", "beta1", "beta2", "weight_decay",
            "grad_clip", "min_lr_frac", "peak_flops")
    assert all(getattr(cfg, f) == getattr(full, f) for f in same)  # the same model and optimizer, a shorter run
    assert (cfg.dataset, cfg.vocab_size, cfg.seq_len) == ("fineweb", 50257, 1024)
    assert round(cfg.warmup_frac * cfg.steps) == 100 and cfg.steps % cfg.log_every == 0
    assert 40 <= cfg.steps // cfg.log_every  # progress lines enough for the screen's looks (every 5% of the steps)
    assert "gpt2-research" in CONFIGS


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_configs_split_over_one_to_eight_gpus(name):
    cfg = get_config(name)
    for world in WORLD_SIZES:
        micro = splits(cfg.batch_size, cfg.micro_batch_size, world)
        assert micro == cfg.micro_batch_size, (name, world)  # full micro-batches: accumulation fills the rest
    assert cfg.batch_size // (8 * cfg.micro_batch_size) >= 1


def test_research_config_still_splits_after_the_smaller_batch_edit():
    """The catalog's smaller-batch entry scales batch_size by 0.75 and sets micro 24 in every named config."""
    from agent.propose.catalog import config_blocks
    from agent.propose.catalog_entries import ENTRIES
    entry = next(e for e in ENTRIES if e.key == "smaller-batch")
    source = (REPO / "nanomodel" / "config.py").read_text()
    edit = config_blocks(source, entry.scale, entry.assign)
    blocks = re.findall(r"<<<<<<< SEARCH\n(.*?)\n=======\n(.*?)\n>>>>>>> REPLACE", edit, re.S)
    for old, new in blocks:
        source = source.replace(old, new, 1)
    namespace = {"__name__": "edited_config"}
    exec(compile(source, "config.py", "exec"), namespace)
    for name in GPU_PRESETS:
        cfg = namespace["get_config"](name)
        assert cfg.micro_batch_size == 24
        assert all(splits(cfg.batch_size, 24, world) for world in WORLD_SIZES), (name, cfg.batch_size)
    assert namespace["get_config"]("gpt2-research").batch_size == 192


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_smoke_batch_splits_for_every_micro_batch_an_edit_may_set(name):
    from agent.settings import preset
    args = preset(name).train.smoke_args.split()
    assert args[args.index("--steps") + 1] == "3"
    smoke_batch = int(args[args.index("--batch_size") + 1])
    micros = catalog_micro_batches() | {get_config(n).micro_batch_size for n in GPU_PRESETS} | {8, 16, 24, 32, 48, 64}
    assert 24 in micros
    for micro in sorted(micros):
        for world in WORLD_SIZES:
            per_rank = splits(smoke_batch, micro, world)
            assert per_rank is not None, f"smoke batch {smoke_batch} with micro {micro} on {world} GPUs"
            assert per_rank >= 2  # not a batch of one: shapes stay like the real run's
    # the old value crashed an edit with micro 24 on 8 GPUs (256 = 8 x 32 is no multiple of 8 x 24)
    assert splits(256, 24, 8) is None


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_presets_load_validate_and_match_their_configs(name):
    from agent.verdict.calibrate import read_length
    from agent.settings import preset
    s = preset(name)  # validates
    cfg = get_config(s.train.config)
    assert s.train.config == name and s.data_dir.name == cfg.dataset == "fineweb"
    assert read_length((REPO / s.length.file).read_text(), s.length.pattern) == cfg.steps
    assert s.eval.window == cfg.seq_len and s.eval.tokens % s.eval.window == 0
    if name == "gpt2-124m":  # the speedrun's rule
        assert (s.target.policy, s.target.value, s.eval.tokens) == ("fixed", 3.28, 10_485_760)
        assert s.train.first_timeout >= 5 * 3600  # an estimated 2.3-3.8 h run must finish before the first timeout
    else:  # research: beat the baseline's own loss; a quick evaluation; a cold run fits the first timeout 10x
        assert s.target.policy == "baseline"
        assert s.eval.tokens == 2_097_152 and s.eval.tokens < preset("gpt2-124m").eval.tokens
        assert s.train.first_timeout >= 10 * 5 * 60
