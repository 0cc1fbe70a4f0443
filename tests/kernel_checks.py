"""What every kernel test shares: the one tolerance table, the error measure, NaN-poisoned outputs, the device.

Errors are ``||out - ref|| / ||ref||`` against a float64 reference computed from the same (rounded) inputs. Every
buffer a kernel allocates comes from ``hiap_kernels.common.runtime.empty``; inside ``poisoned_allocations`` those
buffers start as NaN, so an element a kernel forgets to write shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch

from hiap_kernels import can_run_triton
from hiap_kernels.common.runtime import poisoned_allocations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative L2 error allowed against the float64 reference, per op and dtype. The gated training ops sum products
# that cancel (logit gradients), hence their looser fp32 entry.
TOLERANCES = {
    "gated_linear": {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2},
    # Masked weights are exact for hard gates; the logit gradients are sums over a gate's rows that cancel.
    "gated_weight": {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2},
    "ragged_attention": {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2},
    "fused_linear_gelu": {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2},
    # LayerNorm's output rounded to the activation dtype before the dot, as F.layer_norm's is.
    "fused_layernorm_linear": {torch.float32: 5e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2},
    "fused_linear_residual": {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2},
    # One rounding of the output after an fp32 weighted mean of a handful of rows.
    "merge_tokens": {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3},
    # A cosine from fp32 sums of products that are exact in fp32 (half inputs included), against the float64 cosine of
    # the same inputs; halves looser for the tensor cores' fp32 accumulation on a GPU.
    # fp32 probabilities and feasibility, fp64 MAC sums, as the reference; a logit gradient is one product of a handful
    # of fp32 factors, rounded to the logits' dtype at the end.
    "gate_objective": {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2},
    "nearest_tokens": {torch.float32: 2e-6, torch.float16: 1e-5, torch.bfloat16: 1e-5},
    # fp32 sums of products exact in fp32 (half inputs included) against the float64 score of the same inputs; the
    # redundancy is a mean of cosines that cancel, so the error is taken relative to the scores' scale.
    "token_redundancy": {torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6},
}

# How much looser the bound of a one-element (fully reduced) gradient is than the elementwise one.
SCALAR_SUM_FACTOR = 10

needs_triton = pytest.mark.skipif(
    not can_run_triton(torch.empty(0, device=DEVICE)), reason="needs CUDA or the Triton interpreter"
)


@pytest.fixture
def poisoned():
    """Every kernel output and workspace allocated inside the test starts as NaN."""
    with poisoned_allocations():
        yield


@pytest.fixture(params=["one tile", "16 x 32 tiles"])
def gated_weight_tiles(request, monkeypatch):
    """The launch tiles of the gated-weight ops: one per weight as the interpreter takes them, or small ones, so that
    several programs (and, in fc2's backward, several partials of the block gate) take part; rows and columns
    unequal, as on a GPU, so that a row-shaped value used as a column-shaped one fails here too."""
    if request.param != "one tile":
        import hiap_kernels.gated_weight.kernel as gated_weight_kernel

        # The family's one tile policy: qkv_weight.py, fc2_weight.py and gather.py all read it from kernel.py.
        monkeypatch.setattr(gated_weight_kernel, "_tiles", lambda: (16, 32))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64; the plain norm of ``actual`` when ``expected`` is zero."""
    actual, expected = actual.double(), expected.double()
    scale = expected.norm()
    if scale == 0:  # everything gated off: the kernel must give exact zeros too
        return actual.norm().item()
    return ((actual - expected).norm() / scale).item()


def assert_close_rel(name, actual, expected, bound, same_dtype_reference=None):
    """``actual`` within ``bound`` of the fp64 ``expected``, or within twice the same-dtype reference's error.

    A logit gradient is a sum of products that cancel; on tiny shapes half precision alone can leave the PyTorch
    reference a few 1e-3 off, and the kernel is held to twice that when it is larger than the table's bound.
    """
    if expected is None:
        assert actual is None, f"{name}: expected no gradient"
        return
    assert actual is not None, f"{name}: gradient missing"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten buffer?)"
    if expected.numel() == 1:
        # A one-element gradient (the FFN block logit's) is one sum over every neuron and token (1536 x 394 terms at
        # DeiT-S shapes) whose terms cancel: its relative error grows with that cancellation, not with the kernel's
        # accuracy. The kernel sums deterministically (per-row-block partials, no atomics); measured on an H100 in
        # fp32 it sits 2.1e-5 from the fp64 reference, just above the elementwise bound.
        bound *= SCALAR_SUM_FACTOR
    if same_dtype_reference is not None:
        bound = max(bound, 2 * relative_error(same_dtype_reference, expected))
    error = relative_error(actual, expected)
    assert error <= bound, f"{name}: relative error {error:.3e} > {bound:.1e}"


def run_with_grads(fn, inputs: dict, grad_outputs, **kwargs):
    """Call ``fn`` on leaf copies of ``inputs``, backprop ``grad_outputs``, return (outputs, grads by name)."""
    leaves = {name: None if t is None else t.detach().clone().requires_grad_() for name, t in inputs.items()}
    outputs = fn(*leaves.values(), **kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, [g.to(o.dtype) for o, g in zip(outputs, grad_outputs)])
    return [o.detach() for o in outputs], {n: None if t is None else t.grad for n, t in leaves.items()}


def as_fp64(inputs: dict) -> dict:
    return {n: None if t is None else t.double() for n, t in inputs.items()}
