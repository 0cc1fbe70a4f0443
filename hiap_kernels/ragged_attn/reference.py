"""Plain-PyTorch twins of the ragged inference attention kernel in ``kernel.py`` (no Triton import).

Layout of one pruned attention layer with ``Hk`` kept heads. Head ``h`` keeps ``qk_w[h]`` q/k columns (0..Dh; 0 means
uniform attention, the mean of v over the keys) and ``v_w[h]`` v columns (1..Dh). The layer's single qkv GEMM writes

    qkv: [B, N, T],  columns [Q_0 | Q_1 | ... | K_0 | K_1 | ... | V_0 | V_1 | ...],  T = 2 * sum(qk_w) + sum(v_w)

and the attention output is ``[B, N, sum(v_w)]`` with head ``h`` at columns ``out_off[h] = sum_{h' < h} v_w[h']``, the
packed input of the proj Linear. The softmax scale is the dense model's ``1/sqrt(Dh)``, never that of the kept width.

Two references:
  * ``ragged_attention_padded``: zero-pads every head to the layer's widest head and calls SDPA once. Compile friendly;
    this is the pruned model's reference path.
  * ``ragged_attention_naive``: a per-head loop with an explicit softmax, readable, exact in float64.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# Column order of one row of the head table read by the Triton kernel.
HEAD_TABLE_COLUMNS = ("q_off", "k_off", "v_off", "out_off", "qk_w", "v_w")


def _check_widths(qk_widths: Sequence[int], v_widths: Sequence[int]) -> tuple[list[int], list[int]]:
    qk = [int(w) for w in qk_widths]
    v = [int(w) for w in v_widths]
    if len(qk) != len(v):
        raise ValueError(f"qk_widths has {len(qk)} heads but v_widths has {len(v)}")
    if any(w < 0 for w in qk):
        raise ValueError(f"q/k widths must be >= 0, got {qk}")
    if any(w < 1 for w in v):
        raise ValueError(f"v widths must be >= 1 (a head without v columns is removed, not kept), got {v}")
    return qk, v


def _exclusive_cumsum(values: Sequence[int]) -> list[int]:
    offsets, total = [], 0
    for value in values:
        offsets.append(total)
        total += value
    return offsets


def packed_widths(qk_widths: Sequence[int], v_widths: Sequence[int]) -> tuple[int, int]:
    """``(T, V)``: the packed qkv width ``2 * sum(qk_w) + sum(v_w)`` and the packed output width ``sum(v_w)``."""
    qk, v = _check_widths(qk_widths, v_widths)
    return 2 * sum(qk) + sum(v), sum(v)


def build_head_table(
    qk_widths: Sequence[int], v_widths: Sequence[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """The per-head layout table the Triton kernel reads.

    Args:
        qk_widths: ``[Hk]`` kept q/k width of each head (0..Dh).
        v_widths: ``[Hk]`` kept v width of each head (1..Dh).
        device: where to put the table (the kernel needs it on the qkv device).

    Returns:
        int32 ``[Hk, 6]``; row ``h`` is ``(q_off, k_off, v_off, out_off, qk_w, v_w)``: the first qkv column of Q_h, K_h
        and V_h, the first output column of head ``h``, and its two widths.
    """
    qk, v = _check_widths(qk_widths, v_widths)
    qk_total = sum(qk)
    qk_offsets = _exclusive_cumsum(qk)
    out_offsets = _exclusive_cumsum(v)
    rows = [
        (q_off, qk_total + q_off, 2 * qk_total + out_off, out_off, qk_w, v_w)
        for q_off, out_off, qk_w, v_w in zip(qk_offsets, out_offsets, qk, v)
    ]
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(len(rows), len(HEAD_TABLE_COLUMNS))


def padded_gather_indices(
    qk_widths: Sequence[int], v_widths: Sequence[int], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather indices that pad every head to the layer's widest head.

    Padding entries point to column ``T``, the zero column ``ragged_attention_padded`` appends to qkv. A layer whose
    heads all have q/k width 0 gets q/k indices of width 1 (all padding): its scores are all zero, uniform attention.

    Args:
        qk_widths: ``[Hk]`` kept q/k width of each head.
        v_widths: ``[Hk]`` kept v width of each head.
        device: where to put the indices.

    Returns:
        int64 ``q_index [Hk, max_qk]``, ``k_index [Hk, max_qk]``, ``v_index [Hk, max_v]`` (columns of the padded qkv
        ``[B, N, T + 1]``) and ``out_index [sum(v_w)]``: for each packed output column, its position in the flattened
        padded output ``[Hk * max_v]``. Here ``max_qk = max(1, max(qk_w))`` and ``max_v = max(v_w)``.
    """
    qk, v = _check_widths(qk_widths, v_widths)
    total, _ = packed_widths(qk, v)
    table = build_head_table(qk, v)
    max_qk = max([1, *qk])
    max_v = max([1, *v])

    def padded(first_columns: torch.Tensor, widths: torch.Tensor, max_width: int) -> torch.Tensor:
        position = torch.arange(max_width, dtype=torch.int64)
        columns = first_columns.to(torch.int64)[:, None] + position[None, :]
        inside = position[None, :] < widths.to(torch.int64)[:, None]
        return torch.where(inside, columns, torch.full_like(columns, total))

    q_index = padded(table[:, 0], table[:, 4], max_qk)
    k_index = padded(table[:, 1], table[:, 4], max_qk)
    v_index = padded(table[:, 2], table[:, 5], max_v)
    out_index = torch.cat(
        [torch.arange(head * max_v, head * max_v + width, dtype=torch.int64) for head, width in enumerate(v)]
        or [torch.empty(0, dtype=torch.int64)]
    )
    return q_index.to(device), k_index.to(device), v_index.to(device), out_index.to(device)


