"""``fused_layernorm_linear`` (LayerNorm in the GEMM prologue, bias and GELU in its epilogue) against float64."""

from __future__ import annotations

import pytest
import torch

from hiap_kernels import layernorm_linear_reference
from tests.kernel_checks import DEVICE, needs_triton
from tests.kernel_checks import TOLERANCES as ALL_TOLERANCES
from tests.kernel_checks import relative_error as rel_error

TOLERANCES = ALL_TOLERANCES["fused_layernorm_linear"]


def fused():
    from hiap_kernels import fused_layernorm_linear

    return fused_layernorm_linear


def make_inputs(leading, in_features, features, dtype, device="cpu", affine=True, bias=True, offset=0.0):
    x = (torch.randn(*leading, in_features, device=device) * 2.0 + offset).to(dtype)
    gamma = (1.0 + 0.1 * torch.randn(in_features, device=device)).to(dtype) if affine else None
    beta = (0.1 * torch.randn(in_features, device=device)).to(dtype) if affine else None
    weight = (torch.randn(features, in_features, device=device) / in_features**0.5).to(dtype)
    b = torch.randn(features, device=device).to(dtype) if bias else None
    return x, gamma, beta, 1e-6, weight, b


def fp64(x, gamma, beta, eps, weight, bias):
    return [None if t is None else t.double() for t in (x, gamma, beta)] + [eps] + \
        [None if t is None else t.double() for t in (weight, bias)]


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("leading, in_features, features", [((2, 17), 40, 37), ((65,), 100, 48), ((1, 1), 7, 1)])
def test_kernel_and_reference_match_fp64(leading, in_features, features, activation, dtype):
    inputs = make_inputs(leading, in_features, features, dtype)
    expected = layernorm_linear_reference(*fp64(*inputs), activation)
    out = fused()(*inputs, activation)
    assert out.shape == (*leading, features) and out.dtype == dtype and not out.isnan().any()
    assert rel_error(out, expected) < TOLERANCES[dtype]
    assert rel_error(layernorm_linear_reference(*inputs, activation), expected) < TOLERANCES[dtype]


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_without_affine_or_bias_and_with_a_large_mean():
    # A residual stream whose mean is 100 times its spread: the two-pass variance keeps full precision.
    inputs = make_inputs((3, 11), 64, 24, torch.float32, affine=False, bias=False, offset=200.0)
    out = fused()(*inputs)
    assert rel_error(out, layernorm_linear_reference(*fp64(*inputs))) < TOLERANCES[torch.float32]


@needs_triton
def test_custom_op_passes_opcheck_and_compiles_without_graph_breaks():
    from hiap_kernels.layernorm_linear.kernel import _layernorm_linear

    x, gamma, beta, eps, weight, bias = make_inputs((9,), 16, 24, torch.float32, device=DEVICE)
    torch.library.opcheck(_layernorm_linear, (x, gamma, beta, eps, weight, bias, "gelu"))
    explanation = torch._dynamo.explain(fused())(x, gamma, beta, eps, weight, bias, "gelu")
    assert explanation.graph_break_count == 0


@needs_triton
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "x": a["x"].double()}, "dtype"),
        (lambda a: {**a, "weight": torch.randn(5, 7)}, "features"),
        (lambda a: {**a, "norm_weight": torch.randn(7)}, "norm_weight has 7"),
        (lambda a: {**a, "bias": torch.randn(4)}, "bias has 4"),
        (lambda a: {**a, "activation": "relu"}, "activation"),
        (lambda a: {**a, "eps": 0.0}, "eps"),
    ],
)
def test_bad_inputs_are_one_line_errors(change, message):
    args = {"x": torch.randn(3, 8), "norm_weight": torch.randn(8), "norm_bias": torch.randn(8), "eps": 1e-6,
            "weight": torch.randn(5, 8), "bias": torch.randn(5), "activation": "none"}
    with pytest.raises((TypeError, ValueError), match=message) as caught:
        fused()(**change(args))
    assert "\n" not in str(caught.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("features, activation", [(1152, "none"), (1024, "gelu"), (211, "gelu")])
def test_gpu_kernel_matches_fp64_at_deit_shapes(features, activation, dtype):
    inputs = make_inputs((8, 197), 384, features, dtype, device="cuda")
    out = fused()(*inputs, activation)
    assert rel_error(out, layernorm_linear_reference(*fp64(*inputs), activation)) < TOLERANCES[dtype]


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_kernel_and_reference_share_one_policy_for_inf_and_nan(activation):
    """As fused_linear_gelu: a pre-activation that is not finite gives NaN in both (its GELU epilogue is the same)."""
    x, gamma, beta, eps, weight, bias = make_inputs((3,), 8, 16, torch.float32)
    weight[2, 0] = float("inf")
    weight[5, 1] = -float("inf")
    weight[7, 2] = float("nan")
    out = fused()(x, gamma, beta, eps, weight, bias, activation)
    ref = layernorm_linear_reference(x, gamma, beta, eps, weight, bias, activation)
    pre = layernorm_linear_reference(x, gamma, beta, eps, weight, bias, "none")
    assert (pre == float("inf")).any() and (pre == -float("inf")).any()
    assert torch.equal(out.isnan(), ~pre.isfinite()) and torch.equal(ref.isnan(), ~pre.isfinite())
    torch.testing.assert_close(out[pre.isfinite()], ref[pre.isfinite()], rtol=1e-4, atol=1e-4)
