"""Time each Triton kernel against its reference and torch's built-in on a GPU: `python -m kernels.bench`.

Shapes are GPT-2 small's (8 sequences x 1024 tokens, width 768, MLP width 3072, vocab 50304) with bf16
activations, as under autocast; torch's built-ins run under autocast too, as the baseline model would call them.
For each implementation it prints the median time of the forward and of forward+backward
(triton.testing.do_bench) and the effective bandwidth: the bytes a fused kernel must move (read each input and
write each output once), divided by the time. The same byte count for every row makes rows comparable with each
other and with the GPU's peak (H100 SXM: about 3,350 GB/s). The last column is the largest forward difference from
the reference, a sanity check that the timed kernel computes the right thing.
"""

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.reference import cross_entropy_ref, gelu_tanh_ref, layer_norm_ref

TOKENS = 8 * 1024  # batch 8 x sequence 1024
WIDTH = 768  # GPT-2 small's model width
MLP_WIDTH = 4 * WIDTH  # GELU runs on the MLP's hidden activation
VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 128, as in modded-nanogpt
ACTIVATION_DTYPE = torch.bfloat16  # activations under autocast
EPS = 1e-5  # LayerNorm epsilon


@dataclass
class Case:
    name: str
    make_inputs: Callable[[], tuple]  # fresh inputs on the GPU; float inputs require grad
    implementations: dict[str, Callable]  # label -> fn(*inputs) -> output; "reference" is the correctness baseline
    activation_bytes: int  # bytes of the tensor that a pass reads or writes: [TOKENS, width] in bf16
    forward_passes: int  # passes over it by an ideal fused forward
    backward_passes: int  # and by an ideal fused backward


def under_autocast(fn: Callable) -> Callable:
    def run(*inputs):
        with torch.autocast("cuda", dtype=ACTIVATION_DTYPE):
            return fn(*inputs)
    return run


def make_cases(compile_reference: bool) -> list[Case]:
    from kernels.crossentropy import CrossEntropyFunction  # imports triton: only once a GPU is known to exist
    from kernels.gelu import GeluTanhFunction
    from kernels.layernorm import LayerNormFunction

    def activation(width):
        return torch.randn(TOKENS, width, device="cuda", dtype=ACTIVATION_DTYPE, requires_grad=True)

    def parameter():
        return torch.randn(WIDTH, device="cuda", requires_grad=True)

    cases = [
        Case("layer_norm", lambda: (activation(WIDTH), parameter(), parameter()),
             {"triton": lambda x, w, b: LayerNormFunction.apply(x, w, b, EPS),
              "reference": lambda x, w, b: layer_norm_ref(x, w, b, EPS),
              "torch F.layer_norm": under_autocast(lambda x, w, b: F.layer_norm(x, (WIDTH,), w, b, EPS))},
             # fwd: read x, write y; bwd: read x and dy, write dx
             TOKENS * WIDTH * ACTIVATION_DTYPE.itemsize, forward_passes=2, backward_passes=3),
        Case("gelu_tanh", lambda: (activation(MLP_WIDTH),),
             {"triton": GeluTanhFunction.apply,
              "reference": gelu_tanh_ref,
              "torch F.gelu": under_autocast(lambda x: F.gelu(x, approximate="tanh"))},
             TOKENS * MLP_WIDTH * ACTIVATION_DTYPE.itemsize, forward_passes=2, backward_passes=3),
        Case("cross_entropy", lambda: (activation(VOCAB), torch.randint(0, VOCAB, (TOKENS,), device="cuda")),
             {"triton": CrossEntropyFunction.apply,
              "reference": cross_entropy_ref,
              "torch F.cross_entropy": under_autocast(F.cross_entropy)},
             # fwd: read logits; bwd: read logits, write dlogits
             TOKENS * VOCAB * ACTIVATION_DTYPE.itemsize, forward_passes=1, backward_passes=2),
    ]
    if compile_reference:
        for case in cases:
            case.implementations["compiled reference"] = torch.compile(case.implementations["reference"])
    return cases


def time_case(case: Case) -> list[tuple]:
    """(implementation, fwd ms, fwd GB/s, fwd+bwd ms, fwd+bwd GB/s, max |output - reference|) per implementation."""
    from triton.testing import do_bench

    inputs = case.make_inputs()
    grad_inputs = [t for t in inputs if t.requires_grad]
    with torch.no_grad():
        expected = case.implementations["reference"](*inputs).float()
    rows = []
    for label, fn in case.implementations.items():
        out = fn(*inputs)
        error = (out.detach().float() - expected).abs().max().item()
        grad_out = torch.randn_like(out)
        forward_ms = do_bench(lambda: fn(*inputs))
        forward_backward_ms = do_bench(lambda: fn(*inputs).backward(grad_out), grad_to_none=grad_inputs)
        forward_bytes = case.activation_bytes * case.forward_passes
        total_bytes = forward_bytes + case.activation_bytes * case.backward_passes
        rows.append((label, forward_ms, forward_bytes / forward_ms / 1e6,
                     forward_backward_ms, total_bytes / forward_backward_ms / 1e6, error))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(reference) (slow to start)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.bench: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed",
              file=sys.stderr)
        sys.exit(1)
    print(f"{torch.cuda.get_device_name()}, {TOKENS} tokens, width {WIDTH}, vocab {VOCAB}, "
          f"{ACTIVATION_DTYPE} activations; median ms, GB/s = ideal fused bytes / time")
    print(f"{'kernel':<14} {'implementation':<22} {'fwd ms':>8} {'fwd GB/s':>9} {'f+b ms':>8} {'f+b GB/s':>9} "
          f"{'max err':>9}")
    for case in make_cases(args.compile):
        for label, forward_ms, forward_gbps, total_ms, total_gbps, error in time_case(case):
            print(f"{case.name:<14} {label:<22} {forward_ms:>8.3f} {forward_gbps:>9.0f} {total_ms:>8.3f} "
                  f"{total_gbps:>9.0f} {error:>9.2e}")


if __name__ == "__main__":
    main()
