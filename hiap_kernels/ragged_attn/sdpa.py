"""Ragged attention as one ``F.scaled_dot_product_attention`` call per run of equal-width heads (no Triton).

Heads that share a q/k width and a v width and sit next to each other in the packed layout form a run: their q, k
and v columns are contiguous slices of qkv, so the run is plain multi-head attention on strided views, which SDPA
runs on its fastest backend (flash, memory-efficient, cuDNN or the CPU flash kernel) with no gather and no padding.
Extraction orders the kept heads of a layer by width, so a layer has as many runs as distinct width pairs (one when
the layer was pruned evenly). A run of q/k width 0 is uniform attention: the mean of v over the tokens.

The runs are Python values fixed when a layer is built (``head_runs``), so the function traces under
``torch.compile`` into a static graph and is captured by CUDA graphs as it is.

A run whose q/k width differs from its v width is the one case SDPA's fused CPU kernel does not take: it needs one
head dim for q, k and v, and its fallback (the math path) costs several times more per call. On a CPU such a run is
padded with zero columns to the wider of the two widths (zeros in q and k add nothing to the scores; the padded v
columns are cut from the output), which measured faster than the fallback on every layout tried. CUDA's
memory-efficient and cuDNN kernels take the two widths as they are.
"""

# No ``from __future__ import annotations``: TorchScript reads HeadRun's field types, which it would see as strings.
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from hiap_kernels.ragged_attn.reference import _check_widths, _exclusive_cumsum


class HeadRun(NamedTuple):
    """``heads`` consecutive heads of q/k width ``qk_width`` and v width ``v_width``; first qkv column of each part."""

    heads: int
    qk_width: int
    v_width: int
    q_start: int
    k_start: int
    v_start: int


def head_runs(qk_widths: Sequence[int], v_widths: Sequence[int]) -> tuple[HeadRun, ...]:
    """The runs of consecutive equal-width heads of a packed layout ``[Q_0|Q_1|...|K_0|...|V_0|...]``."""
    qk, v = _check_widths(qk_widths, v_widths)
    qk_total = sum(qk)
    q_offsets, v_offsets = _exclusive_cumsum(qk), _exclusive_cumsum(v)
    runs: list[HeadRun] = []
    for head, (qk_w, v_w) in enumerate(zip(qk, v)):
        last = runs[-1] if runs else None
        if last is not None and (last.qk_width, last.v_width) == (qk_w, v_w):
            runs[-1] = last._replace(heads=last.heads + 1)
        else:
            q_start = q_offsets[head]
            runs.append(HeadRun(1, qk_w, v_w, q_start, qk_total + q_start, 2 * qk_total + v_offsets[head]))
    return tuple(runs)


def ragged_attention_sdpa(qkv: torch.Tensor, runs: List[HeadRun], scale: float,
                          attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Ragged attention over ``runs`` of equal-width heads, one SDPA call per run.

    Args:
        qkv: ``[B, N, T]`` packed output of the layer's qkv GEMM (any strides with a unit last stride).
        runs: from :func:`head_runs` of the layer's widths (a list, or the tuple it returns; TorchScript takes a list).
        scale: softmax scale (the dense model's ``1/sqrt(Dh)``).
        attn_mask: optional additive float bias broadcastable to ``[B, 1, N, N]`` (the same for every head), e.g.
            token reduction's ``log(size)`` of each key.

    Returns:
        ``[B, N, sum(v_w)]`` in qkv's dtype, heads packed in order for the proj Linear.
    """
    batch, tokens, _ = qkv.shape
    # Functional (no in-place writes into a preallocated output), so that ONNX export traces it as it runs.
    outputs = [_run_attention(qkv, run, scale, attn_mask).transpose(1, 2)
               .reshape(batch, tokens, run.heads * run.v_width) for run in runs]
    if not outputs:
        return qkv.new_zeros([batch, tokens, 0])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def _run_attention(qkv: torch.Tensor, run: HeadRun, scale: float, attn_mask: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """Attention of one run of equal-width heads: ``[B, heads, N, v_width]``."""
    batch, tokens, _ = qkv.shape
    # [B, N, heads * width] -> [B, heads, N, width], views of qkv
    v = qkv[..., run.v_start : run.v_start + run.heads * run.v_width]
    v = v.view(batch, tokens, run.heads, run.v_width).transpose(1, 2)
    if run.qk_width == 0:
        # All scores zero: softmax is uniform over the keys (weighted by the bias when there is one).
        if attn_mask is None:
            return v.mean(dim=2, keepdim=True).expand(batch, run.heads, tokens, run.v_width)
        weights = torch.softmax(attn_mask.float(), dim=-1).to(v.dtype)  # [B or 1, 1, 1 or N, N]
        return torch.matmul(weights, v).expand(batch, run.heads, tokens, run.v_width)
    width = run.heads * run.qk_width
    q = qkv[..., run.q_start : run.q_start + width].view(batch, tokens, run.heads, run.qk_width).transpose(1, 2)
    k = qkv[..., run.k_start : run.k_start + width].view(batch, tokens, run.heads, run.qk_width).transpose(1, 2)
    if qkv.device.type == "cpu" and run.qk_width != run.v_width:
        return _padded_to_one_width(q, k, v, scale, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _padded_to_one_width(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDPA with q, k (``[B, h, N, w_qk]``) and v (``[B, h, N, w_v]``) zero-padded to one head dim; ``[B, h, N, w_v]``."""
    qk_width, v_width = q.shape[-1], v.shape[-1]
    if qk_width < v_width:
        q = F.pad(q, (0, v_width - qk_width))
        k = F.pad(k, (0, v_width - qk_width))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, qk_width - v_width)), attn_mask=attn_mask, scale=scale)
    return out[..., :v_width]
