"""Plain-PyTorch twins of the fused training kernels ``gated_qkv`` and ``gated_fc1``.

These functions define the contract the Triton kernels must meet (same arguments, same gates for the same seed, same
values and gradients through autograd) and are the reference path of ``hiap``'s gated modules. No Triton import.

Gate layout of one layer, flattened in this order; gate ``i`` draws its noise from Philox counter ``offset + i``:
    attention: head gates [H], then q/k-dim gates [H, Dh // G] row-major, then v-dim gates [H, Dh // G]
    FFN:       block gate [1], then neuron gates [F // G]
with ``G`` the micro-gate group size (``dim_group``): column ``j`` of a head (or neuron ``j``) uses micro gate ``j // G``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hiap_kernels.gates.reference import gumbel_sigmoid


def gate_values(
    logits: torch.Tensor, *, tau: float, seed: int, offset: int, hard: bool = True, sample: bool = True
) -> torch.Tensor:
    """Gate values for a flat logit vector ``[n]``: sampled (training) or the deterministic ``1[a > 0]`` (eval)."""
    if sample:
        return gumbel_sigmoid(logits, tau, seed, offset, hard)
    return (logits > 0).to(logits.dtype)


def attention_gate_values(
    head_logits: torch.Tensor,
    qk_logits: torch.Tensor,
    v_logits: torch.Tensor,
    *,
    tau: float,
    seed: int,
    offset: int,
    hard: bool = True,
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or decide) the head ``[H]``, q/k-dim ``[H, Dh//G]`` and v-dim ``[H, Dh//G]`` gates of one layer."""
    flat = torch.cat([head_logits.reshape(-1), qk_logits.reshape(-1), v_logits.reshape(-1)])
    z = gate_values(flat, tau=tau, seed=seed, offset=offset, hard=hard, sample=sample)
    num_heads, groups = qk_logits.shape
    z_head, z_qk, z_v = torch.split(z, [num_heads, num_heads * groups, num_heads * groups])
    return z_head, z_qk.view(num_heads, groups), z_v.view(num_heads, groups)


def attention_column_masks(
    z_head: torch.Tensor, z_qk: torch.Tensor, z_v: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective column masks ``m_q = dqk`` and ``m_v = g * dv``, both ``[H, Dh]`` (micro gates expanded over groups)."""
    group = head_dim // z_qk.shape[1]
    m_q = z_qk.repeat_interleave(group, dim=1)
    m_v = z_head[:, None] * z_v.repeat_interleave(group, dim=1)
    return m_q, m_v


def ffn_gate_values(
    block_logit: torch.Tensor,
    neuron_logits: torch.Tensor,
    *,
    tau: float,
    seed: int,
    offset: int,
    hard: bool = True,
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (or decide) the FFN block gate ``[1]`` and neuron gates ``[F//G]`` of one layer."""
    flat = torch.cat([block_logit.reshape(-1), neuron_logits.reshape(-1)])
    z = gate_values(flat, tau=tau, seed=seed, offset=offset, hard=hard, sample=sample)
    return z[:1], z[1:]


def ffn_neuron_mask(z_block: torch.Tensor, z_neuron: torch.Tensor, hidden: int) -> torch.Tensor:
    """Effective neuron mask ``m = b * c``, ``[F]``."""
    group = hidden // z_neuron.shape[0]
    return z_block * z_neuron.repeat_interleave(group)


def gated_qkv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    head_logits: torch.Tensor,
    qk_logits: torch.Tensor,
    v_logits: torch.Tensor,
    *,
    tau: float,
    seed: int,
    offset: int,
    hard: bool = True,
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated qkv projection: ``(x @ W^T + b)`` split into heads, q columns times ``m_q``, v columns times ``m_v``.

    Args:
        x: ``[B, N, D]``.
        weight: ``[3 * H * Dh, D]`` (timm's fused qkv layout: q rows, then k rows, then v rows; head-major inside each).
        bias: ``[3 * H * Dh]`` or None.
        head_logits: ``[H]``; qk_logits, v_logits: ``[H, Dh // G]``.
        tau, seed, offset, hard, sample: see :func:`gate_values`.

    Returns:
        q, k, v: ``[B, H, N, Dh]`` each, the layout ``F.scaled_dot_product_attention`` reads.
    """
    batch, tokens, _ = x.shape
    num_heads = head_logits.shape[0]
    head_dim = weight.shape[0] // (3 * num_heads)
    qkv = F.linear(x, weight, bias).reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    z_head, z_qk, z_v = attention_gate_values(
        head_logits, qk_logits, v_logits, tau=tau, seed=seed, offset=offset, hard=hard, sample=sample
    )
    m_q, m_v = attention_column_masks(z_head, z_qk, z_v, head_dim)
    q = q * m_q[None, :, None, :].to(q.dtype)
    v = v * m_v[None, :, None, :].to(v.dtype)
    return q, k, v


def gated_fc1_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block_logit: torch.Tensor,
    neuron_logits: torch.Tensor,
    *,
    tau: float,
    seed: int,
    offset: int,
    hard: bool = True,
    sample: bool = True,
    approximate: str = "none",
) -> torch.Tensor:
    """Gated FFN hidden layer: ``GELU(x @ W^T + b) * (b_gate * c)``.

    Args:
        x: ``[..., D]``.
        weight: ``[F, D]``; bias: ``[F]`` or None.
        block_logit: ``[1]``; neuron_logits: ``[F // G]``.
        approximate: GELU flavour, ``"none"`` (erf) or ``"tanh"``.

    Returns:
        ``[..., F]``.
    """
    hidden = F.gelu(F.linear(x, weight, bias), approximate=approximate)
    z_block, z_neuron = ffn_gate_values(
        block_logit, neuron_logits, tau=tau, seed=seed, offset=offset, hard=hard, sample=sample
    )
    return hidden * ffn_neuron_mask(z_block, z_neuron, weight.shape[0]).to(hidden.dtype)
