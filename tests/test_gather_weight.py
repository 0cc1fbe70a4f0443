"""``gather_weight`` (a fixed structure's kept rows / columns, scaled; the gradient scattered back) against its
reference."""

import pytest
import torch

from hiap_kernels import gather_weight, gather_weight_reference
from hiap_kernels.gated_weight import inverse_index
from hiap_kernels.gated_weight.gather import _gather_weight_op
from tests.kernel_checks import DEVICE, needs_triton, run_with_grads

pytestmark = [pytest.mark.usefixtures("poisoned"), needs_triton]


def _case(rows, cols, kept, dim, dtype=torch.float32, bias=False, scale=False):
    size = (rows, cols)[dim]
    index = torch.randperm(size)[:kept].sort().values.to(DEVICE)
    inverse = inverse_index(index, size)
    inputs = {"weight": torch.randn(rows, cols, device=DEVICE).to(dtype),
              "bias": torch.randn(rows, device=DEVICE).to(dtype) if bias else None}
    # The decision's scale: mostly ones, some zeros (q / v columns closed inside a kept head).
    fixed = {"index": index, "inverse": inverse,
             "scale": (torch.rand(kept, device=DEVICE) > 0.3).float() if scale else None, "dim": dim}
    out_shape = (kept, cols) if dim == 0 else (rows, kept)
    grads = [torch.randn(out_shape, device=DEVICE)] + ([torch.randn(kept, device=DEVICE)] if bias and dim == 0 else [])
    return inputs, fixed, grads


def _call(fn, fixed):
    def call(weight, bias):
        out, out_bias = fn(weight, bias, **fixed)
        return (out,) if out_bias is None else (out, out_bias)
    return call


# Row gathers with and without bias and scale (qkv, fc1), column gathers (proj, fc2), none kept, all kept.
@pytest.mark.parametrize("rows, cols, kept, dim, bias, scale", [
    (36, 13, 17, 0, True, True), (20, 7, 20, 0, True, False), (9, 30, 11, 1, False, True), (5, 40, 23, 1, False, False),
    (12, 5, 0, 0, True, True), (6, 9, 0, 1, False, False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_gradients_equal_the_reference_exactly(gated_weight_tiles, rows, cols, kept, dim, bias, scale,
                                                          dtype):
    inputs, fixed, grads = _case(rows, cols, kept, dim, dtype, bias, scale)
    outs, got = run_with_grads(_call(gather_weight, fixed), inputs, grads)
    ref_outs, expected = run_with_grads(_call(gather_weight_reference, fixed), inputs, grads)
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == dtype and torch.equal(out, ref)
    for name in ("weight", "bias"):
        if expected[name] is None:
            assert got[name] is None
        else:  # a gather and a scatter of products by 0 or 1: exact
            assert torch.equal(got[name], expected[name]), name


def test_a_gradient_through_the_bias_alone_leaves_zeros_in_the_weight():
    inputs, fixed, _ = _case(8, 5, 3, 0, bias=True, scale=True)
    weight, bias = (t.clone().requires_grad_() for t in inputs.values())
    gather_weight(weight, bias, **fixed)[1].sum().backward()
    expected = torch.zeros(8, device=DEVICE)
    expected[fixed["index"]] = fixed["scale"]
    assert not weight.grad.any() and torch.equal(bias.grad, expected)


def test_a_strided_weight_view_compiles_into_one_graph():
    inputs, fixed, _ = _case(16, 24, 9, 1)
    weight = torch.randn(16, 50, device=DEVICE)[:, 5:29]
    expected = gather_weight_reference(weight, None, **fixed)[0]
    fn = torch.compile(lambda w: gather_weight(w, None, **fixed)[0], backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(weight), expected)


def test_custom_op_passes_opcheck():
    inputs, fixed, _ = _case(10, 6, 4, 0, bias=True, scale=True)
    for tensor in inputs.values():
        tensor.requires_grad_()
    torch.library.opcheck(_gather_weight_op, (*inputs.values(), *fixed.values()))


@pytest.mark.parametrize("change, message", [
    (lambda f: f.update(dim=2), "dim must be"),
    (lambda f: f.update(index=f["index"].int()), "dtype"),
    (lambda f: f.update(inverse=f["inverse"][:-1]), "inverse has"),
    (lambda f: f.update(scale=f["scale"][:-1]), "scale has"),
])
def test_bad_inputs_are_one_line_errors(change, message):
    inputs, fixed, _ = _case(10, 6, 4, 0, bias=True, scale=True)
    change(fixed)
    with pytest.raises((TypeError, ValueError), match=message) as info:
        gather_weight(inputs["weight"], inputs["bias"], **fixed)
    assert "\n" not in str(info.value)


def test_a_bias_goes_only_with_rows():
    inputs, fixed, _ = _case(10, 6, 4, 1)
    with pytest.raises(ValueError, match="a bias goes with a row gather"):
        gather_weight(inputs["weight"], torch.randn(10, device=DEVICE), **fixed)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [0, 1])
def test_gpu_kernel_equals_the_reference_at_deit_shapes(dim):
    inputs, fixed, grads = _case(1152, 384, 700, 0, torch.bfloat16, True, True) if dim == 0 else \
        _case(384, 1536, 900, 1, torch.bfloat16)
    outs, got = run_with_grads(_call(gather_weight, fixed), inputs, grads)
    ref_outs, expected = run_with_grads(_call(gather_weight_reference, fixed), inputs, grads)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref_outs))
    assert torch.equal(got["weight"], expected["weight"])


