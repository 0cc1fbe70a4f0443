"""``gate_objective`` (the gate terms of the HiAP loss and their gradient, one launch) against its reference."""

import pytest
import torch

import hiap
from hiap_kernels import GateLayout, ObjectiveConstants, gate_objective, gate_objective_reference
from hiap_kernels.objective.kernel import _gate_objective_op
from hiap_kernels.objective.reference import decided_gate_macs
from tests.kernel_checks import DEVICE, TOLERANCES, assert_close_rel, needs_triton

pytestmark = [pytest.mark.usefixtures("poisoned"), needs_triton]

CONSTANTS = ObjectiveConstants(unit_qk=1234.0, unit_v=1210.0, unit_neuron=777.0, static=5.0e4, dense=3.1e6,
                               lambda_macro=1.0, lambda_micro=0.5, lagrangian_lr=0.3, feasibility_weight=2.0,
                               min_dim_fraction=0.5, min_neuron_fraction=0.3)

# (layers, heads, groups, neuron groups, head group, neuron group, min heads, dims min, neurons min): odd shapes, a
# single gate of each kind, DeiT-S's default layout (16-dim groups, 128-neuron groups) and a per-dim one.
LAYOUTS = [
    GateLayout(3, 5, 3, 7, 4, 8, 2, 2, 3),
    GateLayout(1, 1, 1, 1, 16, 16, 1, 1, 1),
    GateLayout(12, 6, 4, 12, 16, 128, 1, 1, 2),
    GateLayout(2, 3, 16, 40, 1, 1, 3, 2, 5),
]


def _state(target_mode: bool):
    """Fresh multipliers and target: fp64 0-dim on the device."""
    scalars = (0.2, 0.5, 0.55) if target_mode else (0.0, 0.0, 0.5)
    return [torch.tensor(value, dtype=torch.float64, device=DEVICE) for value in scalars]


def _run(fn, flat, layout, target_mode, ascend=True, grad_scale=3.0):
    """Outputs, the logits' gradient and the multipliers after one call of ``fn``."""
    leaf = flat.detach().clone().requires_grad_()
    lambda1, lambda2, target = _state(target_mode)
    gate_terms, diagnostics = fn(leaf, CONSTANTS.tensor(DEVICE), lambda1, lambda2, target, layout,
                                 target_mode=target_mode, ascend=ascend)
    (gate_terms * grad_scale).backward()
    return gate_terms.detach(), diagnostics, leaf.grad, lambda1, lambda2


def _assert_matches_reference(flat, layout, target_mode):
    """Gate terms, diagnostics and the logits' gradient against the reference; the decided fraction exactly."""
    got = _run(gate_objective, flat, layout, target_mode)
    expected = _run(gate_objective_reference, flat, layout, target_mode)
    bound = TOLERANCES["gate_objective"][flat.dtype]
    assert_close_rel("gate terms", got[0], expected[0], bound)
    assert_close_rel("diagnostics", got[1], expected[1], bound)
    assert_close_rel("grad logits", got[2], expected[2], bound)
    assert got[2].dtype == flat.dtype
    if target_mode:  # a ratio of exact integers
        assert got[1][2] == expected[1][2]
    return got, expected


def _logits(layout, scale=2.0, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    return (torch.randn(layout.numel, generator=generator) * scale).to(DEVICE)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "x".join(map(str, layout[:4])))
@pytest.mark.parametrize("target_mode", [True, False], ids=["target", "penalty"])
def test_terms_gradient_and_multipliers_match_the_reference(layout, target_mode):
    got, expected = _assert_matches_reference(_logits(layout), layout, target_mode)
    if target_mode:  # the multipliers' step is the same fp64 math on the same exact gap
        torch.testing.assert_close(got[3], expected[3], rtol=1e-14, atol=0)
        torch.testing.assert_close(got[4], expected[4], rtol=1e-14, atol=0)


def test_without_ascent_the_multipliers_stay_and_penalty_mode_never_moves_them():
    layout = LAYOUTS[0]
    for target_mode, ascend in ((True, False), (False, True)):
        _, _, _, lambda1, lambda2 = _run(gate_objective, _logits(layout), layout, target_mode, ascend=ascend)
        initial = _state(target_mode)
        assert torch.equal(lambda1, initial[0]) and torch.equal(lambda2, initial[1])


