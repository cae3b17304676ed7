"""Fused softmax cross-entropy over the vocabulary, chunked over the vocab dim, forward and backward, in Triton.

The logits [N, V] (8k rows x 50k vocab: 0.8 GB in bf16) are the largest activation of a small GPT. Eager
F.cross_entropy under autocast upcasts them to fp32, writes log_softmax [N, V] and keeps it for the backward,
whose NLL and log_softmax steps write two more dense fp32 [N, V] before the cast back to bf16: about 36 bytes
moved per element.

Forward: each program streams its rows in BLOCK_COLS chunks and keeps an online max and sum of exponentials
(the sum is rescaled when the max grows), so it reads the logits once and writes only the row max m, the log of
the sum l (logsumexp = m + l) and the loss, 12 bytes a row. No probability matrix is ever stored.
Backward: one more read of the logits and one write of grad = (softmax - onehot(target)) * dloss / N, chunk by
chunk, with softmax recomputed as exp((logit - m) - l): 6 bytes per bf16 element in all, fwd and bwd.
Why m and l and not their sum: logsumexp rounded to fp32 is off by up to half an ulp of its own size (7.6e-6 at
200), and exp(logit - logsumexp) carries that as relative error. logit - m is exact (Sterbenz) and l <= log V is
small, so the softmax is as accurate as torch's. It matters where the target's probability is near 1: its
gradient p - 1 cancels, and the error grows by p / (1 - p).

A target outside [0, V) gives a NaN loss rather than a host-side check, which would stall the GPU.
Shapes: logits [N, V] with unit stride along V, targets [N] int64; returns the fp32 mean over rows.
"""

import torch
import triton
import triton.language as tl

MAX_BLOCK_COLS = 4096  # vocab chunk per step: 50304 is 13 chunks; bounds registers whatever V is
ELEMENTS_PER_PROGRAM = 4096  # rows per program = this / BLOCK_COLS: 1 row at GPT-2's vocab, more for tiny vocabs


@triton.jit
def _cross_entropy_fwd(logits_ptr, targets_ptr, losses_ptr, max_ptr, logsum_ptr, n_rows, n_cols, row_stride,
                       BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    # Padding rows re-read the last real row, so every row's max is finite and no NaN is ever computed.
    row_starts = logits_ptr + tl.minimum(rows, n_rows - 1).to(tl.int64)[:, None] * row_stride
    running_max = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for first_col in range(0, n_cols, BLOCK_COLS):
        cols = first_col + tl.arange(0, BLOCK_COLS)
        chunk = tl.load(row_starts + cols[None, :], mask=(cols < n_cols)[None, :], other=float("-inf"))
        chunk = chunk.to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(chunk, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(chunk - new_max[:, None]), axis=1)
        running_max = new_max
    log_sum = tl.log(running_sum)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    target_ok = row_ok & (targets >= 0) & (targets < n_cols)
    target_logits = tl.load(logits_ptr + rows.to(tl.int64) * row_stride + targets, mask=target_ok, other=float("nan"))
    tl.store(losses_ptr + rows, (running_max - target_logits.to(tl.float32)) + log_sum, mask=row_ok)
    tl.store(max_ptr + rows, running_max, mask=row_ok)
    tl.store(logsum_ptr + rows, log_sum, mask=row_ok)


@triton.jit
def _cross_entropy_bwd(logits_ptr, targets_ptr, max_ptr, logsum_ptr, dloss_ptr, dlogits_ptr, n_rows, n_cols, row_stride,
                       BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    row_offsets = rows.to(tl.int64)[:, None]
    row_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    log_sum = tl.load(logsum_ptr + rows, mask=row_ok, other=0.0)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    scale = tl.load(dloss_ptr).to(tl.float32) / n_rows  # d(mean loss)/d(row loss), times the upstream gradient
    for first_col in range(0, n_cols, BLOCK_COLS):
        cols = first_col + tl.arange(0, BLOCK_COLS)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        logits = tl.load(logits_ptr + row_offsets * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        probs = tl.exp((logits - row_max[:, None]) - log_sum[:, None])
        dlogits = tl.where(cols[None, :] == targets[:, None], probs - 1.0, probs) * scale
        tl.store(dlogits_ptr + row_offsets * n_cols + cols[None, :], dlogits.to(dlogits_ptr.dtype.element_ty),
                 mask=mask)


def _launch_config(n_rows: int, n_cols: int) -> dict:
    """BLOCK_ROWS, BLOCK_COLS, num_warps for logits [n_rows, n_cols]."""
    block_cols = min(triton.next_power_of_2(n_cols), MAX_BLOCK_COLS)
    block_rows = max(1, min(ELEMENTS_PER_PROGRAM // block_cols, triton.next_power_of_2(n_rows)))
    return dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=8 if block_cols >= 2048 else 4)


class CrossEntropyFunction(torch.autograd.Function):
    """autograd wrapper: CrossEntropyFunction.apply(logits [N, V], targets [N] int64) -> fp32 mean loss."""

    @staticmethod
    def forward(ctx, logits, targets):
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        targets = targets.contiguous()
        n_rows, n_cols = logits.shape
        losses = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
        row_max = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
        log_sum = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
        config = _launch_config(n_rows, n_cols)
        grid = (triton.cdiv(n_rows, config["BLOCK_ROWS"]),)
        _cross_entropy_fwd[grid](logits, targets, losses, row_max, log_sum, n_rows, n_cols, logits.stride(0), **config)
        ctx.save_for_backward(logits, targets, row_max, log_sum)
        return losses.mean()

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, row_max, log_sum = ctx.saved_tensors
        n_rows, n_cols = logits.shape
        dlogits = torch.empty(n_rows, n_cols, device=logits.device, dtype=logits.dtype)
        config = _launch_config(n_rows, n_cols)
        grid = (triton.cdiv(n_rows, config["BLOCK_ROWS"]),)
        _cross_entropy_bwd[grid](logits, targets, row_max, log_sum, dloss.contiguous(), dlogits, n_rows, n_cols,
                                 logits.stride(0), **config)
        return dlogits, None
