"""Analytic MAC model of DESIGN.md section 1: hard counts (int) and the differentiable expectation.

Per layer with N tokens and embed dim D:
    kept q/k dim : 2*N*D + N*N     (q and k projection columns, its share of QK^T)
    kept v dim   : 2*N*D + N*N     (v projection column, its share of A@V, proj input row)
    kept neuron  : 2*N*D           (fc1 column, fc2 row)
plus the static patch embedding and classifier head. A head whose v dims are all closed is gone with its q/k dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.layers.attention import Attention

from hiap.method.convert import HiAPViT
from hiap.method.gated import GatedAttention, GatedMlp
from hiap.method.pruned import PrunedAttention, PrunedMlp


@dataclass(frozen=True)
class UnitCosts:
    """MACs of one kept q/k dim, v dim and FFN neuron at a given token count and embed dim."""

    qk_dim: int
    v_dim: int
    neuron: int

    @classmethod
    def at(cls, tokens: int, embed_dim: int) -> "UnitCosts":
        attention_dim = 2 * tokens * embed_dim + tokens * tokens
        return cls(qk_dim=attention_dim, v_dim=attention_dim, neuron=2 * tokens * embed_dim)


def _vit(model: nn.Module) -> nn.Module:
    vit = model.vit if isinstance(model, HiAPViT) else model
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
        raise TypeError(f"count_macs needs a timm VisionTransformer, a gated or a pruned model, got {type(model).__name__}")
    return vit


def token_count(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """Tokens per image: patches at ``img_size`` (default: the model's own) plus class/register tokens."""
    vit = _vit(model)
    patch = vit.patch_embed
    if img_size is None:
        patches = patch.num_patches
    else:
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        patches = (height // patch.patch_size[0]) * (width // patch.patch_size[1])
    return patches + vit.num_prefix_tokens


def static_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """MACs that no gate touches: the patch embedding convolution and the classifier head."""
    vit = _vit(model)
    proj = vit.patch_embed.proj
    patches = token_count(model, img_size) - vit.num_prefix_tokens
    kernel = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    macs = patches * proj.out_channels * kernel
    if isinstance(vit.head, nn.Linear):
        macs += vit.head.in_features * vit.head.out_features
    return macs


def _attention_kept_dims(attn: nn.Module) -> tuple[int, int]:
    """(kept q/k dims, kept v dims) of an attention layer under the hard decision."""
    if isinstance(attn, PrunedAttention):
        return sum(attn.qk_widths), sum(attn.v_widths)
    if isinstance(attn, GatedAttention):
        m_q, m_v = attn.gates.kept_columns()
        return int(m_q.sum()), int(m_v.sum())
    if type(attn) is Attention:
        width = attn.num_heads * attn.head_dim
        return width, width
    raise TypeError(f"cannot count MACs of attention module {type(attn).__name__}")


def _ffn_kept_neurons(mlp: nn.Module) -> int:
    if isinstance(mlp, PrunedMlp):
        return mlp.hidden_features
    if isinstance(mlp, GatedMlp):
        return int(mlp.gates.kept_neurons().sum())
    if type(mlp) is Mlp:
        return mlp.fc1.out_features
    raise TypeError(f"cannot count MACs of MLP module {type(mlp).__name__}")


def count_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one image through a timm ViT, a gated model (hard decisions) or a pruned model.

    Dense DeiT-S at 224 px gives 4.60 G. A gated model counts what ``hiap.extract`` would keep, so
    ``count_macs(gated) == count_macs(hiap.extract(gated))``.
    """
    vit = _vit(model)
    units = UnitCosts.at(token_count(model, img_size), vit.embed_dim)
    total = static_macs(model, img_size)
    for block in vit.blocks:
        qk_dims, v_dims = _attention_kept_dims(block.attn)
        total += qk_dims * units.qk_dim + v_dims * units.v_dim + _ffn_kept_neurons(block.mlp) * units.neuron
    return int(total)


def dense_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """MACs of the dense network a gated model came from (every gate open)."""
    vit = _vit(model)
    units = UnitCosts.at(token_count(model, img_size), vit.embed_dim)
    total = static_macs(model, img_size)
    for block in vit.blocks:
        attn, mlp = block.attn, block.mlp
        width = attn.num_heads * attn.head_dim
        total += width * (units.qk_dim + units.v_dim) + mlp.fc1.out_features * units.neuron
    return int(total)


@dataclass
class ExpectedCost:
    """Differentiable expected MACs of a gated model, split the way the losses use them.

    total: static + expected gated MACs (joint keep probabilities); macro: each macro gate's keep probability times
    the dense cost of what it controls (heads, FFN blocks); dense: dense MACs (int).
    """

    total: torch.Tensor
    macro: torch.Tensor
    static: int
    dense: int


def expected_cost(model: HiAPViT, img_size: int | tuple[int, int] | None = None) -> ExpectedCost:
    """Expected MACs under the gate distributions (Proposition 1: linear in the joint keep probabilities).

    P(v dim open) = P(g) P(dv); P(q/k dim counted) = P(g) P(dqk) P(head has a v dim open), which equals the hard count
    when every logit is far from zero.
    """
    if not isinstance(model, HiAPViT):
        raise TypeError(f"expected_macs needs a gated model from hiap.gate_vit, got {type(model).__name__}")
    vit = model.vit
    units = UnitCosts.at(token_count(model, img_size), vit.embed_dim)
    static = static_macs(model, img_size)
    gated_terms = []
    macro_terms = []
    for block in vit.blocks:
        attn, mlp = block.attn.gates, block.mlp.gates
        # float64: 4.6e9 MACs in float32 would be off by hundreds.
        p_head, p_qk, p_v = (p.double() for p in attn.keep_probabilities())
        p_alive = 1.0 - torch.prod(1.0 - p_v, dim=1)
        qk_dims = (p_head * p_alive * p_qk.sum(dim=1)).sum() * attn.group
        v_dims = (p_head * p_v.sum(dim=1)).sum() * attn.group
        p_block, p_neuron = (p.double() for p in mlp.keep_probabilities())
        neurons = p_block.sum() * p_neuron.sum() * mlp.group
        gated_terms.append(qk_dims * units.qk_dim + v_dims * units.v_dim + neurons * units.neuron)
        head_cost = attn.head_dim * (units.qk_dim + units.v_dim)
        block_cost = mlp.hidden_features * units.neuron
        macro_terms.append(p_head.sum() * head_cost + p_block.sum() * block_cost)
    total = torch.stack(gated_terms).sum() + static
    return ExpectedCost(total=total, macro=torch.stack(macro_terms).sum(), static=static,
                        dense=dense_macs(model, img_size))


def expected_macs(model: HiAPViT, img_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Differentiable expected MACs (float tensor, scalar) of a gated model; see ``expected_cost``."""
    return expected_cost(model, img_size).total
