"""Fused LayerNorm (weight and bias) over the last dim, forward and backward, in Triton.

Forward: one pass reads x [M, C] once and writes y once; mean and 1/std stay in registers and are kept per row
(8 bytes a row) for the backward. For bf16 x, eager PyTorch under autocast runs layer_norm in fp32 on an upcast
copy and returns fp32, which the next matmul casts back to bf16: about 20 bytes moved per element against 4 here.

Backward: one pass per row block reads x and dy, recomputes x_hat from the saved mean and 1/std, writes dx, and
accumulates dweight and dbias for its rows in registers. Each program loops over many row blocks, so only a small
[programs, C] fp32 buffer of partial sums goes to memory; torch sums it. The gradients of x, weight and bias thus
cost one read of x and dy and one write of dx: 6 bytes per bf16 element.

Shapes: x [..., C] with C <= MAX_FEATURES, flattened to M rows. Loads in x's dtype, computes in fp32, stores y
and dx in x's dtype and dweight, dbias in the parameters' dtype.
"""

import functools

import torch
import triton
import triton.language as tl

from kernels import KernelInputError

MAX_FEATURES = 65536  # one row must fit in one program's registers; GPT widths are far below this
ELEMENTS_PER_PROGRAM = 4096  # rows per program = this / padded width: 4 rows of 768 on GPU, enough work per warp
PROGRAMS_PER_SM = 8  # backward programs per SM: fills the GPU while keeping the partial-sum buffer small
INTERPRETER_PROGRAMS = 2  # the interpreter runs programs one after another (~1.6 ms each): few and large


@triton.jit
def _layer_norm_fwd(x_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, n_cols, eps,
                    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centered = tl.where(mask, x - mean[:, None], 0.0)  # padding columns must not count in the variance
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd(x_ptr, weight_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dweight_partial_ptr, dbias_partial_ptr,
                    n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dweight = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    for first_row in range(program * BLOCK_ROWS, n_rows, tl.num_programs(0) * BLOCK_ROWS):
        rows = first_row + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dx_hat = dy * weight[None, :]
        # dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)), means over the row's C features
        mean_dx_hat = tl.sum(dx_hat, axis=1) / n_cols
        mean_dx_hat_x_hat = tl.sum(dx_hat * x_hat, axis=1) / n_cols
        dx = (dx_hat - mean_dx_hat[:, None] - x_hat * mean_dx_hat_x_hat[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dweight += tl.sum(dy * x_hat, axis=0)
        dbias += tl.sum(dy, axis=0)
    tl.store(dweight_partial_ptr + program * n_cols + cols, dweight, mask=col_ok)
    tl.store(dbias_partial_ptr + program * n_cols + cols, dbias, mask=col_ok)


def _launch_config(n_rows: int, n_cols: int) -> dict:
    """BLOCK_ROWS, BLOCK_COLS, num_warps: a whole padded row per program, several rows when rows are narrow."""
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = max(1, min(ELEMENTS_PER_PROGRAM // block_cols, triton.next_power_of_2(n_rows)))
    return dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=8 if block_cols >= 2048 else 4)


@functools.lru_cache(maxsize=None)
def _backward_program_limit(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


class LayerNormFunction(torch.autograd.Function):
    """autograd wrapper: LayerNormFunction.apply(x [..., C], weight [C], bias [C], eps) -> y [..., C]."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n_cols = x.shape[-1]
        if n_cols > MAX_FEATURES:
            raise KernelInputError(f"layer_norm: {n_cols} features exceed MAX_FEATURES={MAX_FEATURES} "
                                   "(kernels/layernorm.py)")
        x2d = x.reshape(-1, n_cols).contiguous()
        n_rows = x2d.shape[0]
        y = torch.empty_like(x2d)
        mean = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        config = _launch_config(n_rows, n_cols)
        grid = (triton.cdiv(n_rows, config["BLOCK_ROWS"]),)
        _layer_norm_fwd[grid](x2d, weight.contiguous(), bias.contiguous(), y, mean, rstd, n_rows, n_cols, eps, **config)
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2d.shape
        dy2d = dy.reshape(n_rows, n_cols).contiguous()
        dx = torch.empty_like(x2d)
        config = _launch_config(n_rows, n_cols)
        programs = min(triton.cdiv(n_rows, config["BLOCK_ROWS"]), _backward_program_limit(x2d.device))
        dweight_partial = torch.empty(programs, n_cols, device=x2d.device, dtype=torch.float32)
        dbias_partial = torch.empty(programs, n_cols, device=x2d.device, dtype=torch.float32)
        _layer_norm_bwd[(programs,)](x2d, weight.contiguous(), dy2d, mean, rstd, dx, dweight_partial, dbias_partial,
                                     n_rows, n_cols, **config)
        dweight = dweight_partial.sum(dim=0).to(weight.dtype)
        dbias = dbias_partial.sum(dim=0).to(ctx.bias_dtype)
        return dx.view(dy.shape), dweight, dbias, None
