import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hiap
from hiap.method.pruned import PrunedAttention, PrunedMlp
from tests.helpers import images, randomize_logits, tiny_vit

NO_MINIMUMS = dict(min_heads=0, min_dim_fraction=0.0, min_neuron_fraction=0.0)


def _assert_exact(gated, pruned, x):
    with torch.no_grad():
        expected = gated.eval()(x)
        got = pruned(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("cfg_args", [dict(), NO_MINIMUMS, dict(dim_group=8)], ids=["minimums", "none", "grouped"])
def test_extraction_is_exact_on_random_mixed_sign_logits(seed, cfg_args):
    gated = hiap.gate_vit(tiny_vit(depth=3), hiap.HiAPConfig(**cfg_args))
    generator = torch.Generator().manual_seed(seed)
    randomize_logits(gated, generator)
    pruned = hiap.extract(gated)
    _assert_exact(gated, pruned, images(gated, generator=generator))
    assert hiap.count_macs(pruned) == hiap.count_macs(gated) < hiap.count_macs(tiny_vit(depth=3))
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in tiny_vit(depth=3).parameters())


def _set(gated, name, values):
    with torch.no_grad():
        gated.gate_logits()[name].copy_(torch.as_tensor(values, dtype=torch.float32))


def test_edge_cases_zero_qk_dims_zero_v_dims_empty_ffn_and_empty_attention():
    gated = hiap.gate_vit(tiny_vit(depth=3), hiap.HiAPConfig(dim_group=1, **NO_MINIMUMS))
    randomize_logits(gated, torch.Generator().manual_seed(0), scale=1.0)
    # layer 0: head 0 keeps v but no q/k (uniform attention); head 1 has no v dims (removed); head 2 closed by g.
    _set(gated, "blocks.0.attn.gates.head", [5.0, 5.0, -5.0])
    qk = torch.full((3, 16), 5.0)
    qk[0] = -5.0
    _set(gated, "blocks.0.attn.gates.qk", qk)
    v = torch.full((3, 16), 5.0)
    v[1] = -5.0
    _set(gated, "blocks.0.attn.gates.v", v)
    # layer 1: the FFN block is closed; layer 2: every head closed and every neuron closed in an open block.
    _set(gated, "blocks.1.mlp.gates.block", [-5.0])
    _set(gated, "blocks.2.attn.gates.head", [-5.0, -5.0, -5.0])
    _set(gated, "blocks.2.mlp.gates.neuron", torch.full((192,), -5.0))
    pruned = hiap.extract(gated)
    attn0 = pruned.blocks[0].attn
    assert attn0.qk_widths == [0] and attn0.v_widths == [16]
    assert pruned.blocks[1].mlp.hidden_features == 0 and pruned.blocks[2].mlp.hidden_features == 0
    assert pruned.blocks[2].attn.num_heads == 0
    _assert_exact(gated, pruned, images(gated))
    assert hiap.count_macs(pruned) == hiap.count_macs(gated)


def test_extracted_dense_model_matches_timm():
    model = tiny_vit()
    pruned = hiap.extract(hiap.gate_vit(model))
    assert all(b.attn.qk_widths == [16, 16, 16] for b in pruned.blocks)
    x = images(model)
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-5)


def test_equal_width_layers_are_one_sdpa_call_and_agree_with_the_padded_reference():
    from hiap_kernels import ragged_attention_padded
    from hiap_kernels.ragged_attn.reference import padded_gather_indices

    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(dim_group=1, **NO_MINIMUMS))
    with torch.no_grad():
        gated.gate_logits()["blocks.0.attn.gates.qk"][:, :5] = -4.0  # every head keeps 11 q/k dims
    attn = hiap.extract(gated).blocks[0].attn
    assert not attn.ragged and attn.qk_widths == [11, 11, 11] and attn.v_widths == [16, 16, 16]
    x = torch.randn(2, 17, 48)
    qkv = attn.qkv(x)
    padded = ragged_attention_padded(qkv, *padded_gather_indices(attn.qk_widths, attn.v_widths), attn.scale)
    with torch.no_grad():
        assert torch.allclose(attn(x), attn.proj(padded), atol=1e-6)


def test_extraction_puts_heads_of_equal_widths_next_to_each_other():
    gated = hiap.gate_vit(tiny_vit(num_heads=6, embed_dim=96), hiap.HiAPConfig(**NO_MINIMUMS))
    with torch.no_grad():
        gates = gated.vit.blocks[0].attn.gates  # 6 heads of 16 dims, groups of 4
        gates.assign(head=True, qk=True, v=True)
        for head, kept in enumerate([1, 4, 2, 4, 1, 2]):
            gates.qk[head, kept:] = -8.0
    attn = hiap.extract(gated).blocks[0].attn
    assert attn.qk_widths == [16, 16, 8, 8, 4, 4] and len(attn.runs) == 3
    _assert_exact(gated, hiap.extract(gated), images(gated))


