"""Fused GELU (tanh approximation), forward and backward, in Triton.

GELU-tanh is 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), which equals x * sigmoid(2u).
Written as PyTorch ops (the reference) it runs about eight elementwise kernels, each reading and writing the
whole [B*T, 4C] activation, and autograd keeps their intermediates. Here the forward reads x once and writes y
once; the backward reads x and dy once, recomputes sigmoid(2u) in registers (cheaper than storing it) and writes
dx once: the least traffic an elementwise op can have. torch's native F.gelu(approximate="tanh") is also one
kernel each way, so this one matches it rather than beats it; its worth is as the place to fuse more (the
preceding bias add, a cast, the matmul's epilogue).

Shapes: any x, flattened. Loads in x's dtype, computes in fp32, stores in x's dtype.
"""

import math

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024  # elements per program: 8 per thread at 4 warps, wide enough for 16-byte loads
SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
CUBIC = tl.constexpr(0.044715)


@triton.jit
def _gelu_gate(x):
    """sigmoid(2u) = 0.5 (1 + tanh(u)) in fp32, from exp(-|2u|) so that no exponential overflows."""
    z = 2.0 * SQRT_2_OVER_PI * (x + CUBIC * x * x * x)
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _gelu_tanh_fwd(x_ptr, y_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = x * _gelu_gate(x)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_bwd(x_ptr, dy_ptr, dx_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = _gelu_gate(x)
    # d/dx [x s(2u)] = s + x * 2 s (1 - s) * du/dx, with du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    dx = dy * (s + x * 2.0 * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x * x))
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class GeluTanhFunction(torch.autograd.Function):
    """autograd wrapper: GeluTanhFunction.apply(x) -> GELU-tanh(x), same shape and dtype."""

    @staticmethod
    def forward(ctx, x):
        x_flat = x.contiguous().view(-1)
        y = torch.empty_like(x_flat)
        grid = (triton.cdiv(x_flat.numel(), BLOCK_SIZE),)
        _gelu_tanh_fwd[grid](x_flat, y, x_flat.numel(), BLOCK=BLOCK_SIZE)
        ctx.save_for_backward(x_flat)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        (x_flat,) = ctx.saved_tensors
        dy_flat = dy.contiguous().view(-1)
        dx = torch.empty_like(x_flat)
        grid = (triton.cdiv(x_flat.numel(), BLOCK_SIZE),)
        _gelu_tanh_bwd[grid](x_flat, dy_flat, dx, x_flat.numel(), BLOCK=BLOCK_SIZE)
        return dx.view(dy.shape)
