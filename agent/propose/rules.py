"""What every proposer is told: the hardware and the rules of the game."""
import os
import platform

import torch

from agent.settings import Settings


def hardware_summary(nproc: int) -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return f"GPU: {nproc}x {name}; torch {torch.__version__}; bf16 autocast; NCCL"
    cores = len(os.sched_getaffinity(0))
    return (f"CPU: {cores} cores ({platform.machine()}), no GPU; torch {torch.__version__}; fp32 (bf16 is much slower on "
            f"this CPU); {nproc} process(es) with gloo")


def rules_text(s: Settings) -> str:
    """The measurement rules. Paths, the edit format and the calibration note are added by the prompt builders."""
    target = "a fixed target" if s.target.policy == "fixed" else "the baseline's mean plus its seed-to-seed tolerance"
    return f"""What counts:
- The wall-clock of the whole training command (`{s.train.command}` with config {s.train.config}), measured from
  outside, from launch to the exit of every process it started. Start-up, compilation and saving all count.
- Validation loss is computed by a separate evaluator on held-out tokens the training never sees, with a causality
  probe (future tokens must not change earlier logits). The candidate's mean val loss must be <= {target}.
- The judge runs the incumbent and the candidate interleaved (I C C I or C I I C, a coin flip per block) and
  accepts only a speedup of at least {s.judge.min_speedup:.0%} that is significant at alpha {s.judge.alpha} (one-sided).
  Noise does not win.
Not allowed (rejected by a static check and a sandbox): patching timers or library functions, spawning processes,
network access, reading validation data or anything outside the run directory and the training shards, caching
results or weights across runs, reading RATCHET_* variables other than RATCHET_RUN_DIR, RATCHET_SEED, RATCHET_TRAIN_DATA.
The training script must keep its contract: write $RATCHET_RUN_DIR/final.pt as {{"config": dict, "model": state_dict}},
`nanomodel.model.build_model(config)` must rebuild the model, and forward(idx [B, T]) must return logits [B, T, V].
"""
