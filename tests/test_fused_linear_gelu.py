"""``fused_linear_gelu`` (fc1 + bias + GELU, inference) against ``linear_gelu_reference`` and a float64 reference."""

from __future__ import annotations

import pytest
import torch

from hiap_kernels import linear_gelu_reference
from tests.kernel_checks import TOLERANCES as ALL_TOLERANCES
from tests.kernel_checks import needs_triton
from tests.kernel_checks import relative_error as rel_error

TOLERANCES = ALL_TOLERANCES["fused_linear_gelu"]


def fused():
    from hiap_kernels import fused_linear_gelu

    return fused_linear_gelu


def make_inputs(leading, in_features, features, dtype, device="cpu", with_bias=True):
    x = torch.randn(*leading, in_features, device=device).to(dtype)
    weight = (torch.randn(features, in_features, device=device) / in_features**0.5).to(dtype)
    bias = torch.randn(features, device=device).to(dtype) if with_bias else None
    return x, weight, bias


def fp64_reference(x, weight, bias, approximate):
    return linear_gelu_reference(x.double(), weight.double(), None if bias is None else bias.double(), approximate)


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize(
    "leading, in_features, features",
    [
        ((2, 17), 40, 37),  # ragged rows, reduction and features
        ((65,), 48, 64),
        ((1, 1), 16, 1),  # a single kept neuron
        ((3, 5), 7, 100),  # reduction narrower than one block
    ],
)
def test_kernel_and_reference_match_fp64(leading, in_features, features, approximate, dtype):
    x, weight, bias = make_inputs(leading, in_features, features, dtype)
    ref = fp64_reference(x, weight, bias, approximate)
    out = fused()(x, weight, bias, approximate)
    reference = linear_gelu_reference(x, weight, bias, approximate)
    assert out.shape == (*leading, features) and out.dtype == dtype
    assert not out.isnan().any()  # every output element written (outputs start as NaN)
    assert rel_error(out, ref) < TOLERANCES[dtype]
    assert rel_error(reference, ref) < TOLERANCES[dtype]


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_kernel_without_bias(approximate):
    x, weight, _ = make_inputs((2, 9), 24, 33, torch.float32, with_bias=False)
    out = fused()(x, weight, None, approximate)
    assert rel_error(out, fp64_reference(x, weight, None, approximate)) < TOLERANCES[torch.float32]


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_kernel_reads_strided_inputs():
    x_wide = torch.randn(2, 17, 50)
    x = x_wide[..., 5:45]  # row stride 50, last stride 1: read in place
    weight = torch.randn(40, 37).t()  # [F=37, D=40] with last stride 37: copied
    bias = torch.randn(74)[::2]
    out = fused()(x, weight, bias)
    assert rel_error(out, fp64_reference(x, weight, bias, "none")) < TOLERANCES[torch.float32]


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_large_pre_activations_saturate_without_nan():
    x = torch.tensor([[1.0, -1.0]]).repeat(4, 8) * 60.0  # [4, 16]
    weight = torch.eye(16)
    for approximate in ("none", "tanh"):
        out = fused()(x, weight, None, approximate)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, torch.relu(x))


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_empty_batch_returns_empty_output():
    x, weight, bias = make_inputs((0, 17), 16, 8, torch.float32)
    assert fused()(x, weight, bias).shape == (0, 17, 8)


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"x": torch.randn(3, 8, dtype=torch.float64)}, TypeError, "dtype"),
        ({"weight": torch.randn(5, 8, dtype=torch.float16)}, TypeError, "dtype"),
        ({"weight": torch.randn(5, 7)}, ValueError, "features"),
        ({"weight": torch.randn(5)}, ValueError, "dimensions"),
        ({"bias": torch.randn(4)}, ValueError, "bias"),
        ({"bias": torch.randn(5, device="meta")}, ValueError, "is on"),
        ({"approximate": "sigmoid"}, ValueError, "approximate"),
    ],
)
def test_kernel_rejects_bad_inputs(kwargs, error, message):
    args = {"x": torch.randn(3, 8), "weight": torch.randn(5, 8), "bias": torch.randn(5), "approximate": "none"}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        fused()(args["x"], args["weight"], args["bias"], args["approximate"])


def test_reference_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        linear_gelu_reference(torch.randn(2, 4), torch.randn(3, 4), None, "fast")


# ----------------------------------------------------------------------------------------------- GPU only


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize(
    "leading, in_features, features",
    [
        ((8, 197), 384, 1536),  # DeiT-S fc1, dense
        ((8, 197), 384, 1001),  # pruned to a ragged width
        ((2, 577), 768, 17),
        ((3,), 192, 1),
    ],
)
def test_gpu_kernel_matches_fp64(leading, in_features, features, approximate, dtype):
    x, weight, bias = make_inputs(leading, in_features, features, dtype, device="cuda")
    out = fused()(x, weight, bias, approximate)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_error(out, fp64_reference(x, weight, bias, approximate)) < TOLERANCES[dtype]


@needs_triton
def test_the_custom_op_passes_opcheck_and_compiles_without_graph_breaks():
    from hiap_kernels.linear_gelu.kernel import _linear_gelu

    x, weight, bias = make_inputs((6,), 16, 20, torch.float32)
    torch.library.opcheck(_linear_gelu, (x, weight, bias, "none"))
    torch.library.opcheck(_linear_gelu, (x, weight, None, "tanh"))
    explanation = torch._dynamo.explain(lambda t: fused()(t, weight, bias))(x.reshape(2, 3, 16))
    assert explanation.graph_break_count == 0


def _non_finite_rows(dtype=torch.float32):
    """Rows whose pre-activations hold +inf, -inf and NaN (from inf or NaN in x, and in fp32 from a product that
    overflows), and finite rows around them."""
    x, weight, bias = make_inputs((6,), 8, 16, dtype)
    x[1, 3] = float("inf")
    x[2, 0] = -float("inf")
    x[3, 5] = float("nan")
    x[4, 2] = float("inf")
    x[4, 6] = -float("inf")  # inf - inf: NaN
    if dtype == torch.float32:
        x[5, 1] = 1e38
        weight[:, 1] = weight[:, 1].sign() * 10.0  # 1e39 overflows the fp32 products (the kernel accumulates in fp32)
    return x, weight, bias


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_kernel_and_reference_share_one_policy_for_inf_and_nan(approximate, dtype):
    """A pre-activation that is not finite (+inf, -inf or NaN) gives NaN, in the kernel and in the reference; a
    finite one gives GELU of it. Nothing non-finite turns into a plausible number (GELU(-inf) = 0 would hide it)."""
    x, weight, bias = _non_finite_rows(dtype)
    pre = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    out = fused()(x, weight, bias, approximate)
    ref = linear_gelu_reference(x, weight, bias, approximate)
    assert torch.equal(out.isnan(), ~pre.isfinite()) and torch.equal(ref.isnan(), ~pre.isfinite())
    assert torch.isfinite(out[pre.isfinite()]).all()
    finite = pre.isfinite()
    torch.testing.assert_close(out[finite].double(), ref[finite].double(), rtol=1e-2, atol=1e-2)
    assert (~pre[1:5].isfinite()).any(dim=1).all()  # every broken row is tested, with +inf and -inf among them
    assert (pre == float("inf")).any() and (pre == -float("inf")).any()