# Indices out of range: refused on the host (once per index tensor), never read in the kernel


@pytest.mark.parametrize("fn", [gather_weight, gather_weight_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("change, message", [
    (lambda index, inverse, size: (index.index_fill(0, torch.tensor([1], device=DEVICE), size), inverse),
     "index holds {size}, outside \\[0, {size}\\)"),
    (lambda index, inverse, size: (index.index_fill(0, torch.tensor([0], device=DEVICE), -3), inverse),
     "index holds -3, outside \\[0, {size}\\)"),
    (lambda index, inverse, size: (index, inverse.index_fill(0, torch.tensor([2], device=DEVICE), 99)),
     "inverse holds 99, outside \\[-1, 4\\)"),
    (lambda index, inverse, size: (index.flip(0), inverse), "inverse is not the inverse of index"),
    (lambda index, inverse, size: (index.index_fill(0, torch.tensor([0], device=DEVICE), int(index[1])), inverse),
     "inverse is not the inverse of index"),
], ids=["past-the-end", "negative", "inverse-out-of-range", "not-inverse", "repeated"])
def test_indices_out_of_range_or_inconsistent_are_refused(fn, dim, change, message):
    inputs, fixed, _ = _case(10, 10, 4, dim, bias=dim == 0, scale=True)
    fixed["index"], fixed["inverse"] = change(fixed["index"], fixed["inverse"], 10)
    with pytest.raises(ValueError, match=message.format(size=10)) as info:
        fn(inputs["weight"], inputs["bias"], **fixed)
    assert "\n" not in str(info.value)


def test_an_index_edited_in_place_after_a_call_is_checked_again():
    inputs, fixed, _ = _case(10, 6, 4, 0)
    gather_weight(inputs["weight"], None, **fixed)
    fixed["index"][0] = 10
    with pytest.raises(ValueError, match="index holds 10"):
        gather_weight(inputs["weight"], None, **fixed)


@pytest.mark.parametrize("dim", [0, 1])
def test_the_kernel_flags_an_index_out_of_range_with_nan_instead_of_reading_it(dim):
    """What the kernel does with indices the host did not check (under torch.compile): the rows / columns of an
    index outside the weight come out NaN, never a value read from outside it."""
    inputs, fixed, _ = _case(12, 12, 5, dim, bias=dim == 0, scale=True)
    bad = fixed["index"].clone()
    bad[1], bad[3] = 12 + 1000, -1000
    out, out_bias = _gather_weight_op(inputs["weight"], inputs["bias"], bad, fixed["inverse"], fixed["scale"], dim)
    expected, expected_bias = gather_weight_reference(inputs["weight"], inputs["bias"], **fixed)
    flagged = torch.zeros(5, dtype=torch.bool, device=DEVICE)
    flagged[[1, 3]] = True
    rows = out if dim == 0 else out.T
    assert rows[flagged].isnan().all()
    assert torch.equal(rows[~flagged], (expected if dim == 0 else expected.T)[~flagged])
    if dim == 0:
        assert out_bias[flagged].isnan().all() and torch.equal(out_bias[~flagged], expected_bias[~flagged])


@pytest.mark.parametrize("dim", [0, 1])
def test_the_backward_kernel_flags_an_inverse_out_of_range_with_nan(dim):
    from hiap_kernels.gated_weight.gather import _gather_weight_backward_op

    inputs, fixed, grads = _case(12, 12, 5, dim, bias=dim == 0, scale=True)
    bad = fixed["inverse"].clone()
    left_out = int((bad < 0).nonzero()[0])
    bad[left_out] = 5 + 1000
    grad_bias = grads[1] if dim == 0 else None
    grad, out_grad_bias = _gather_weight_backward_op(grads[0], grad_bias, inputs["weight"], inputs["bias"], bad,
                                                     fixed["scale"], dim)
    expected, expected_bias = _gather_weight_backward_op(grads[0], grad_bias, inputs["weight"], inputs["bias"],
                                                         fixed["inverse"], fixed["scale"], dim)
    rows, expected_rows = (grad, expected) if dim == 0 else (grad.T, expected.T)
    assert rows[left_out].isnan().all()
    others = torch.arange(12, device=DEVICE) != left_out
    assert torch.equal(rows[others], expected_rows[others])
    if dim == 0:
        assert out_grad_bias[left_out].isnan() and torch.equal(out_grad_bias[others], expected_bias[others])
