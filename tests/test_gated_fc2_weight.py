"""``gated_fc2_weight`` (sampling + the neuron mask on fc2's weight columns, one launch each way) against its
reference."""

import pytest
import torch

from hiap_kernels import gated_fc2_weight, gated_fc2_weight_reference
from hiap_kernels.gated_weight.fc2_weight import _gated_fc2_weight_op
from tests.kernel_checks import DEVICE, TOLERANCES, as_fp64, assert_close_rel, needs_triton, run_with_grads

pytestmark = [pytest.mark.usefixtures("poisoned"), needs_triton]

GRAD_NAMES = ("weight", "block_logit", "neuron_logits")


def _inputs(dim, hidden, group, dtype, block_logit=1.0):
    return {
        "weight": torch.randn(dim, hidden, device=DEVICE).to(dtype),
        # The block gate mostly open, so that the neuron gates' gradients are not all zero.
        "block_logit": torch.tensor([block_logit], device=DEVICE),
        "neuron_logits": torch.randn(hidden // group, device=DEVICE) * 2,
    }


def _call(fn, gate):
    return lambda weight, block, neuron: fn(weight, block, neuron, **gate)


# Groups narrower than a tile (several per backward program), as wide as one, wider, and one per neuron.
@pytest.mark.parametrize("dim, hidden, group", [(7, 24, 3), (13, 256, 128), (5, 70, 1), (33, 96, 32), (9, 130, 65)])
@pytest.mark.parametrize("hard", [True, False])
def test_forward_and_every_gradient_match_the_reference(gated_weight_tiles, dim, hidden, group, hard):
    inputs = _inputs(dim, hidden, group, torch.float32)
    grad_out = [torch.randn(dim, hidden, device=DEVICE)]
    gate = {"tau": 0.7, "seed": 99, "offset": 2**20, "hard": hard}
    outs, grads = run_with_grads(_call(gated_fc2_weight, gate), inputs, grad_out)
    ref_outs, ref_grads = run_with_grads(_call(gated_fc2_weight_reference, gate), as_fp64(inputs), grad_out)
    bound = TOLERANCES["gated_weight"][torch.float32]
    if hard:
        assert torch.equal(outs[0], ref_outs[0].float())
    assert_close_rel("forward", outs[0], ref_outs[0], bound)
    for name in GRAD_NAMES:
        assert_close_rel(f"grad {name}", grads[name], ref_grads[name], bound)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_stay_half_and_match_the_reference(dtype):
    inputs = _inputs(12, 64, 8, dtype)
    grad_out = [torch.randn(12, 64, device=DEVICE)]
    gate = {"tau": 1.3, "seed": 4, "offset": 0}
    outs, grads = run_with_grads(_call(gated_fc2_weight, gate), inputs, grad_out)
    same, same_grads = run_with_grads(_call(gated_fc2_weight_reference, gate), inputs, grad_out)
    ref_outs, ref_grads = run_with_grads(_call(gated_fc2_weight_reference, gate), as_fp64(inputs), grad_out)
    assert outs[0].dtype == dtype and torch.equal(outs[0], same[0])
    for name in GRAD_NAMES:
        assert grads[name].dtype == inputs[name].dtype
        assert_close_rel(f"grad {name}", grads[name], ref_grads[name], TOLERANCES["gated_weight"][dtype],
                         same_grads[name])


def test_a_closed_block_zeroes_the_weight_and_the_decision_gives_no_logit_gradient():
    inputs = _inputs(6, 32, 4, torch.float32, block_logit=-8.0)
    gate = {"tau": 1.0, "seed": 0, "offset": 0, "sample": False}
    outs, grads = run_with_grads(_call(gated_fc2_weight, gate), inputs, [torch.randn(6, 32, device=DEVICE)])
    assert not outs[0].any()
    assert not grads["block_logit"].any() and not grads["neuron_logits"].any() and not grads["weight"].any()


def test_a_strided_weight_view_compiles_into_one_graph():
    inputs = _inputs(8, 48, 16, torch.float32)
    weight = torch.randn(8, 100, device=DEVICE)[:, 10:58]
    gate = {"tau": torch.tensor(0.9, device=DEVICE), "seed": 3, "offset": 512}
    expected = gated_fc2_weight_reference(weight, inputs["block_logit"], inputs["neuron_logits"], **gate)
    fn = torch.compile(lambda *a: gated_fc2_weight(*a, **gate), backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(weight, inputs["block_logit"], inputs["neuron_logits"]), expected)


def test_custom_op_passes_opcheck():
    inputs = _inputs(5, 24, 3, torch.float32)
    for tensor in inputs.values():
        tensor.requires_grad_()
    args = (*inputs.values(), torch.tensor(0.8, device=DEVICE), torch.tensor(5, device=DEVICE), 64, True, True)
    torch.library.opcheck(_gated_fc2_weight_op, args)


@pytest.mark.parametrize("change, message", [
    (lambda i: i.update(neuron_logits=i["neuron_logits"][:-1]), "logits must be"),
    (lambda i: i.update(block_logit=i["block_logit"].repeat(2)), "logits must be"),
    (lambda i: i.update(weight=i["weight"][0]), "dimensions"),
    (lambda i: i.update(weight=i["weight"].int()), "dtype"),
])
def test_bad_inputs_are_one_line_errors(change, message):
    inputs = _inputs(4, 24, 3, torch.float32)
    change(inputs)
    with pytest.raises((TypeError, ValueError), match=message) as info:
        gated_fc2_weight(*inputs.values(), tau=1.0, seed=0, offset=0)
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_matches_the_reference_at_deit_shapes(dtype):
    inputs = _inputs(384, 1536, 128, dtype)
    grad_out = [torch.randn(384, 1536, device=DEVICE)]
    gate = {"tau": 0.8, "seed": 77, "offset": 2**21}
    outs, grads = run_with_grads(_call(gated_fc2_weight, gate), inputs, grad_out)
    same, same_grads = run_with_grads(_call(gated_fc2_weight_reference, gate), inputs, grad_out)
    ref_outs, ref_grads = run_with_grads(_call(gated_fc2_weight_reference, gate), as_fp64(inputs), grad_out)
    assert torch.equal(outs[0], same[0])
    for name in GRAD_NAMES:
        assert_close_rel(f"grad {name}", grads[name], ref_grads[name], TOLERANCES["gated_weight"][dtype],
                         same_grads[name])
