"""Plain-PyTorch twins of the fused training kernels ``gated_qkv`` and ``gated_fc1``.

These functions define the contract the Triton kernels must meet (same arguments, same gates for the same seed, same
values and gradients through autograd). No Triton import. A layer's gates (their order in the Philox stream, their
values and the masks they make) come from ``hiap_kernels.gates``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hiap_kernels.gates.reference import (
    attention_column_masks,
    attention_gate_values,
    ffn_gate_values,
    ffn_neuron_mask,
)


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
        tau, seed, offset, hard, sample: see :func:`hiap_kernels.gates.reference.gate_values`.

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
