"""Plain-PyTorch twins of ``gated_qkv_weight`` and ``gated_fc2_weight``: sample a layer's gates and apply its masks to
the weights its cuBLAS GEMMs then read.

A masked output column of a linear layer equals that weight row (and bias entry) scaled by the mask, and a masked FFN
neuron equals fc2's input column scaled by it. So a gated layer can hand the library GEMM a masked weight, and the
gates' gradients follow from the weight's: ``dL/dm[r] = <dL/dW'[r], W[r]> + dL/db'[r] b[r]``.

Gate layout of one layer (gate ``i`` draws Philox counter ``offset + i``), as in ``hiap_kernels.gates``:
    attention: head gates [H], q/k-dim gates [H, Dh/G], v-dim gates [H, Dh/G]
    FFN:       block gate [1], neuron gates [F/G]
Row masks of timm's fused qkv weight ``[3 H Dh, D]``: ``m_q = dqk`` on the q rows, 1 on the k rows, ``m_v = g * dv`` on
the v rows. Column mask of fc2's weight ``[D, F]``: ``m = b * c``.

No Triton import: these are the reference path of ``hiap``'s gated modules and the contract of the kernels.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from hiap_kernels.gates.reference import (
    attention_column_masks,
    attention_gate_values,
    ffn_gate_values,
    ffn_neuron_mask,
)


def qkv_row_scale(z_head: torch.Tensor, z_qk: torch.Tensor, z_v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per row of the fused qkv weight ``[3 H Dh]``: ``m_q`` on q rows, 1 on k rows, ``m_v = g * dv`` on v rows."""
    m_q, m_v = attention_column_masks(z_head, z_qk, z_v, head_dim)
    return torch.cat([m_q.reshape(-1), torch.ones_like(m_q).reshape(-1), m_v.reshape(-1)])


