"""The causality probe: a candidate's model must not let a position's prediction depend on later tokens or on other
rows of its batch, since the validation loss would then reward peeking.

The log-probabilities (what the loss sees) at positions < t of row 0 must not move by more than an absolute
tolerance in nats when the tokens at positions >= t of row 0 and every token of the other rows change: random
rows and a real val row, with a fresh random cut and fresh tokens each run. Run by the evaluator child
(agent/measure/evaluator.py) after the candidate's model is built, so only captured functions touch its output.
"""
import numpy as np
import torch

from agent.measure.captured import EvalError, _abs, _amax, _item, _log_softmax, _sub, _to

# The causality probe compares what the loss sees: log-probabilities (log_softmax of the logits), in nats, with an
# absolute tolerance. A candidate controls its logits' magnitude, and softmax ignores a shift of a whole row and any
# column it pushes far down, so a tolerance relative to the logits could be inflated at will; one in nats cannot,
# and a peek that moves log-probabilities by less than it can improve the loss by at most that much per token.
# Probe and scoring run the same forward: fp32 without autocast, same batch shape, so the model cannot tell them
# apart by dtype or shape. Honest models give exactly 0 on CPU (same shapes, deterministic kernels); on CUDA, kernels
# that reduce with atomics (split-K) may move a fp32 log-prob by ~1e-6 of its size (log-probs are ~1-20 nats).
CPU_PROBE_NATS = 1e-5
CUDA_PROBE_NATS = 2e-4  # unverified on a GPU: an honest model with non-deterministic kernels may need more


class ProbeFailure(EvalError):
    """The causality probe failed; max_diff is the largest log-probability change (nats) seen up to the failure."""

    def __init__(self, max_diff: float, message: str):
        super().__init__(message)
        self.max_diff = max_diff


def make_probe_cases(val_rows: np.ndarray, vocab: int, seed: int) -> list:
    """[(base [B, T], [(t, changed [B, T]), ...])] for val_rows [B, T] (the first scoring batch, so the probe's
    batches have the scoring's shape): in `changed`, every token >= t of row 0 and every token of rows 1.. differs
    from `base`. Row 0 of the bases: random tokens, then the real val row (a model may cheat on text only); the
    other rows: random tokens."""
    rng = np.random.default_rng(seed)
    batch, window = val_rows.shape
    cuts = sorted({1, window // 2, window - 1, int(rng.integers(1, window))})
    cases = []
    for row0 in (rng.integers(0, vocab, window), val_rows[0].astype(np.int64)):
        base = np.concatenate([row0[None], rng.integers(0, vocab, (batch - 1, window))])
        variants = []
        for t in cuts:
            changed = base.copy()
            changed[0, t:] = (changed[0, t:] + rng.integers(1, vocab, window - t)) % vocab  # a shift in [1, V) mod V
            changed[1:] = (changed[1:] + rng.integers(1, vocab, (batch - 1, window))) % vocab
            variants.append((t, torch.from_numpy(changed)))
        cases.append((torch.from_numpy(base), variants))
    return cases


def row0_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """What the loss sees of row 0: log-probabilities [T, V], in float64 (exact enough that only the model moves them)."""
    return _log_softmax(_to(logits[0], torch.float64), -1)


def probe_causality(forward, cases: list, device: torch.device, seed: int) -> float:
    """Max |change| in nats of row 0's log-probabilities before each cut over all cases; raise when one exceeds the
    absolute tolerance (CPU_PROBE_NATS, CUDA_PROBE_NATS: no output of the candidate moves it)."""
    tol = CUDA_PROBE_NATS if device.type == "cuda" else CPU_PROBE_NATS
    max_diff = 0.0
    for base, variants in cases:
        base_lp = row0_log_probs(forward(_to(base, device)))  # [T, V]
        for t, changed in variants:
            changed_lp = row0_log_probs(forward(_to(changed, device)))
            diff = _item(_amax(_abs(_sub(changed_lp[:t], base_lp[:t]))))
            max_diff = max(max_diff, diff)
            if diff > tol:
                raise ProbeFailure(max_diff, f"causality probe failed: log-probabilities at positions < {t} moved by "
                                             f"{diff:.3g} nats (tolerance {tol:g}) when later tokens or another row "
                                             f"changed (probe seed {seed})")
    return max_diff

