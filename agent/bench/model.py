"""`ratchet bench model`: how fast nanomodel trains here, and how close that is to the machine's matmul peak.

Times training steps of a named config (forward + backward + AdamW step, the real train.py pieces, random
tokens so no data is needed) and a large fp32 matmul, interleaved M T M T ... so drift hits both alike.
Prints tokens/s, step time, achieved FLOP/s (train.flops_per_token) and its ratio to the matmul's FLOP/s.
"""
import argparse
import statistics
import time
from dataclasses import asdict

import torch

import kernels
from nanomodel.config import get_config
from nanomodel.model import build_model
from nanomodel.train import flops_per_token, make_optimizer


def matmul_flops(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def step_seconds(model, optimizer, cfg, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (cfg.micro_batch_size, cfg.seq_len))
        t0 = time.perf_counter()
        for _ in range(cfg.batch_size // cfg.micro_batch_size):
            logits = model(x)
            loss = kernels.cross_entropy(logits.flatten(0, 1), x.flatten())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ratchet bench model", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cpu-tiny")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of (matmul, training steps)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--matmul", type=int, default=2048, help="n of the n x n fp32 matmul")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    cfg = get_config(args.config)
    model = build_model(asdict(cfg))
    optimizer = make_optimizer(model, cfg, fused=False)
    step_seconds(model, optimizer, cfg, 3)  # warm-up: allocator, first-call overheads
    matmul_flops(args.matmul, 2)
    peaks, steps = [], []
    for _ in range(args.rounds):
        peaks.append(matmul_flops(args.matmul, 5))
        steps += step_seconds(model, optimizer, cfg, args.steps)
    step = statistics.median(steps)
    tokens = cfg.batch_size * cfg.seq_len
    achieved = flops_per_token(model, cfg) * tokens / step
    peak = statistics.median(peaks)
    print(f"config {args.config}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {tokens} tokens/step, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'step time':<22}{step * 1e3:10.1f} ms   (median of {len(steps)}; IQR "
          f"{statistics.quantiles(steps, n=4)[0] * 1e3:.1f}-{statistics.quantiles(steps, n=4)[2] * 1e3:.1f} ms)")
    print(f"{'tokens/s':<22}{tokens / step:10.0f}")
    print(f"{'achieved FLOP/s':<22}{achieved / 1e9:10.2f} G")
    print(f"{f'fp32 matmul {args.matmul}^3':<22}{peak / 1e9:10.2f} G   (median of {len(peaks)} rounds, "
          f"{min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f})")
    print(f"{'ratio':<22}{achieved / peak:10.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
