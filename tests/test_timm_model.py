"""A pruned model is a timm model: it scripts where a timm ViT scripts."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import hiap
from tests.helpers import images, randomize_logits, tiny_vit

NO_MINIMUMS = dict(min_heads=0, min_dim_fraction=0.0, min_neuron_fraction=0.0)


def _ragged_pruned() -> torch.nn.Module:
    """A pruned tiny ViT with heads of several widths, uniform-attention heads, an FFN and an attention layer gone."""
    gated = hiap.gate_vit(tiny_vit(depth=3), hiap.HiAPConfig(dim_group=1, **NO_MINIMUMS))
    randomize_logits(gated, torch.Generator().manual_seed(1))
    with torch.no_grad():
        gated.gate_logits()["blocks.0.attn.gates.qk"][0].fill_(-5.0)  # head 0: no q/k dims, uniform attention
        gated.gate_logits()["blocks.1.mlp.gates.block"].fill_(-5.0)
        gated.gate_logits()["blocks.2.attn.gates.head"].fill_(-5.0)
    pruned = hiap.extract(gated)
    assert 0 in pruned.blocks[0].attn.qk_widths and len(pruned.blocks[0].attn.runs) > 1
    assert pruned.blocks[1].mlp.hidden_features == 0 and pruned.blocks[2].attn.num_heads == 0
    return pruned


@pytest.fixture(autouse=True)
def _torchscript_without_its_deprecation_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _script(model: torch.nn.Module) -> torch.jit.ScriptModule:
    return torch.jit.script(model)


def test_a_pruned_model_scripts_like_a_timm_vit(tmp_path):
    _script(tiny_vit())  # what timm itself scripts
    pruned = _ragged_pruned()
    x = images(pruned, batch=3)
    scripted = _script(pruned)
    with torch.no_grad():
        expected = pruned(x)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
    torch.jit.save(scripted, str(tmp_path / "pruned.pt"))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "pruned.pt"))(x), expected, rtol=1e-5, atol=1e-5)
    loaded = hiap.load_pruned(hiap.save_pruned(pruned, tmp_path / "pruned.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(_script(hiap.optimize(loaded))(x), expected, rtol=1e-5, atol=1e-5)


def test_a_block_bound_to_the_fused_kernels_scripts_to_timm_s_block_forward():
    """``hiap.optimize`` binds the fused Triton block forward where it measured faster (a GPU); TorchScript cannot
    launch Triton kernels, so the scripted block runs as timm's Block does, with the same result."""
    from hiap.method.pruned import fused_block_forward

    pruned = _ragged_pruned()
    x = images(pruned)
    with torch.no_grad():
        expected = pruned(x)
    for block in pruned.blocks:
        block.forward = types.MethodType(fused_block_forward, block)
    with torch.no_grad():
        torch.testing.assert_close(_script(pruned)(x), expected, rtol=1e-5, atol=1e-5)
