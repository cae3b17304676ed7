"""Training configs: one dataclass, a few named presets, command-line overrides.

The total step count `steps` is the one length knob: every schedule below is a fraction of it,
so changing `steps` changes nothing else (Ratchet's step calibration relies on that).
"""
import argparse
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "stdlib"          # dataset name under the data root (RATCHET_TRAIN_DATA overrides the location)
    vocab_size: int = 4096           # must match the dataset's tokenizer (stdlib BPE: 4096; GPT-2: 50257)
    seq_len: int = 256               # tokens per training sequence (and the size of the learned position table)
    # model: the plain GPT-2 of the NanoGPT speedrun's starting point
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    # batch: global sequences per optimizer step, split over ranks and micro-batches (same math at any world size)
    batch_size: int = 8              # global sequences per step
    micro_batch_size: int = 8        # at most this many sequences per rank per forward/backward; accumulation fills the rest
    # schedule, as fractions of `steps`
    steps: int = 300                 # total optimizer steps: THE length knob
    warmup_frac: float = 0.1         # linear warmup over this fraction of steps
    min_lr_frac: float = 0.1         # cosine decay ends at lr * min_lr_frac
    # AdamW
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1        # on matrices only (not on biases, norms)
    grad_clip: float = 1.0           # global grad-norm clip; 0 disables
    # bookkeeping
    seed: int = 1337                 # RATCHET_SEED overrides
    log_every: int = 10              # progress line every this many steps (each costs a host sync on GPU)
    val_tokens: int = 0              # in-run val loss at the end over this many val tokens; 0 = off (Ratchet evaluates out of process)
    peak_flops: float = 0.0          # per-device peak FLOP/s for MFU; 0 = not reported


CONFIGS: dict[str, Config] = {
    # a few seconds of training on 2 CPU cores (~10 s a run with start-up): the pipeline's tests, and the default
    # without a GPU, so a first `make run` shows verdicts within minutes; learns little (val loss 8.3 -> 6.2)
    "cpu-test": Config(seq_len=64, n_layer=2, n_head=2, n_embd=64, batch_size=16, micro_batch_size=16,
                       steps=40, lr=3e-3, log_every=5, peak_flops=1.1e11),
    # research without a GPU: 1.5-3 minutes on 2 cores, learns Python source (val loss 8.3 -> about 5.3)
    "cpu-tiny": Config(peak_flops=1.1e11),
    # llm.c-style GPT-2 small on FineWeb, 8 GPUs: 19,073 steps x 524,288 tokens = 10B tokens, target val loss 3.28
    "gpt2-124m": Config(dataset="fineweb", vocab_size=50257, seq_len=1024, n_layer=12, n_head=12, n_embd=768,
                        batch_size=512, micro_batch_size=32, steps=19073, warmup_frac=0.0367, min_lr_frac=0.0,
                        lr=6e-4, log_every=50, peak_flops=989e12),
    # the same GPT-2 small on FineWeb, sized for research: 1000 steps x 262,144 tokens = 262M tokens, an estimated
    # 5 minutes on 8xH100 with this baseline; its target is the baseline's own loss (docs/configuration.md)
    "gpt2-research": Config(dataset="fineweb", vocab_size=50257, seq_len=1024, n_layer=12, n_head=12, n_embd=768,
                            batch_size=256, micro_batch_size=32, steps=1000, warmup_frac=0.1, min_lr_frac=0.0,
                            lr=6e-4, log_every=10, peak_flops=989e12),
}


class ConfigError(ValueError):
    pass


def get_config(name: str, **overrides) -> Config:
    if name not in CONFIGS:
        raise ConfigError(f"unknown config {name!r} (choose from {', '.join(CONFIGS)})")
    known = {f.name for f in fields(Config)}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(sorted(unknown))}")
    cfg = replace(CONFIGS[name], **overrides)
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
    if cfg.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {cfg.steps}")
    return cfg


def parse_args(argv=None) -> Config:
    """`--config NAME` plus `--<field> VALUE` for any Config field."""
    parser = argparse.ArgumentParser(description="Train nanomodel.")
    parser.add_argument("--config", default="cpu-tiny", help=f"named config: {', '.join(CONFIGS)}")
    for f in fields(Config):
        parser.add_argument(f"--{f.name}", type=f.type, default=None)
    args = vars(parser.parse_args(argv))
    name = args.pop("config")
    return get_config(name, **{k: v for k, v in args.items() if v is not None})
