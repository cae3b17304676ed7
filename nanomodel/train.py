"""Train nanomodel: `torchrun --standalone --nproc_per_node=N -m nanomodel.train --config NAME [--field value ...]`.

What is timed: Ratchet times this whole process group from the outside, start-up and saving included;
nothing printed here is trusted. `elapsed` in the progress lines counts from the first training step
and is for display and early abort only.

Environment (set by Ratchet's runner; defaults for standalone use):
  RATCHET_RUN_DIR     the only directory this run writes (default ./out): final.pt goes there
  RATCHET_SEED        seed for init and data order (default: the config's seed)
  RATCHET_TRAIN_DATA  directory of the training shards (default: the config's dataset under the data root)
  RATCHET_EXPECT_CUDA the CUDA devices this run must see (Ratchet sets it on a GPU machine); fewer: stop at once
"""
import contextlib
import math
import os
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import kernels
from nanomodel.config import Config, ConfigError, parse_args
from nanomodel.data import DataError, TrainLoader, dataset_dir, val_tokens
from nanomodel.model import build_model


class TrainingError(RuntimeError):
    pass


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_frac; all in fractions of cfg.steps."""
    warmup = max(1, round(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def flops_per_token(model: torch.nn.Module, cfg: Config) -> float:
    """6N for the matmuls (forward + backward) plus attention's 12·L·T·C; position embeddings do no matmul."""
    n_params = sum(p.numel() for p in model.parameters()) - cfg.seq_len * cfg.n_embd
    return 6 * n_params + 12 * cfg.n_layer * cfg.seq_len * cfg.n_embd


def make_optimizer(model: torch.nn.Module, cfg: Config, fused: bool) -> torch.optim.Optimizer:
    # weight decay on matrices (and the tied embedding), not on biases and norm gains
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


@torch.no_grad()
def in_run_val_loss(model, data_dir: Path, cfg: Config, device, autocast) -> float:
    tokens = val_tokens(data_dir, cfg.val_tokens + 1).to(device)
    n_windows = cfg.val_tokens // cfg.seq_len
    x = tokens[: n_windows * cfg.seq_len].view(n_windows, cfg.seq_len)
    y = tokens[1 : n_windows * cfg.seq_len + 1].view(n_windows, cfg.seq_len)
    total = 0.0
    for i in range(0, n_windows, cfg.micro_batch_size):
        with autocast:
            logits = model(x[i : i + cfg.micro_batch_size])
        total += kernels.cross_entropy(logits.flatten(0, 1).float(), y[i : i + cfg.micro_batch_size].flatten()).item() * len(logits)
    return total / n_windows


def require_cuda() -> None:
    """Stop before anything is built when Ratchet expects GPUs (RATCHET_EXPECT_CUDA=n) and this process sees fewer
    than n, or fewer than its node's ranks: without the check it would train on the CPU without a word. A guard
    against accidents only (this file is the candidate's); Ratchet's own check is its evaluator's, on CUDA."""
    expected = int(os.environ.get("RATCHET_EXPECT_CUDA") or 0)
    needed = max(expected, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) if expected else 0
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < needed:
        raise TrainingError(f"expected {needed} CUDA devices (RATCHET_EXPECT_CUDA={expected}), this process sees "
                            f"{found}: the GPUs or their driver are not reachable here")


def train(cfg: Config) -> None:
    require_cuda()
    # --- distributed setup: torchrun sets RANK/WORLD_SIZE; a plain `python -m` run is world size 1
    distributed = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    master = rank == 0
    # each rank takes batch_size / world sequences per step, in micro-batches of at most micro_batch_size
    micro = min(cfg.micro_batch_size, cfg.batch_size // world)
    if micro == 0 or cfg.batch_size % (world * micro):
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over world_size {world} in micro-batches of {micro}")
    grad_accum = cfg.batch_size // (world * micro)

    run_dir = Path(os.environ.get("RATCHET_RUN_DIR", "out"))
    seed = int(os.environ.get("RATCHET_SEED", cfg.seed))
    data_dir = Path(os.environ["RATCHET_TRAIN_DATA"]) if "RATCHET_TRAIN_DATA" in os.environ else dataset_dir(cfg.dataset)
    loader = TrainLoader(data_dir, seq_len=cfg.seq_len, batch_size=cfg.batch_size, micro_batch_size=micro,
                         rank=rank, world_size=world, seed=seed)

    # same seed on every rank: identical initial weights (DDP also broadcasts them from rank 0)
    torch.manual_seed(seed)
    model = build_model(asdict(cfg)).to(device)
    raw_model = model
    if distributed:
        model = DDP(model, device_ids=[local_rank] if cuda else None)
    optimizer = make_optimizer(raw_model, cfg, fused=cuda)
    # bf16 autocast on GPU only: this CPU has no bf16 instructions (13x slower than fp32)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda)

    tokens_per_step = cfg.batch_size * cfg.seq_len
    if master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"nanomodel: {n_params / 1e6:.2f}M params, world {world}, grad_accum {grad_accum}, "
              f"{tokens_per_step} tokens/step, {cfg.steps} steps, device {device.type}", flush=True)

    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # DDP all-reduces gradients on every backward unless told not to: only the last micro-batch syncs
            sync = not distributed or micro == grad_accum - 1
            with autocast, (contextlib.nullcontext() if sync else model.no_sync()):
                logits = model(x)
                loss = kernels.cross_entropy(logits.flatten(0, 1), y.flatten()) / grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        last = step == cfg.steps - 1
        if (step + 1) % cfg.log_every == 0 or last:
            if distributed:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            train_loss = loss_sum.item()  # host sync: only at log steps
            if not math.isfinite(train_loss):
                raise TrainingError(f"loss is {train_loss} at step {step + 1}")
            if master:
                print(f"step {step + 1}/{cfg.steps} loss {train_loss:.4f} elapsed {time.perf_counter() - t0:.2f}s", flush=True)
    if cuda:
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t0

    val_loss = in_run_val_loss(raw_model, data_dir, cfg, device, autocast) if cfg.val_tokens and master else None
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "final.pt.tmp"
        torch.save({"config": asdict(cfg), "model": raw_model.state_dict()}, tmp)
        tmp.replace(run_dir / "final.pt")  # never a half-written final.pt
        tokens = tokens_per_step * cfg.steps
        achieved = flops_per_token(raw_model, cfg) * tokens / train_seconds
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # the fixed, greppable summary block
        print("---")
        print(f"final_train_loss: {train_loss:.4f}")
        print(f"val_loss:         {'n/a' if val_loss is None else f'{val_loss:.4f}'}")
        print(f"steps:            {cfg.steps}")
        print(f"tokens:           {tokens}")
        print(f"train_seconds:    {train_seconds:.2f}")
        print(f"tokens_per_sec:   {tokens / train_seconds:.0f}")
        print(f"peak_memory_mb:   {peak_mb:.1f}")
        print(f"mfu_percent:      {'n/a' if not cfg.peak_flops else f'{100 * achieved / (cfg.peak_flops * world):.2f}'}")
        print(f"world_size:       {world}", flush=True)
    if distributed:
        dist.destroy_process_group()


def main(argv=None) -> int:
    try:
        train(parse_args(argv))
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