def test_saturated_probabilities_and_tied_heads_match_the_reference():
    """Logits of +-30 give probabilities of exactly 0 and 1 in fp32: ``1 - p_v`` has zero factors (one or two per
    head), where the gradient stays finite and equal to torch's ``prod`` backward; tied head logits keep the lower
    index."""
    layout = GateLayout(4, 6, 5, 9, 2, 4, 3, 2, 2)
    flat = _logits(layout, scale=3.0, generator_seed=1)
    head, qk, v, block, neuron = layout.split(flat)
    v[0, :, :2] = 30.0  # two zero factors in every head of layer 0
    v[1, :, 3] = 30.0  # one in layer 1
    v[2] = -30.0
    head[3] = -1.25  # every head of layer 3 tied, below zero: the decision keeps the first three
    head[2, :2] = 30.0
    for target_mode in (True, False):
        _assert_matches_reference(flat, layout, target_mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_logit_dtypes_keep_their_dtype_and_match_the_reference(dtype):
    _assert_matches_reference(_logits(LAYOUTS[0]).to(dtype), LAYOUTS[0], True)


def test_the_counted_decision_equals_the_models_decision_per_entry():
    """``decided_gate_macs`` counts; ``StackedGates.decided_macs`` decides every entry (top-k by argsort): one
    number."""
    from tests.helpers import randomize_logits, tiny_vit

    for seed in range(3):
        config = hiap.HiAPConfig(min_heads=2, min_dim_fraction=0.5, min_neuron_fraction=0.25)
        gated = hiap.gate_vit(tiny_vit(depth=3), config)
        randomize_logits(gated, torch.Generator().manual_seed(seed), scale=3.0)
        gates = hiap.method.cost.StackedGates.of(gated)
        units = hiap.method.cost.UnitCosts.at(17, 32)
        counted = decided_gate_macs(gates.head, gates.qk, gates.v, gates.block, gates.neuron, gates.layout,
                                    unit_qk=units.qk_dim, unit_v=units.v_dim, unit_neuron=units.neuron)
        assert counted.dtype == torch.float64 and int(counted) == int(gates.decided_macs(units, 0))
    # At DeiT-S's unit costs (float, as the op's constants hold them) the count stays exact: 1-MAC resolution.
    deit = hiap.method.cost.UnitCosts.at(197, 384)
    layout = GateLayout(12, 6, 4, 12, 16, 128, 1, 1, 2)
    head, qk, v, block, neuron = layout.split(torch.ones(layout.numel))
    qk[0, 0, 0] = -1.0  # one q/k group closed: a total that float32 (a 512-MAC step up there) cannot hold
    counted = decided_gate_macs(head, qk, v, block, neuron, layout, unit_qk=float(deit.qk_dim),
                                unit_v=float(deit.v_dim), unit_neuron=float(deit.neuron))
    assert counted == 12 * (384 * (deit.qk_dim + deit.v_dim) + 1536 * deit.neuron) - 16 * deit.qk_dim


def test_one_graph_under_torch_compile_with_the_multipliers_moved_in_place():
    layout = LAYOUTS[0]
    flat = _logits(layout).requires_grad_()
    constants = CONSTANTS.tensor(DEVICE)
    lambda1, lambda2, target = _state(True)

    def step(logits):
        gate_terms, diagnostics = gate_objective(logits, constants, lambda1, lambda2, target, layout,
                                                 target_mode=True, ascend=True)
        return gate_terms * 2.0, diagnostics

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    (gate_terms, _), expected = compiled(flat), _run(gate_objective, flat, layout, True, grad_scale=2.0)
    gate_terms.backward()
    assert torch.equal(gate_terms.detach(), expected[0] * 2.0)
    assert torch.equal(flat.grad, expected[2])
    assert torch.equal(lambda1, expected[3]) and torch.equal(lambda2, expected[4])


def test_custom_op_passes_opcheck():
    layout = LAYOUTS[0]
    for target_mode in (True, False):
        lambda1, lambda2, target = _state(target_mode)
        args = (_logits(layout), CONSTANTS.tensor(DEVICE), lambda1, lambda2, target, list(layout), target_mode, True)
        torch.library.opcheck(_gate_objective_op, args)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(flat=a["flat"][:-1]), "logits but"),
    (lambda a: a.update(flat=a["flat"].int()), "dtype"),
    (lambda a: a.update(constants=a["constants"].float()), "dtype"),
    (lambda a: a.update(constants=a["constants"][:-1]), "ObjectiveConstants"),
    (lambda a: a.update(lambda1=a["lambda1"][None]), "dimensions"),
    (lambda a: a.update(layout=GateLayout(0, 5, 3, 7, 4, 8, 2, 2, 3)), "at least one layer"),
    (lambda a: a.update(layout=tuple(a["layout"])), "GateLayout"),
])
def test_bad_inputs_are_one_line_errors(change, message):
    layout = LAYOUTS[0]
    lambda1, lambda2, target = _state(True)
    args = {"flat": _logits(layout), "constants": CONSTANTS.tensor(DEVICE), "lambda1": lambda1, "lambda2": lambda2,
            "target": target, "layout": layout}
    change(args)
    with pytest.raises((TypeError, ValueError), match=message) as info:
        gate_objective(*args.values(), target_mode=True, ascend=True)
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [GateLayout(12, 6, 4, 12, 16, 128, 1, 1, 2), GateLayout(24, 16, 64, 4096, 1, 1, 1,
                                                                                            8, 410)])
def test_gpu_kernel_matches_the_reference_at_vit_layouts(layout):
    """DeiT-S's default layout, and ViT-L's per-dim / per-neuron one (the widest layer the program holds)."""
    flat = _logits(layout)
    for target_mode in (True, False):
        _assert_matches_reference(flat, layout, target_mode)