def test_hard_minimums_keep_every_layer_alive():
    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(min_heads=1, min_dim_fraction=0.25, min_neuron_fraction=0.1))
    with torch.no_grad():
        for logit in gated.gate_logits().values():
            logit.fill_(-3.0)
        gated.gate_logits()["blocks.0.mlp.gates.block"].fill_(3.0)
    pruned = hiap.extract(gated)
    for block in pruned.blocks:
        assert block.attn.num_heads == 1 and block.attn.qk_widths == [4] and block.attn.v_widths == [4]
    # 12 neuron groups of 16 (the tiny model's hardware-aligned group): the top ceil(0.1 * 12) = 2 stay
    assert pruned.blocks[0].mlp.hidden_features == 32 and pruned.blocks[1].mlp.hidden_features == 0
    _assert_exact(gated, pruned, images(gated))


def test_save_and_load_round_trip(tmp_path):
    gated = hiap.gate_vit(tiny_vit(class_token=False, global_pool="avg", init_values=0.1), hiap.HiAPConfig())
    randomize_logits(gated, torch.Generator().manual_seed(3))
    pruned = hiap.extract(gated)
    path = hiap.save_pruned(pruned, tmp_path / "model.safetensors")
    loaded = hiap.load_pruned(path)
    x = images(gated)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert hiap.read_layout(path) == json.loads(json.dumps(hiap.pruned_layout(pruned)))
    assert hiap.count_macs(loaded) == hiap.count_macs(pruned)
    assert not list(tmp_path.glob("*.tmp"))


def test_pruned_model_compiles_without_graph_breaks():
    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(**NO_MINIMUMS))
    randomize_logits(gated, torch.Generator().manual_seed(5))
    pruned = hiap.extract(gated)
    compiled = torch.compile(pruned, backend="aot_eager", fullgraph=True)
    x = images(gated)
    with torch.no_grad():
        assert torch.allclose(compiled(x), pruned(x), atol=1e-6)


def test_extract_needs_a_gated_model_with_finite_logits():
    with pytest.raises(TypeError, match="gate_vit"):
        hiap.extract(tiny_vit())
    gated = hiap.gate_vit(tiny_vit())
    with torch.no_grad():
        gated.gate_logits()["blocks.1.attn.gates.v"][0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN.*blocks.1.attn.gates.v"):
        hiap.extract(gated)


@pytest.mark.filterwarnings("ignore:.*carries no digest")  # the hand-made files below have none
def test_loading_a_missing_corrupt_or_mismatched_file_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        hiap.load_pruned(tmp_path / "absent.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        hiap.load_pruned(corrupt)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a HiAP pruned model"):
        hiap.load_pruned(plain)
    # A valid file whose weights were cut down no longer matches its layout.
    pruned = hiap.extract(hiap.gate_vit(tiny_vit()))
    good = hiap.save_pruned(pruned, tmp_path / "good.safetensors")
    layout = hiap.read_layout(good)
    layout["layers"][0]["ffn_width"] = 112  # aligned (16), but not what the weights hold (192)
    state = {k: v.contiguous() for k, v in pruned.state_dict().items()}
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(state, str(mismatched), metadata={"hiap_layout": json.dumps(layout)})
    with pytest.raises(ValueError, match="do not match"):
        hiap.load_pruned(mismatched)
    layout["layers"][0]["ffn_width"] = 104  # not a multiple of the FFN alignment (16) the layout declares
    misaligned = tmp_path / "misaligned.safetensors"
    save_file(state, str(misaligned), metadata={"hiap_layout": json.dumps(layout)})
    with pytest.raises(ValueError, match="not a multiple of the declared FFN alignment 16"):
        hiap.load_pruned(misaligned)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError):
        hiap.load_pruned(truncated)


def test_pruned_modules_types():
    pruned = hiap.extract(hiap.gate_vit(tiny_vit()))
    assert all(isinstance(b.attn, PrunedAttention) and isinstance(b.mlp, PrunedMlp) for b in pruned.blocks)
    assert not pruned.training


def test_a_pruned_file_written_by_the_first_release_still_loads_and_gives_its_outputs():
    from safetensors.torch import load_file

    data = Path(__file__).parent / "data"
    with pytest.warns(UserWarning, match="no digest"):  # written before files carried one
        pruned = hiap.load_pruned(data / "pruned_v1.safetensors")
    expected = load_file(str(data / "pruned_v1_expected.safetensors"))
    assert [block.attn.qk_widths for block in pruned.blocks] == [[8, 12, 12], [8]]
    with torch.no_grad():
        torch.testing.assert_close(pruned(expected["images"]), expected["logits"], rtol=1e-5, atol=1e-5)