def ragged_attention_padded(
    qkv: torch.Tensor,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    v_index: torch.Tensor,
    out_index: torch.Tensor,
    scale: float,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ragged attention by zero-padding every head to the widest one and one SDPA call.

    Zero q/k padding columns add nothing to the scores, so each head sees exactly its own scores; a head of q/k width
    0 gets all-zero scores, i.e. uniform attention. No ``.item()`` and no data-dependent Python control flow, so it
    traces under ``torch.compile``.

    Args:
        qkv: ``[B, N, T]`` packed output of the layer's qkv GEMM.
        q_index, k_index: int64 ``[Hk, max_qk]`` from ``padded_gather_indices``.
        v_index: int64 ``[Hk, max_v]``.
        out_index: int64 ``[V]`` with ``V = sum(v_w)``.
        scale: softmax scale (the dense model's ``1/sqrt(Dh)``).
        key_bias: optional ``[B, N]`` added to the scores of each key in every head (after the scale).

    Returns:
        ``[B, N, V]`` in ``qkv``'s dtype, heads packed for the proj Linear.
    """
    batch, tokens, _ = qkv.shape
    num_heads, max_qk = q_index.shape
    max_v = v_index.shape[1]
    with_zero_column = torch.cat([qkv, qkv.new_zeros(batch, tokens, 1)], dim=-1)

    def heads(index: torch.Tensor, width: int) -> torch.Tensor:
        # [B, N, Hk * width] -> [B, Hk, N, width]
        gathered = torch.index_select(with_zero_column, -1, index.reshape(-1))
        return gathered.view(batch, tokens, num_heads, width).transpose(1, 2)

    q = heads(q_index, max_qk)
    k = heads(k_index, max_qk)
    v = heads(v_index, max_v)
    mask = None if key_bias is None else key_bias[:, None, None, :].to(qkv.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, Hk, N, max_v]
    out = out.transpose(1, 2).reshape(batch, tokens, num_heads * max_v)
    return torch.index_select(out, -1, out_index)


def ragged_attention_naive(
    qkv: torch.Tensor, qk_widths: Sequence[int], v_widths: Sequence[int], scale: float,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ragged attention head by head with an explicit softmax: the readable second reference.

    Computes in float64 when ``qkv`` is float64 and in float32 otherwise, then casts back to ``qkv``'s dtype.

    Args:
        qkv: ``[B, N, T]`` packed output of the layer's qkv GEMM, ``T = 2 * sum(qk_w) + sum(v_w)``.
        qk_widths: ``[Hk]`` kept q/k width of each head (0 = uniform attention).
        v_widths: ``[Hk]`` kept v width of each head.
        scale: softmax scale (the dense model's ``1/sqrt(Dh)``).
        key_bias: optional ``[B, N]`` added to the scores of each key in every head (after the scale).

    Returns:
        ``[B, N, sum(v_w)]`` in ``qkv``'s dtype.
    """
    qk, v = _check_widths(qk_widths, v_widths)
    total, _ = packed_widths(qk, v)
    if qkv.shape[-1] != total:
        raise ValueError(f"qkv has {qkv.shape[-1]} columns but the widths need T = {total}")
    compute_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    x = qkv.to(compute_dtype)
    qk_total = sum(qk)
    outputs = []
    for head, (q_off, out_off) in enumerate(zip(_exclusive_cumsum(qk), _exclusive_cumsum(v))):
        q = x[..., q_off : q_off + qk[head]]  # [B, N, qk_w]
        k = x[..., qk_total + q_off : qk_total + q_off + qk[head]]  # [B, N, qk_w]
        values = x[..., 2 * qk_total + out_off : 2 * qk_total + out_off + v[head]]  # [B, N, v_w]
        scores = (q @ k.transpose(-1, -2)) * scale  # [B, N, N]; all zero when qk_w == 0
        if key_bias is not None:
            scores = scores + key_bias.to(compute_dtype)[:, None, :]
        scores = scores - scores.amax(dim=-1, keepdim=True)
        weights = scores.exp()
        weights = weights / weights.sum(dim=-1, keepdim=True)
        outputs.append(weights @ values)
    if not outputs:
        return qkv.new_zeros(*qkv.shape[:-1], 0)
    return torch.cat(outputs, dim=-1).to(qkv.dtype)
