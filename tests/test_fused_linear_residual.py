"""``fused_linear_residual`` (proj / fc2 + bias + LayerScale + residual add, inference) against float64."""

from __future__ import annotations

import pytest
import torch

from hiap_kernels import linear_residual_reference
from tests.kernel_checks import DEVICE, needs_triton
from tests.kernel_checks import TOLERANCES as ALL_TOLERANCES
from tests.kernel_checks import relative_error as rel_error

TOLERANCES = ALL_TOLERANCES["fused_linear_residual"]


def fused():
    from hiap_kernels import fused_linear_residual

    return fused_linear_residual


def make_inputs(leading, in_features, features, dtype, device="cpu", bias=True, scale=True):
    x = torch.randn(*leading, in_features, device=device).to(dtype)
    weight = (torch.randn(features, in_features, device=device) / in_features**0.5).to(dtype)
    residual = torch.randn(*leading, features, device=device).to(dtype)
    b = torch.randn(features, device=device).to(dtype) if bias else None
    gamma = (torch.rand(features, device=device) * 0.2).to(dtype) if scale else None
    return x, weight, b, residual, gamma


def fp64(*tensors):
    return [None if t is None else t.double() for t in tensors]


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bias,scale", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("leading, in_features, features", [((2, 17), 40, 37), ((65,), 100, 48), ((1, 1), 7, 1)])
def test_kernel_and_reference_match_fp64(leading, in_features, features, bias, scale, dtype):
    inputs = make_inputs(leading, in_features, features, dtype, bias=bias, scale=scale)
    expected = linear_residual_reference(*fp64(*inputs))
    out = fused()(*inputs)
    assert out.shape == (*leading, features) and out.dtype == dtype and not out.isnan().any()
    assert rel_error(out, expected) < TOLERANCES[dtype]
    assert rel_error(linear_residual_reference(*inputs), expected) < TOLERANCES[dtype]


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_strided_inputs_and_compile_without_graph_breaks():
    x_wide = torch.randn(2, 9, 50)
    x = x_wide[..., 5:45]
    weight = torch.randn(40, 24).t()  # [24, 40], last stride 24: copied
    residual = torch.randn(2, 9, 48)[..., :24]
    out = fused()(x, weight, None, residual, None)
    assert rel_error(out, linear_residual_reference(*fp64(x, weight, None, residual, None))) < 2e-6
    explanation = torch._dynamo.explain(fused())(x.contiguous(), weight.contiguous(), None, residual.contiguous())
    assert explanation.graph_break_count == 0


@needs_triton
def test_custom_op_passes_opcheck():
    from hiap_kernels.linear_residual.kernel import _linear_residual

    x, weight, bias, residual, gamma = make_inputs((9,), 16, 24, torch.float32, device=DEVICE)
    torch.library.opcheck(_linear_residual, (x, weight, bias, residual, gamma))


@needs_triton
@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: {**a, "x": a["x"].double()}, TypeError, "dtype"),
        (lambda a: {**a, "weight": torch.randn(5, 7)}, ValueError, "features"),
        (lambda a: {**a, "residual": torch.randn(3, 4)}, ValueError, "residual must have shape"),
        (lambda a: {**a, "bias": torch.randn(4)}, ValueError, "bias has 4"),
        (lambda a: {**a, "layer_scale": torch.randn(6)}, ValueError, "layer_scale has 6"),
    ],
)
def test_bad_inputs_are_one_line_errors(change, error, message):
    args = {"x": torch.randn(3, 8), "weight": torch.randn(5, 8), "bias": torch.randn(5), "residual": torch.randn(3, 5),
            "layer_scale": torch.randn(5)}
    with pytest.raises(error, match=message) as caught:
        fused()(**change(args))
    assert "\n" not in str(caught.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("in_features, features", [(384, 384), (1024, 384), (1536, 384), (211, 384)])
def test_gpu_kernel_matches_fp64_at_deit_shapes(in_features, features, dtype):
    inputs = make_inputs((8, 197), in_features, features, dtype, device="cuda")
    out = fused()(*inputs)
    assert rel_error(out, linear_residual_reference(*fp64(*inputs))) < TOLERANCES[dtype]
