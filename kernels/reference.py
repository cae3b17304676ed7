"""Plain-PyTorch references for the Triton kernels: the ground truth the kernel tests compare against.

This file is protected from the agent. It imports torch only (never the Triton modules), computes in fp32 and
returns the input dtype, exactly as the kernels promise to. Autograd differentiates these directly, which gives
the reference gradients.
"""

import math

import torch

GELU_TANH_SCALE = math.sqrt(2.0 / math.pi)  # sqrt(2/pi) in GELU's tanh approximation (Hendrycks & Gimpel)
GELU_TANH_CUBIC = 0.044715  # cubic coefficient of the same approximation


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of x [..., C] with weight [C] and bias [C]; biased variance, as torch's."""
    x32 = x.float()
    mean = x32.mean(dim=-1, keepdim=True)
    centered = x32 - mean
    variance = centered.pow(2).mean(dim=-1, keepdim=True)
    y = centered * torch.rsqrt(variance + eps) * weight.float() + bias.float()
    return y.to(x.dtype)


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2's): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise."""
    x32 = x.float()
    y = 0.5 * x32 * (1.0 + torch.tanh(GELU_TANH_SCALE * (x32 + GELU_TANH_CUBIC * x32.pow(3))))
    return y.to(x.dtype)


def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows i of logsumexp(logits[i]) - logits[i, targets[i]]: logits [N, V], targets [N] int64 -> fp32."""
    logits32 = logits.float()
    target_logits = logits32.gather(1, targets[:, None]).squeeze(1)
    return (torch.logsumexp(logits32, dim=1) - target_logits).mean()
