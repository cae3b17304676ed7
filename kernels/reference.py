"""Plain-PyTorch references for the Triton kernels: the ground truth the kernel tests compare against.

This file is protected from the agent. It imports torch only (never the Triton modules), computes in fp32 and
returns the input dtype, exactly as the kernels promise to. It is also the CPU path of the model, so it uses
torch's own fused ops (a first-principles LayerNorm of elementwise ops trains ~3x slower on CPU); autograd
differentiates them, which gives the reference gradients.
"""

import torch
import torch.nn.functional as F


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of x [..., C] with weight [C] and bias [C]; biased variance."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2's): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise."""
    return F.gelu(x.float(), approximate="tanh").to(x.dtype)


def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows i of logsumexp(logits[i]) - logits[i, targets[i]]: logits [N, V], targets [N] int64 -> fp32."""
    return F.cross_entropy(logits.float(), targets)
