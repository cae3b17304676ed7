"""Triton kernels for nanomodel, each beside a plain-PyTorch reference, behind one dispatch point.

    layer_norm(x, weight, bias, eps)  fused LayerNorm, fwd + bwd          kernels/layernorm.py
    gelu_tanh(x)                      fused GELU (tanh approximation)     kernels/gelu.py
    cross_entropy(logits, targets)    fused, vocab-chunked softmax CE     kernels/crossentropy.py

Backend, read from the environment at every call so tests and runs can switch it:
    RATCHET_KERNELS=auto       (default) Triton for CUDA tensors, the reference otherwise
    RATCHET_KERNELS=triton     always Triton; CPU tensors need TRITON_INTERPRET=1 set before the first kernel call
    RATCHET_KERNELS=reference  always the plain-PyTorch reference (kernels/reference.py)

Triton is imported only on the Triton path, so `import kernels` works with the CPU wheel of torch, which has no
triton. Kernels load in the input dtype, compute in fp32 and store in the input dtype. They allocate their outputs
with torch.empty / torch.empty_like: the protected tests poison those allocations to catch unwritten elements.
"""

import os

import torch

from kernels.reference import cross_entropy_ref, gelu_tanh_ref, layer_norm_ref

BACKENDS = ("auto", "triton", "reference")  # accepted values of RATCHET_KERNELS
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # activation dtypes the Triton kernels load


class KernelInputError(ValueError):
    """A kernel was called with tensors it cannot handle (shape, dtype) or a bad RATCHET_KERNELS value."""


def backend_for(tensor: torch.Tensor) -> str:
    """'triton' or 'reference': the implementation a kernel call on this tensor uses now."""
    choice = os.environ.get("RATCHET_KERNELS", "auto")
    if choice not in BACKENDS:
        raise KernelInputError(f"RATCHET_KERNELS={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if tensor.device.type == "cuda" else "reference"
    if choice == "triton" and tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("RATCHET_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 (set before kernels run)")
    return choice


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim: x [..., C], weight [C], bias [C] -> [..., C] in x's dtype."""
    _check_float("layer_norm: x", x)
    if weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise KernelInputError(
            f"layer_norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must both be ({x.shape[-1]},)")
    if backend_for(x) == "reference":
        return layer_norm_ref(x, weight, bias, eps)
    from kernels.layernorm import LayerNormFunction
    return LayerNormFunction.apply(x, weight, bias, eps)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, elementwise, in x's dtype."""
    _check_float("gelu_tanh: x", x)
    if backend_for(x) == "reference":
        return gelu_tanh_ref(x)
    from kernels.gelu import GeluTanhFunction
    return GeluTanhFunction.apply(x)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy: logits [N, V] (any float dtype), targets [N] int64 -> fp32 scalar."""
    _check_float("cross_entropy: logits", logits)
    if logits.dim() != 2 or targets.shape != (logits.shape[0],) or targets.dtype != torch.int64:
        raise KernelInputError(f"cross_entropy: expected logits [N, V] and int64 targets [N], got logits "
                               f"{tuple(logits.shape)} and {targets.dtype} targets {tuple(targets.shape)}")
    if backend_for(logits) == "reference":
        return cross_entropy_ref(logits, targets)
    from kernels.crossentropy import CrossEntropyFunction
    return CrossEntropyFunction.apply(logits, targets)


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in KERNEL_DTYPES or tensor.numel() == 0:
        raise KernelInputError(f"{name} must be a non-empty float32/float16/bfloat16 tensor, got {tensor.dtype} "
                               f"{tuple(tensor.shape)}")
