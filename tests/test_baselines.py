import pytest
import torch

import hiap
from hiap.app.baselines import apply_baseline, apply_l1_structured, apply_uniform
from hiap.app.report import layer_structure
from hiap.app.runtime import InputError
from tests.helpers import images, tiny_vit


@pytest.mark.parametrize("target", [0.4, 2 / 3, 0.9])
def test_uniform_ratio_meets_the_budget_with_the_same_widths_in_every_layer(target):
    gated = hiap.gate_vit(tiny_vit(depth=3), hiap.HiAPConfig(dim_group=1))
    choice = apply_uniform(gated, target)
    assert abs(choice["fraction"] / target - 1) < 0.02
    structure = layer_structure(gated)
    assert all(layer["heads_kept"] == layer["num_heads"] for layer in structure)
    assert len({tuple(layer["qk_widths"] + layer["v_widths"]) for layer in structure}) == 1
    assert len({layer["ffn_width"] for layer in structure}) == 1
    assert abs(choice["dims_kept"] - choice["neurons_kept"]) < 0.15


def test_uniform_keeps_the_largest_weights_in_each_head():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[2 * 48 + 5].mul_(100.0)  # v column 5 of head 0: by far the largest
    gated = hiap.gate_vit(model, hiap.HiAPConfig(dim_group=1))
    apply_uniform(gated, 0.5)
    assert gated.vit.blocks[0].attn.gates.v[0, 5] > 0


def test_l1_structured_prunes_only_ffn_neurons_ranked_by_fc1_norm():
    model = tiny_vit(depth=3)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[7].mul_(100.0)
    gated = hiap.gate_vit(model, hiap.HiAPConfig(dim_group=1))
    choice = apply_l1_structured(gated, 0.7)
    assert abs(choice["fraction"] / 0.7 - 1) < 0.02
    structure = layer_structure(gated)
    assert all(layer["qk_widths"] == [16, 16, 16] and layer["v_widths"] == [16, 16, 16] for layer in structure)
    assert sum(layer["ffn_width"] for layer in structure) < 3 * 192
    assert gated.vit.blocks[1].mlp.gates.neuron[7] > 0
    pruned = hiap.extract(gated)
    x = images(gated)
    with torch.no_grad():
        assert torch.allclose(pruned(x), gated.eval()(x), atol=1e-5)


def test_l1_structured_refuses_a_budget_below_what_ffn_pruning_can_reach():
    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig())
    with pytest.raises(InputError, match="cannot reach"):
        apply_l1_structured(gated, 0.1)
    with pytest.raises(InputError, match="unknown baseline"):
        apply_baseline("random", gated, 0.5)


def test_baselines_keep_the_hardware_alignment_of_the_default_config():
    gated = hiap.gate_vit(tiny_vit(depth=3), hiap.HiAPConfig())
    apply_uniform(gated, 0.6)
    pruned = hiap.extract(gated)
    head, ffn = pruned.hiap_alignment["head"], pruned.hiap_alignment["ffn"]
    assert (head, ffn) == (4, 8)
    for block in pruned.blocks:
        assert all(w % head == 0 for w in block.attn.qk_widths + block.attn.v_widths)
        assert block.mlp.hidden_features % ffn == 0
