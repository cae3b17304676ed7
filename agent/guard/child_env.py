"""The environment of every child process that Ratchet starts: training runs, smoke checks, the evaluator.

Built in this one place, so that no kind of child is forgotten: the parent's environment without secrets
(`redaction.is_secret_name`: API keys never reach candidate code, its logs or its network) and without the
parent's RATCHET_* variables (a stale RATCHET_RUN_DIR or RATCHET_SEED must not leak into a run), except the
user's documented knobs, which every child gets alike; then what the caller adds.
"""
import os
from collections.abc import Mapping

from agent.guard.redaction import is_secret_name

USER_KNOBS = ("RATCHET_KERNELS",)  # kernels/__init__.py: Triton or the reference; training and evaluation alike
EXPECT_CUDA = "RATCHET_EXPECT_CUDA"  # nanomodel/train.py: the CUDA devices a run must see; set by the harness only


def child_env(extra: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) without secrets and foreign RATCHET_* variables, then `extra`."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items()
           if not is_secret_name(k) and (not k.startswith("RATCHET_") or k in USER_KNOBS)}
    env.update(extra)
    return env


def expect_cuda(nproc: int, cuda_here: bool) -> dict[str, str]:
    """What tells a training run that it must see `nproc` CUDA devices, one per rank: {EXPECT_CUDA: nproc} when
    this (trusted) process sees CUDA, else nothing. The training code picks CUDA when it finds it, so a sandbox
    that hides the GPUs, or a driver that fails inside it, would make a silent CPU run; told, it stops at once."""
    return {EXPECT_CUDA: str(nproc)} if cuda_here else {}
