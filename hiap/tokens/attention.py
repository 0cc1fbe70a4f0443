"""Attention that also hands token reduction its keys and the class token's attention, for every supported module.

timm's ``Attention``, HiAP's ``GatedAttention`` and the extracted ``PrunedAttention`` each run their own forward with
the proportional-attention bias (``log(size)`` per key) as ``attn_mask``; what the reduction step reads comes from the
same q and k, so nothing is computed twice except the class token's scores (``N x W`` MACs, counted by ``count_macs``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.attention import Attention

from hiap.method.gated import GatedAttention
from hiap.method.pruned import PrunedAttention


class AttentionStats(NamedTuple):
    """``out [B, N, D]``; ``keys [B, N, W]`` (every head's key columns side by side); ``cls [B, N]`` or None."""

    out: torch.Tensor
    keys: torch.Tensor | None
    cls: torch.Tensor | None


SUPPORTED_ATTENTION = (Attention, GatedAttention, PrunedAttention)


def check_attention(attn: nn.Module) -> None:
    """Raise TypeError for an attention module token reduction cannot read."""
    if type(attn) not in SUPPORTED_ATTENTION:
        raise TypeError(f"token reduction supports timm Attention, GatedAttention and PrunedAttention, not "
                        f"{type(attn).__name__}")


def _class_scores(q0: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q0 [B, H, 1, d]`` against ``k [B, H, N, d]``: ``[B, H, 1, N]`` fp32, one product per key and head dim.

    The keys are strided views of the packed qkv projection. A matmul batched over (B, H) cannot fold those two
    strides into one, so it first copies every key; on a CPU that copy was most of the step (DeiT-S at batch 16:
    1.9 ms a block, against 0.6 ms for one ``bmm`` per head that reads the view in place). On a GPU the copy is cheap
    and one launch beats one per head."""
    if k.device.type != "cpu":
        return torch.matmul(q0.float(), k.float().transpose(-1, -2))
    return torch.stack([torch.bmm(q0[:, head].float(), k[:, head].float().transpose(1, 2))
                        for head in range(k.shape[1])], dim=1)


def _class_weights(q0: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax of the class query's scores per head: ``q0 [B, H, 1, d]``, ``k [B, H, N, d]`` -> ``[B, H, 1, N]``
    (fp32; a head of width 0 scores every key 0, i.e. uniform attention, as the pruned model means it)."""
    scores = _class_scores(q0, k) * scale
    if bias is not None:
        scores = scores + bias.float()
    return scores.softmax(dim=-1)


def class_attention(q0: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                    live_heads: torch.Tensor | None = None) -> torch.Tensor:
    """The class token's attention to every token, mean over the (live) heads: ``q0 [B, H, 1, d]``, ``k [B, H, N, d]``
    -> ``[B, N]``."""
    weights = _class_weights(q0, k, scale, bias)
    if live_heads is None:
        return weights.mean(dim=1).squeeze(1)
    live = live_heads.to(weights.dtype)[None, :, None, None]
    return ((weights * live).sum(dim=1) / live.sum().clamp_min(1.0)).squeeze(1)


def ragged_class_attention(qkv: torch.Tensor, runs: Sequence, scale: float, bias: torch.Tensor | None
                           ) -> torch.Tensor:
    """``class_attention`` over the runs of equal-width heads of a pruned layer's packed ``qkv [B, N, T]``."""
    batch, tokens, _ = qkv.shape
    per_head = []
    for run in runs:
        width = run.heads * run.qk_width
        q0 = qkv[:, :1, run.q_start : run.q_start + width].reshape(batch, 1, run.heads, run.qk_width).transpose(1, 2)
        k = qkv[..., run.k_start : run.k_start + width].reshape(batch, tokens, run.heads, run.qk_width).transpose(1, 2)
        per_head.append(_class_weights(q0, k, scale, bias))
    return torch.cat(per_head, dim=1).mean(dim=1).squeeze(1)


def _timm_attention(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm ``Attention.forward`` step for step (fused path) with ``bias`` as the mask: ``(out, q, k, keys)``, keys
    ``[B, N, H * Dh]`` the heads' keys side by side."""
    batch, tokens, _ = x.shape
    width = attn.num_heads * attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    packed = attn.qkv(x)  # [B, N, 3 * H * Dh]
    qkv = packed.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    # Without a key norm the keys side by side are a slice of the packed projection: no copy.
    keys = packed[..., width : 2 * width] if isinstance(attn.k_norm, nn.Identity) else \
        k.transpose(1, 2).reshape(batch, tokens, width)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), q, k, keys


def attend(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, *, keys: bool, cls: bool) -> AttentionStats:
    """Run ``attn`` on ``x [B, N, D]`` with the additive ``bias [B, 1, 1, N]``; return what was asked for as well."""
    if isinstance(attn, PrunedAttention):
        out, qkv = attn.attend(x, bias)
        if qkv is None:  # no head left: nothing to compare, tokens are reduced by size alone
            batch, tokens, _ = x.shape
            empty = x.new_zeros(batch, tokens, 0) if keys else None
            uniform = x.new_full((batch, tokens), 1.0 / tokens, dtype=torch.float32) if cls else None
            return AttentionStats(out, empty, uniform)
        qk_total = sum(attn.qk_widths)
        return AttentionStats(out, qkv[..., qk_total : 2 * qk_total] if keys else None,
                              ragged_class_attention(qkv, attn.runs, attn.scale, bias) if cls else None)
    live_heads = None
    if isinstance(attn, GatedAttention):
        out, q, k, live_qk, live_heads = attn.attend(x, bias)
        # Closed q/k columns and removed heads out of the metric: the keys an extracted copy compares.
        batch, heads, tokens, width = k.shape
        metric = (k * live_qk[None, :, None, :].to(k.dtype)).transpose(1, 2).reshape(batch, tokens, heads * width)
    else:
        out, q, k, metric = _timm_attention(attn, x, bias)
    return AttentionStats(out, metric if keys else None,
                          class_attention(q[:, :, :1], k, attn.scale, bias, live_heads) if cls else None)
