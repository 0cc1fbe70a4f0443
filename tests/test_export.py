"""ONNX export: one batched attention per run of equal-width heads, widths padded to a runtime's multiple without
changing the output, every shape but the batch a constant, and a check against PyTorch that can be skipped."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

import hiap
from hiap.app.export import GroupedAttention, export_onnx, grouped_for_export
from hiap.method.pruned import PrunedAttention
from tests.cli_runs import run_cli
from tests.helpers import images, randomize_logits, tiny_vit

NO_MINIMUMS = dict(min_heads=0, min_dim_fraction=0.0, min_neuron_fraction=0.0)


def _ragged(seed: int = 1, dim_group: int = 1) -> torch.nn.Module:
    """A pruned tiny ViT (6 heads of 8) with heads of many widths, a uniform-attention head (q/k width 0), FFNs of
    several widths, an FFN and an attention layer gone."""
    gated = hiap.gate_vit(tiny_vit(depth=3, num_heads=6), hiap.HiAPConfig(dim_group=dim_group, **NO_MINIMUMS))
    randomize_logits(gated, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        gated.gate_logits()["blocks.0.attn.gates.head"].fill_(5.0)
        gated.gate_logits()["blocks.0.attn.gates.qk"][0].fill_(-5.0)
        for index in (0, 2):
            gated.gate_logits()[f"blocks.{index}.mlp.gates.block"].fill_(5.0)
            gated.gate_logits()[f"blocks.{index}.mlp.gates.neuron"].abs_()[::3] *= -1
        gated.gate_logits()["blocks.1.mlp.gates.block"].fill_(-5.0)
        gated.gate_logits()["blocks.2.attn.gates.head"].fill_(-5.0)
    pruned = hiap.extract(gated)
    assert 0 in pruned.blocks[0].attn.qk_widths and pruned.blocks[2].attn.num_heads == 0
    assert pruned.blocks[1].mlp.hidden_features == 0 and pruned.blocks[0].mlp.hidden_features > 0
    assert any(w % 8 for block in pruned.blocks for w in block.attn.qk_widths + block.attn.v_widths)
    return pruned


@pytest.mark.parametrize("pad_heads", [1, 8, 16])
@pytest.mark.parametrize("equal_widths", [False, True], ids=["widths", "equal"])
@pytest.mark.parametrize("seed", [1, 2])
def test_grouped_attention_computes_what_the_pruned_layer_computes(seed, pad_heads, equal_widths):
    pruned = _ragged(seed)
    tokens = pruned.patch_embed.num_patches + pruned.num_prefix_tokens
    x = torch.randn(3, tokens, pruned.embed_dim)
    for block in pruned.blocks:
        attn = block.attn
        if not attn.num_heads:
            continue
        grouped = GroupedAttention(attn, tokens, pad_heads, equal_widths)
        with torch.no_grad():
            torch.testing.assert_close(grouped(x), attn(x), rtol=1e-5, atol=1e-5)
        pairs = list(zip(grouped.qk_widths, grouped.v_widths))
        assert all(qk % pad_heads == 0 and v % pad_heads == 0 for qk, v in pairs)
        if equal_widths:
            assert all(qk in (0, v) for qk, v in pairs)
        # one run per distinct width pair: heads of equal widths sit side by side
        assert len(grouped.runs) == len(set(pairs)) and sum(run.heads for run in grouped.runs) == attn.num_heads
        assert grouped.padded_columns == grouped.qkv.out_features - attn.qkv.out_features


def test_grouping_merges_heads_a_loaded_layout_left_apart():
    """A layer whose equal heads are not next to each other (a layout written by hand, or by another tool) is still
    one batched attention per width."""
    attn = PrunedAttention(24, 24, [8, 4, 8, 4], [8, 8, 8, 8], scale=8**-0.5, qkv_bias=True, proj_bias=True)
    assert len(attn.runs) == 4
    grouped = GroupedAttention(attn, tokens=5)
    assert [(run.heads, run.qk_width, run.v_width) for run in grouped.runs] == [(2, 8, 8), (2, 4, 8)]
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), attn(x), rtol=1e-5, atol=1e-5)


def test_heads_left_apart_and_uniform_heads_export_as_they_compute(tmp_path):
    pruned = _ragged()
    block = pruned.blocks[0]
    attn = PrunedAttention(48, 48, [8, 0, 8, 0, 4, 4], [8, 8, 8, 8, 8, 4], scale=8**-0.5, qkv_bias=True,
                           proj_bias=True)
    with torch.no_grad():
        for parameter in attn.parameters():
            parameter.normal_()
    block.attn = attn
    grouped = GroupedAttention(attn, tokens=pruned.patch_embed.num_patches + 1)
    assert [(run.heads, run.qk_width, run.v_width) for run in grouped.runs] == [(2, 8, 8), (1, 4, 8), (1, 4, 4),
                                                                                (2, 0, 8)]
    assert export_onnx(pruned, tmp_path / "model.onnx", check_batch=4).max_abs_error < 1e-4


def _nodes(path) -> list:
    import onnx

    return list(onnx.load(str(path)).graph.node)


def test_the_onnx_graph_has_one_attention_per_run_and_no_shape_arithmetic(tmp_path):
    pruned = _ragged()
    check = export_onnx(pruned, tmp_path / "pruned.onnx")
    runs = [run for block in grouped_for_export(pruned).blocks if isinstance(block.attn, GroupedAttention)
            for run in block.attn.runs]
    scored = sum(run.qk_width > 0 for run in runs)
    nodes = _nodes(check.path)
    ops = Counter(node.op_type for node in nodes)
    assert check.attention_calls == len(runs) and check.attention_layers == 2 and check.padded_columns == 0
    assert ops["Softmax"] == scored
    # two matmuls per scored run, and qkv, proj, fc1, fc2 per block where they are left
    linears = sum(2 * bool(b.attn.num_heads) + 2 * bool(b.mlp.hidden_features) for b in pruned.blocks)
    assert ops["MatMul"] == 2 * scored + linears
    # the attention layers compute no shape: every shape in them is a constant of the graph
    grouped = [f"/blocks/blocks.{i}/attn/" for i, block in enumerate(pruned.blocks) if block.attn.num_heads]
    assert grouped and not [n.name for n in nodes if n.op_type == "Shape" and n.name.startswith(tuple(grouped))]
    assert check.max_abs_error is not None and check.max_abs_error < 1e-4 and check.batch_checked == 3


@pytest.mark.parametrize("pad_heads", [8, 16])
def test_padded_widths_keep_the_output_in_onnxruntime(tmp_path, pad_heads):
    import onnxruntime

    pruned = _ragged()
    check = export_onnx(pruned, tmp_path / "padded.onnx", pad_heads=pad_heads, equal_widths=True)
    assert check.padded_columns > 0 and check.max_abs_error < 1e-4
    session = onnxruntime.InferenceSession(str(check.path), providers=["CPUExecutionProvider"])
    x = images(pruned, batch=5)
    with torch.no_grad():
        expected = pruned(x).numpy()
    assert abs(session.run(["logits"], {"images": x.numpy()})[0] - expected).max() < 1e-4


def test_an_unchecked_export_needs_no_onnxruntime(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    check = export_onnx(_ragged(), tmp_path / "unchecked.onnx", check=False)
    assert check.path.is_file() and check.max_abs_error is None and check.batch_checked is None
    with pytest.raises(Exception, match="onnxruntime"):
        export_onnx(_ragged(), tmp_path / "checked.onnx")


@pytest.mark.parametrize("arguments, error, message", [
    (dict(pad_heads=0), ValueError, "pad_heads must lie in"),
    (dict(pad_heads=300), ValueError, "pad_heads must lie in"),
    (dict(pad_heads="8"), TypeError, "pad_heads must be an integer"),
    (dict(pad_heads=True), TypeError, "pad_heads must be an integer"),
    (dict(equal_widths=1), TypeError, "equal_widths must be True or False"),
    (dict(check="yes"), TypeError, "check must be True or False"),
    (dict(opset=30), ValueError, "opset must lie in"),
    (dict(atol=float("nan")), ValueError, "atol must be a number > 0"),
])
def test_export_arguments_are_refused_naming_them(tmp_path, arguments, error, message):
    with pytest.raises(error, match=message):
        export_onnx(tiny_vit(depth=1), tmp_path / "model.onnx", **arguments)
    assert not (tmp_path / "model.onnx").exists()


def test_the_command_pads_checks_or_skips_the_check_as_asked(tmp_path, capsys):
    path = hiap.save_pruned(_ragged(), tmp_path / "pruned.safetensors")
    onnx = tmp_path / "model.onnx"
    assert run_cli("export", path, "--onnx", onnx, "--pad-heads", "8", "--check") == 0
    out = capsys.readouterr().out
    assert "batched attention calls in 2 layers" in out and "zero columns of padding" in out
    assert "max |diff| = " in out
    onnx.unlink()
    assert run_cli("export", path, "--onnx", onnx, "--no-check") == 0
    out = capsys.readouterr().out
    assert "not checked against PyTorch (--no-check)" in out and "max |diff|" not in out and onnx.is_file()
    for value in ("0", "1000"):
        assert run_cli("export", path, "--onnx", tmp_path / "bad.onnx", "--pad-heads", value) == 2
        error = capsys.readouterr().err.strip()
        assert error.splitlines() == [f"hiap export: error: --pad-heads must lie in [1, 256], got {value}"]
    assert not (tmp_path / "bad.onnx").exists()
