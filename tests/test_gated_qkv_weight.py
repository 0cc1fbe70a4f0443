"""``gated_qkv_weight`` (sampling + the row masks of qkv's weight, one launch each way) against its reference."""

import pytest
import torch

from hiap_kernels import gated_qkv_weight, gated_qkv_weight_reference
from hiap_kernels.gated_weight.qkv_weight import _gated_qkv_weight_op
from tests.kernel_checks import DEVICE, TOLERANCES, as_fp64, assert_close_rel, needs_triton, run_with_grads

pytestmark = [pytest.mark.usefixtures("poisoned"), needs_triton]

GRAD_NAMES = ("weight", "bias", "head_logits", "qk_logits", "v_logits")


def _inputs(heads, head_dim, groups, dim, dtype, bias=True):
    rows = 3 * heads * head_dim
    return {
        "weight": torch.randn(rows, dim, device=DEVICE).to(dtype),
        "bias": torch.randn(rows, device=DEVICE).to(dtype) if bias else None,
        # Logits spread around 0 so that some gates close and some open at every draw.
        "head_logits": torch.randn(heads, device=DEVICE) * 2,
        "qk_logits": torch.randn(heads, groups, device=DEVICE) * 2,
        "v_logits": torch.randn(heads, groups, device=DEVICE) * 2,
    }


def _grad_outputs(inputs):
    weight, bias = inputs["weight"], inputs["bias"]
    grads = [torch.randn(weight.shape, device=DEVICE)]
    return grads + ([torch.randn(bias.shape, device=DEVICE)] if bias is not None else [])


def _call(fn, gate):
    def call(weight, bias, head, qk, v):
        out_weight, out_bias = fn(weight, bias, head, qk, v, **gate)
        return (out_weight,) if out_bias is None else (out_weight, out_bias)
    return call


@pytest.mark.parametrize("heads, head_dim, groups, dim", [(3, 12, 3, 13), (2, 16, 16, 7), (1, 8, 1, 33), (4, 6, 2, 65)])
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_every_gradient_match_the_reference(gated_weight_tiles, heads, head_dim, groups, dim, hard, bias):
    inputs = _inputs(heads, head_dim, groups, dim, torch.float32, bias)
    grad_out = _grad_outputs(inputs)
    gate = {"tau": 0.7, "seed": 1234, "offset": 3 * 2**20, "hard": hard}
    outs, grads = run_with_grads(_call(gated_qkv_weight, gate), inputs, grad_out)
    ref_outs, ref_grads = run_with_grads(_call(gated_qkv_weight_reference, gate), as_fp64(inputs), grad_out)
    bound = TOLERANCES["gated_weight"][torch.float32]
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == torch.float32
        if hard:  # gates exactly 0 or 1: the masked weight is exact
            assert torch.equal(out, ref.float())
        assert_close_rel("forward", out, ref, bound)
    for name in GRAD_NAMES:
        assert_close_rel(f"grad {name}", grads[name], ref_grads[name], bound)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_stay_half_and_match_the_reference(dtype):
    inputs = _inputs(3, 16, 4, 24, dtype)
    grad_out = _grad_outputs(inputs)
    gate = {"tau": 1.3, "seed": 9, "offset": 0}
    outs, grads = run_with_grads(_call(gated_qkv_weight, gate), inputs, grad_out)
    same, same_grads = run_with_grads(_call(gated_qkv_weight_reference, gate), inputs, grad_out)
    ref_outs, ref_grads = run_with_grads(_call(gated_qkv_weight_reference, gate), as_fp64(inputs), grad_out)
    bound = TOLERANCES["gated_weight"][dtype]
    assert [o.dtype for o in outs] == [dtype, dtype]
    assert torch.equal(outs[0], same[0]) and torch.equal(outs[1], same[1])
    for name in GRAD_NAMES:
        assert grads[name].dtype == inputs[name].dtype
        assert_close_rel(f"grad {name}", grads[name], ref_grads[name], bound, same_grads[name])


def test_the_decision_masks_without_a_logit_gradient():
    inputs = _inputs(3, 8, 2, 10, torch.float32)
    gate = {"tau": 1.0, "seed": 0, "offset": 0, "sample": False}
    outs, grads = run_with_grads(_call(gated_qkv_weight, gate), inputs, _grad_outputs(inputs))
    ref_outs, _ = run_with_grads(_call(gated_qkv_weight_reference, gate), inputs, _grad_outputs(inputs))
    assert torch.equal(outs[0], ref_outs[0]) and torch.equal(outs[1], ref_outs[1])
    for name in ("head_logits", "qk_logits", "v_logits"):
        assert not grads[name].any()


def test_a_strided_weight_view_compiles_into_one_graph():
    inputs = _inputs(2, 8, 4, 16, torch.float32)
    wide = torch.randn(inputs["weight"].shape[0], 40, device=DEVICE)
    weight = wide[:, 3:19]  # row stride 40
    gate = {"tau": 0.9, "seed": torch.tensor(17, device=DEVICE), "offset": 128}
    expected = gated_qkv_weight_reference(weight, inputs["bias"], inputs["head_logits"], inputs["qk_logits"],
                                          inputs["v_logits"], **gate)
    fn = torch.compile(lambda *a: gated_qkv_weight(*a, **gate), backend="aot_eager", fullgraph=True)
    out = fn(weight, inputs["bias"], inputs["head_logits"], inputs["qk_logits"], inputs["v_logits"])
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


def test_custom_op_passes_opcheck():
    inputs = _inputs(2, 8, 2, 12, torch.float32)
    for name in ("weight", "bias", "head_logits", "qk_logits", "v_logits"):
        inputs[name].requires_grad_()
    args = (*inputs.values(), torch.tensor(0.8, device=DEVICE), torch.tensor(5, device=DEVICE), 64, True, True)
    torch.library.opcheck(_gated_qkv_weight_op, args)


@pytest.mark.parametrize("change, message", [
    (lambda i: i.update(weight=i["weight"][:-1]), "rows"),
    (lambda i: i.update(qk_logits=i["qk_logits"][:, :1]), "logits must be"),
    (lambda i: i.update(bias=i["bias"][:-2]), "bias has"),
    (lambda i: i.update(weight=i["weight"].long()), "dtype"),
    (lambda i: i.update(head_logits=i["head_logits"].int()), "dtype"),
])
def test_bad_inputs_are_one_line_errors(change, message):
    inputs = _inputs(2, 8, 2, 12, torch.float32)
    change(inputs)
    with pytest.raises((TypeError, ValueError), match=message) as info:
        gated_qkv_weight(*inputs.values(), tau=1.0, seed=0, offset=0)
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_matches_the_reference_at_deit_shapes(dtype):
    inputs = _inputs(6, 64, 4, 384, dtype)
    grad_out = _grad_outputs(inputs)
    gate = {"tau": 0.8, "seed": 77, "offset": 2**21}
    outs, grads = run_with_grads(_call(gated_qkv_weight, gate), inputs, grad_out)
    same, same_grads = run_with_grads(_call(gated_qkv_weight_reference, gate), inputs, grad_out)
    ref_outs, ref_grads = run_with_grads(_call(gated_qkv_weight_reference, gate), as_fp64(inputs), grad_out)
    bound = TOLERANCES["gated_weight"][dtype]
    assert torch.equal(outs[0], same[0])
    for name in GRAD_NAMES:
        assert_close_rel(f"grad {name}", grads[name], ref_grads[name], bound, same_grads[name])
