import pytest
import timm
import torch

import hiap
from hiap.method.cost import StackedGates, UnitCosts, static_macs, token_count
from tests.helpers import randomize_logits, tiny_vit


def test_dense_deit_small_is_4_60_gmacs():
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    assert hiap.count_macs(model) / 1e9 == pytest.approx(4.60, abs=0.01)


def test_dense_count_by_hand_for_a_tiny_vit():
    model = tiny_vit()
    tokens, dim = 17, 48  # 16 patches + class token
    per_layer = 48 * 2 * (2 * tokens * dim + tokens * tokens) + 192 * 2 * tokens * dim
    static = 16 * 48 * (3 * 8 * 8) + 48 * 10
    assert token_count(model) == tokens and static_macs(model) == static
    assert hiap.count_macs(model) == 2 * per_layer + static


def test_gated_model_with_gates_open_counts_the_dense_macs():
    model = tiny_vit()
    assert hiap.count_macs(hiap.gate_vit(model)) == hiap.count_macs(model) == hiap.dense_macs(hiap.gate_vit(model))


def test_image_size_changes_the_token_count():
    model = tiny_vit()
    assert token_count(model, 64) == 65
    assert hiap.count_macs(model, 64) > hiap.count_macs(model)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dim_group", [1, 8])
def test_expected_macs_equal_the_hard_count_when_logits_are_saturated(seed, dim_group):
    cfg = hiap.HiAPConfig(min_heads=0, min_dim_fraction=0.0, min_neuron_fraction=0.0, dim_group=dim_group)
    gated = hiap.gate_vit(tiny_vit(), cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for logit in gated.gate_logits().values():
            logit.copy_(torch.where(torch.rand(logit.shape, generator=generator) < 0.6, 40.0, -40.0))
    expected = hiap.expected_macs(gated)
    assert expected.item() == pytest.approx(hiap.count_macs(gated), rel=1e-9)


def test_expected_macs_are_differentiable_and_lie_between_static_and_dense():
    gated = hiap.gate_vit(tiny_vit())
    randomize_logits(gated, torch.Generator().manual_seed(0))
    cost = hiap.expected_cost(gated)
    assert cost.static < cost.total.item() < cost.dense
    cost.total.backward()
    grads = [p.grad for p in gated.gate_logits().values()]
    assert all(g is not None and (g >= 0).all() for g in grads)  # opening a gate never lowers the cost


def test_the_cost_model_keeps_gates_with_the_gate_objects_probabilities():
    gated = hiap.gate_vit(tiny_vit(depth=3))
    randomize_logits(gated, torch.Generator().manual_seed(0))
    stacked = StackedGates.of(gated).keep_probabilities()
    attention = [layer.gates.keep_probabilities() for layer in gated.attention_layers()]
    ffn = [layer.gates.keep_probabilities() for layer in gated.ffn_layers()]
    per_layer = [torch.stack(kind) for kind in (*zip(*attention), *zip(*ffn))]
    assert len(stacked) == len(per_layer) == 5
    # The same sigmoid of the same logits; only its vectorised inner loop may round one element a unit differently.
    for whole_model, by_layer in zip(stacked, per_layer):
        torch.testing.assert_close(whole_model, by_layer, rtol=3e-7, atol=0)


def test_unit_costs_follow_the_design_formulas():
    units = UnitCosts.at(197, 384)
    assert units.qk_dim == units.v_dim == 2 * 197 * 384 + 197 * 197
    assert units.neuron == 2 * 197 * 384


def test_count_macs_rejects_other_models():
    with pytest.raises(TypeError, match="VisionTransformer"):
        hiap.count_macs(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="gated model"):
        hiap.expected_macs(tiny_vit())
