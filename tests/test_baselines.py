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
    assert (head, ffn) == (4, 16)
    for block in pruned.blocks:
        assert all(w % head == 0 for w in block.attn.qk_widths + block.attn.v_widths)
        assert block.mlp.hidden_features % ffn == 0


@pytest.mark.parametrize("target", [2 / 3, 0.5])
def test_torch_pruning_picks_its_units_and_our_extraction_builds_them(target):
    pytest.importorskip("torch_pruning")
    from hiap.app.peers import apply_torch_pruning, torch_pruning_choice

    dense = tiny_vit(depth=2, embed_dim=64, num_heads=4)
    per_dim = hiap.HiAPConfig(dim_group=1, neuron_group=1, min_heads=0, min_dim_fraction=0.0, min_neuron_fraction=0.0)
    gated = hiap.gate_vit(dense, per_dim).eval()
    choice = apply_torch_pruning(gated, dense, target, round_to=4)
    assert abs(choice["fraction"] / target - 1) < 0.1  # the closest its rounded widths allow
    pruned = hiap.extract(gated)
    for block in pruned.blocks:
        assert len(set(block.attn.qk_widths)) == 1 and block.attn.qk_widths == block.attn.v_widths
        assert block.attn.qk_widths[0] % 4 == 0 and block.mlp.hidden_features % 4 == 0
        assert block.attn.scale == dense.blocks[0].attn.scale  # the dense softmax scale
    # The extracted model computes what the gates say, and the gates say what Torch-Pruning kept.
    x = images(pruned)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), gated(x), rtol=1e-5, atol=1e-5)
    layer = torch_pruning_choice(dense, choice["pruning_ratio"], 4)[0]
    assert int(layer["neuron"].sum()) == pruned.blocks[0].mlp.hidden_features
    # Its importance is l1 magnitude: the kept FFN neurons of layer 0 outweigh the dropped ones on average.
    norms = dense.blocks[0].mlp.fc1.weight.abs().sum(dim=1) + dense.blocks[0].mlp.fc2.weight.abs().sum(dim=0)
    assert norms[layer["neuron"]].mean() > norms[~layer["neuron"]].mean()


def test_torch_pruning_missing_is_one_line(monkeypatch):
    import builtins

    from hiap.app import peers

    real_import = builtins.__import__

    def no_torch_pruning(name, *args, **kwargs):
        if name == "torch_pruning":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch_pruning)
    with pytest.raises(InputError, match=r"pip install 'hiap-kernels\[peers\]'"):
        peers.require_torch_pruning()
