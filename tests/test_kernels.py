"""Kernel tests: each Triton kernel against its plain-PyTorch reference, outputs and gradients, per dtype.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with
TRITON_INTERPRET=0 on a GPU box the same tests run the compiled kernels on CUDA. Every test draws fresh random
inputs of non-power-of-two sizes (its seed is printed on failure), fills the kernels' output allocations with
NaN, and computes the reference only afterwards, on clones: unwritten elements and stale results cannot pass.
"""

import contextlib
import importlib.util
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.reference import cross_entropy_ref, gelu_tanh_ref, layer_norm_ref

REPO_ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Per dtype of the compared tensor: (rtol, atol as a fraction of the reference's largest magnitude).
# fp32: summation-order noise. fp16 / bf16: results are computed in fp32 on both sides and rounded once, so they
# may differ by 1 ulp (2^-10, 2^-7); the interpreter truncates fp32 -> bf16 instead of rounding, hence 2 ulp.
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (INTERPRET or torch.cuda.is_available()),
    reason="needs triton and either TRITON_INTERPRET=1 or a CUDA GPU")


@pytest.fixture
def seed():
    """A fresh seed per test, printed so a failure can be replayed."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    print(f"torch seed {value}")
    return value


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv("RATCHET_KERNELS", "triton")


@contextlib.contextmanager
def poisoned_allocations():
    """Within the block, torch.empty and torch.empty_like return NaN-filled memory; yields the list of calls."""
    calls = []
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        calls.append(tuple(tensor.shape))
        with torch.no_grad():
            return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)

    torch.empty = lambda *args, **kwargs: poison(real_empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: poison(real_empty_like(*args, **kwargs))
    try:
        yield calls
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def assert_matches(actual, expected, what, rtol=None):
    dtype_rtol, atol_fraction = TOLERANCES[expected.dtype]
    rtol = rtol or dtype_rtol
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{what}: {actual.dtype} " \
        f"{tuple(actual.shape)} != {expected.dtype} {tuple(expected.shape)}"
    atol = atol_fraction * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda message: f"{what}: {message}")


def check_against_reference(kernel_fn, reference_fn, *inputs, rtol=None):
    """Forward and backward through kernel_fn (under poison), then reference_fn on clones; compare everything."""
    kernel_inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    reference_inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with poisoned_allocations() as allocations:
        out = kernel_fn(*kernel_inputs)
        grad_out = torch.randn(out.shape, device=out.device).to(out.dtype)
        out.backward(grad_out)
    assert allocations, "the kernel allocated nothing with torch.empty/empty_like, so its outputs were not poisoned"
    assert isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction), \
        f"{kernel_fn.__name__} did not run through a kernel's autograd.Function (grad_fn {out.grad_fn})"
    expected = reference_fn(*reference_inputs)
    expected.backward(grad_out)
    assert_matches(out, expected, f"{kernel_fn.__name__} output", rtol)
    for index, (kernel_input, reference_input) in enumerate(zip(kernel_inputs, reference_inputs)):
        if reference_input.grad is not None:
            assert_matches(kernel_input.grad, reference_input.grad, f"{kernel_fn.__name__} grad of input {index}", rtol)


def test_references_match_torch_builtins(seed):
    x, weight, bias = torch.randn(37, 200), torch.randn(200), torch.randn(200)
    logits, targets = torch.randn(37, 1000) * 4, torch.randint(0, 1000, (37,))
    torch.testing.assert_close(layer_norm_ref(x, weight, bias, 1e-5), F.layer_norm(x, (200,), weight, bias, 1e-5))
    torch.testing.assert_close(gelu_tanh_ref(x * 3), F.gelu(x * 3, approximate="tanh"))
    torch.testing.assert_close(cross_entropy_ref(logits, targets), F.cross_entropy(logits, targets))


@needs_triton
@pytest.mark.parametrize("shape", [(37, 200), (3, 29, 200)])  # 87 rows: several row blocks per backward program
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_matches_reference(seed, force_triton, shape, dtype):
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)  # nonzero mean: centering matters
    weight = torch.randn(shape[-1], device=DEVICE)  # fp32 parameters with bf16 activations, as under autocast
    bias = torch.randn(shape[-1], device=DEVICE)
    check_against_reference(kernels.layer_norm, layer_norm_ref, x, weight, bias)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_matches_reference(seed, force_triton, dtype):
    x = torch.randn(37, 200, device=DEVICE) * 3
    x[0, :4] = torch.tensor([-80.0, -12.0, 12.0, 80.0])  # saturated tails: the gate must not overflow to NaN
    check_against_reference(kernels.gelu_tanh, gelu_tanh_ref, x.to(dtype))


@needs_triton
@pytest.mark.parametrize("vocab", [1000, 9000])  # 9000: several vocab chunks and a ragged last chunk
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_matches_reference(seed, force_triton, vocab, dtype):
    logits = (torch.randn(37, vocab, device=DEVICE) * 4).to(dtype)
    targets = torch.randint(0, vocab, (37,), device=DEVICE)
    check_against_reference(kernels.cross_entropy, cross_entropy_ref, logits, targets)


@needs_triton
def test_cross_entropy_is_stable_for_large_logits(seed, force_triton):
    # exp(200) overflows fp32: only a max-subtracted (online) logsumexp gets these right.
    logits = torch.randn(37, 5000, device=DEVICE) * 10 + 200
    targets = torch.randint(0, 5000, (37,), device=DEVICE)
    check_against_reference(kernels.cross_entropy, cross_entropy_ref, logits, targets)


@needs_triton
def test_cross_entropy_is_as_accurate_as_torch_where_the_target_is_nearly_certain(force_triton):
    # Near 200 a logsumexp rounded to fp32 is off by up to 7.6e-6, and exp(logit - logsumexp) keeps that as
    # relative error. The target's gradient p - 1 (p = 0.97 here) cancels and multiplies it by p / (1 - p) = 32.
    # Both fp32 paths lose digits here, so each is measured against fp64: a kernel that recomputed the softmax
    # from the rounded logsumexp was 5x worse than torch (2.3e-4 vs 4.7e-5); random logits with spread 10 hit
    # this now and then (seed 1033084816 failed the comparison with the reference above).
    logits = torch.linspace(-1, 1, 37 * 5000, device=DEVICE).reshape(37, 5000) + 200
    targets = torch.arange(37, device=DEVICE) * 131
    logits[torch.arange(37), targets] += 12
    exact = logits.double().requires_grad_()
    torch.nn.functional.cross_entropy(exact, targets).backward()
    target_grad = exact.grad[torch.arange(37), targets]

    def target_grad_error(fn):
        x = logits.clone().requires_grad_()
        fn(x, targets).backward()
        return ((x.grad[torch.arange(37), targets].double() - target_grad).abs() / target_grad.abs()).max().item()

    assert target_grad_error(kernels.cross_entropy) <= 2 * target_grad_error(cross_entropy_ref)


@needs_triton
def test_cross_entropy_out_of_range_target_is_nan(seed, force_triton):
    logits, targets = torch.randn(37, 1000, device=DEVICE), torch.randint(0, 1000, (37,), device=DEVICE)
    targets[5] = 1000
    assert torch.isnan(kernels.cross_entropy(logits, targets))


def test_auto_backend_is_reference_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("RATCHET_KERNELS", raising=False)
    x = torch.randn(3, 8, requires_grad=True)
    assert kernels.backend_for(x) == "reference"
    assert kernels.backend_for(types.SimpleNamespace(device=torch.device("cuda", 0))) == "triton"
    y = kernels.layer_norm(x, torch.ones(8), torch.zeros(8))
    assert not isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)
    torch.testing.assert_close(y, layer_norm_ref(x, torch.ones(8), torch.zeros(8)))


@needs_triton
def test_forced_backends(monkeypatch):
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    logits, targets = torch.randn(3, 8, device=DEVICE, requires_grad=True), torch.tensor([1, 2, 7], device=DEVICE)
    ones, zeros = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    for backend, uses_custom_function in [("triton", True), ("reference", False)]:
        monkeypatch.setenv("RATCHET_KERNELS", backend)
        assert kernels.backend_for(x) == backend
        for out in [kernels.layer_norm(x, ones, zeros), kernels.gelu_tanh(x), kernels.cross_entropy(logits, targets)]:
            assert isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction) == uses_custom_function


def test_bad_backend_name_is_rejected(monkeypatch):
    monkeypatch.setenv("RATCHET_KERNELS", "cuda")
    with pytest.raises(kernels.KernelInputError, match="RATCHET_KERNELS='cuda'"):
        kernels.gelu_tanh(torch.randn(4))


def test_forced_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setenv("RATCHET_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.gelu_tanh(torch.randn(4))


@pytest.mark.parametrize("call, message", [
    (lambda: kernels.layer_norm(torch.randn(4, 8), torch.ones(7), torch.zeros(8)), "weight"),
    (lambda: kernels.gelu_tanh(torch.arange(4)), "float32/float16/bfloat16"),
    (lambda: kernels.cross_entropy(torch.randn(4, 8), torch.zeros(4, dtype=torch.int32)), "int64 targets"),
    (lambda: kernels.cross_entropy(torch.randn(4, 8), torch.zeros(3, dtype=torch.int64)), "int64 targets"),
])
def test_bad_inputs_raise_a_clear_error(call, message):
    with pytest.raises(kernels.KernelInputError, match=message):
        call()


def test_import_and_reference_path_work_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail, as with the CPU wheel
            "import torch, kernels\n"
            "x = torch.randn(4, 8)\n"
            "y = kernels.gelu_tanh(kernels.layer_norm(x, torch.ones(8), torch.zeros(8)))\n"
            "print(float(kernels.cross_entropy(y, torch.tensor([0, 1, 2, 3]))))\n")
    env = {k: v for k, v in os.environ.items() if k != "RATCHET_KERNELS"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU box the benchmark would run for real")
def test_bench_without_cuda_exits_nonzero_with_a_message(capsys):
    from kernels import bench
    with pytest.raises(SystemExit) as exit_info:
        bench.main([])
    assert exit_info.value.code != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err