def gated_qkv_weight_reference(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    head_logits: torch.Tensor,
    qk_logits: torch.Tensor,
    v_logits: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    seed: int | torch.Tensor,
    offset: int,
    hard: bool = True,
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The qkv weight and bias with the layer's sampled row masks applied.

    Args:
        weight: ``[3 H Dh, D]`` (timm's fused layout: q rows, k rows, v rows; head-major inside each).
        bias: ``[3 H Dh]`` or None.
        head_logits: ``[H]``; qk_logits, v_logits: ``[H, Dh / G]``.
        tau, seed, offset, hard: the Gumbel-Sigmoid draw (``hiap_kernels.gumbel_sigmoid``); ``sample`` False applies
            the deterministic decision ``1[a > 0]`` (no gradient to the logits).

    Returns:
        ``weight * m[:, None]`` and ``bias * m`` (None without a bias), in their own dtypes; gradients reach the
        weight, the bias and (when sampling) the logits through the straight-through estimator.
    """
    num_heads = head_logits.shape[0]
    head_dim = weight.shape[0] // (3 * num_heads)
    values = attention_gate_values(head_logits, qk_logits, v_logits, tau=tau, seed=seed, offset=offset, hard=hard,
                                   sample=sample)
    scale = qkv_row_scale(*values, head_dim).to(weight.dtype)
    return weight * scale[:, None], None if bias is None else bias * scale.to(bias.dtype)


def gated_fc2_weight_reference(
    weight: torch.Tensor,
    block_logit: torch.Tensor,
    neuron_logits: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    seed: int | torch.Tensor,
    offset: int,
    hard: bool = True,
    sample: bool = True,
) -> torch.Tensor:
    """fc2's weight with the layer's sampled neuron mask on its input columns.

    Args:
        weight: ``[D, F]``; block_logit: ``[1]``; neuron_logits: ``[F / G]``. The rest as in
            :func:`gated_qkv_weight_reference`.

    Returns:
        ``weight * m[None, :]`` with ``m = b * c`` ``[F]``, in the weight's dtype.
    """
    z_block, z_neuron = ffn_gate_values(block_logit, neuron_logits, tau=tau, seed=seed, offset=offset, hard=hard,
                                        sample=sample)
    return weight * ffn_neuron_mask(z_block, z_neuron, weight.shape[1]).to(weight.dtype)


def inverse_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """``gather_weight``'s ``inverse``: each of ``size`` rows' / columns' position in ``index`` (int64), -1 where it is
    not in it. Built once per fixed structure."""
    inverse = torch.full((size,), -1, dtype=torch.int64, device=index.device)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    return inverse


# index -> ((index version, inverse version, extent), weakref to inverse): pairs checked already. Keyed by the tensor
# object (weakly) with its version counter, so an in-place edit or a new tensor at a recycled address is checked afresh.
_CHECKED_INDICES = WeakTensorKeyDictionary()


def _versions(index: torch.Tensor, inverse: torch.Tensor, extent: int) -> tuple | None:
    try:
        return index._version, inverse._version, extent
    except RuntimeError:  # an inference tensor keeps no version counter: checked on every call
        return None


def check_gather_indices(index: torch.Tensor, inverse: torch.Tensor, extent: int, dim: int = 0) -> None:
    """ValueError unless ``index`` holds distinct rows / columns in ``[0, extent)`` and ``inverse`` is its inverse
    (``inverse[index[k]] = k``, -1 elsewhere), naming the argument and the value at fault.

    Reads both on the host: one device-to-host copy the first time a pair comes, none after (remembered per tensor
    object and version; an index of a fixed structure is built once). Left out under ``torch.compile``, where the
    kernel's own bounds hold (see ``gather_weight``).
    """
    if torch.compiler.is_compiling():
        return
    signature = _versions(index, inverse, extent)
    cached = _CHECKED_INDICES.get(index) if signature is not None else None
    if cached is not None and cached[0] == signature and cached[1]() is inverse:
        return
    kept = index.numel()
    what = "rows" if dim == 0 else "columns"
    if inverse.numel() != extent:
        raise ValueError(f"inverse has {inverse.numel()} entries for the weight's {extent} {what}")
    both = torch.cat([index.detach().reshape(-1), inverse.detach().reshape(-1)]).cpu()
    index_host, inverse_host = both[:kept], both[kept:]
    if kept:
        low, high = int(index_host.min()), int(index_host.max())
        if low < 0 or high >= extent:
            raise ValueError(f"index holds {low if low < 0 else high}, outside [0, {extent}) (the weight's {what})")
    if inverse_host.numel():
        low, high = int(inverse_host.min()), int(inverse_host.max())
        if low < -1 or high >= kept:
            raise ValueError(f"inverse holds {low if low < -1 else high}, outside [-1, {kept}) (-1 or a position in "
                             "index)")
    if not torch.equal(inverse_host[index_host], torch.arange(kept)) or int((inverse_host >= 0).sum()) != kept:
        raise ValueError("inverse is not the inverse of index (inverse[index[k]] = k, -1 elsewhere; index distinct): "
                         "build it with hiap_kernels.gated_weight.inverse_index")
    if signature is not None:
        _CHECKED_INDICES[index] = (signature, weakref.ref(inverse))


def gather_weight_reference(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    inverse: torch.Tensor,
    scale: torch.Tensor | None,
    *,
    dim: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows (``dim=0``) or columns (``dim=1``) of a weight that a fixed structure keeps, scaled by the decision.

    Args:
        weight: ``[R, C]``. bias: ``[R]`` or None (rows only: a column gather leaves the bias to its layer).
        index: int64 ``[K]``, the kept rows / columns, each at most once. inverse: int64 ``[R]`` / ``[C]``, each row's /
            column's position in ``index`` or -1 (unused here; the kernel's backward reads it).
        scale: float32 ``[K]`` or None (ones).

    Returns:
        ``weight.index_select(dim, index)`` times ``scale`` along ``dim`` (``[K, C]`` or ``[R, K]``), and the bias
        gathered and scaled alike (None without one or for columns). Gradients reach the weight and the bias; the rows
        or columns left out get zeros.

    Raises:
        ValueError: an index outside the weight, or an ``inverse`` that is not ``index``'s
            (:func:`check_gather_indices`, once per pair of index tensors).
    """
    check_gather_indices(index, inverse, weight.shape[dim], dim)
    out = weight.index_select(dim, index)
    out_bias = None if bias is None or dim != 0 else bias.index_select(0, index)
    if scale is not None:
        scale = scale.to(weight.dtype)
        out = out * (scale[:, None] if dim == 0 else scale[None, :])
        out_bias = None if out_bias is None else out_bias * scale.to(out_bias.dtype)
    return out, out_bias
