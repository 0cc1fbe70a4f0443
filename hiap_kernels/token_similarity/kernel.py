"""``nearest_tokens`` in Triton: each query token's most cosine-similar candidate token, without the similarity matrix.

Grid: batch x blocks of BLOCK_M queries. A program first sums its queries' squares over the key width, then streams
the candidates in blocks of BLOCK_N (flash-style): per block one ``[BLOCK_M, BLOCK_N]`` tile of dot products
(``tl.dot`` over the width in chunks of BLOCK_W, fp32 accumulation) and the candidates' squared norms from the same
loads; the tile is scaled by both inverse norms, excluded candidates set to -inf, and a running max and argmax per
query row carry over to the next block. Only ``score [B, M]`` and ``index [B, M]`` reach memory.

The width is looped over in chunks of BLOCK_W rather than held whole (BLOCK_W = next power of two of W): token
reduction's W is every kept key column side by side, any count after pruning (384 dense in a DeiT-S, e.g. 211 pruned),
so a whole-width tile would waste up to half its loads and FLOPs on padding (512 for 384) and, at 64 x 512 per
operand, would not fit in registers; the chunks cost a re-read of the query chunk per candidate block, served by L1/L2.

Numerics: the score is ``(q . c) / max(||q||, eps) / max(||c||, eps)``, eps = 1e-12 (``F.normalize``'s), all in fp32;
fp16 / bf16 products are exact in fp32, so only the order of the fp32 sums differs from the reference (a few ulp).
fp32 keys use ``input_precision="ieee"`` whatever torch's matmul precision says: the result is a discrete choice, and
TF32's 10-bit mantissa would flip it between near neighbours. Ties go to the lowest candidate index, all-excluded
rows give (-inf, 0), and NaN wins the max at its first candidate, as ``torch.max`` does (``reference.py``). Keys whose
squared norm overflows fp32 (entries beyond ~1e19) are outside the contract (the reference's norms overflow there too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor, next_power_of_2_at_least_16
from hiap_kernels.common.tiles import inverse_row_norms

__all__ = ["nearest_tokens"]

# BLOCK_M (an upper bound: the launcher takes the next power of two >= 16 of M below it, so RAPID's few merged
# queries do not fill a 64-row tile with padding), BLOCK_N, BLOCK_W, num_warps.
_GPU_BLOCKS = (64, 64, 64, 4)
_INTERPRETER_BLOCKS = (16, 16, 32, 1)
_EPS = 1e-12  # F.normalize's default


@triton.jit
def _nearest_tokens_kernel(
    queries_ptr,
    candidates_ptr,
    excluded_ptr,
    score_ptr,
    index_ptr,
    num_queries,
    num_candidates,
    width,
    queries_stride_b,
    queries_stride_m,
    candidates_stride_b,
    candidates_stride_p,
    excluded_stride_b,
    excluded_stride_p,
    eps,
    HAS_EXCLUDED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    # [BLOCK_M]
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_queries
    # [BLOCK_W]
    ws = tl.arange(0, BLOCK_W)
    # [BLOCK_M, BLOCK_W]
    query_ptrs = queries_ptr + batch * queries_stride_b + rows[:, None] * queries_stride_m + ws[None, :]
    candidates_base = candidates_ptr + batch * candidates_stride_b

    # [BLOCK_M]: inverse query norms, fp32
    query_inv = inverse_row_norms(query_ptrs, row_valid, width, eps, BLOCK_M, BLOCK_W)

    # [BLOCK_M]: the running max (+inf stands for NaN, see below) and its candidate
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for start in range(0, num_candidates, BLOCK_N):
        # [BLOCK_N]
        cands = start + tl.arange(0, BLOCK_N)
        cand_valid = cands < num_candidates
        # [BLOCK_W, BLOCK_N]: candidates read transposed
        cand_ptrs = candidates_base + cands[None, :] * candidates_stride_p + ws[:, None]
        # [BLOCK_M, BLOCK_N], [BLOCK_N]
        dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        cand_squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for w0 in range(0, width, BLOCK_W):
            w_valid = (w0 + ws) < width
            query_chunk = tl.load(query_ptrs + w0, mask=row_valid[:, None] & w_valid[None, :], other=0.0)
            cand_chunk = tl.load(cand_ptrs + w0, mask=w_valid[:, None] & cand_valid[None, :], other=0.0)
            dots = tl.dot(query_chunk, cand_chunk, dots, input_precision="ieee")
            cand_f32 = cand_chunk.to(tl.float32)
            cand_squares += tl.sum(cand_f32 * cand_f32, axis=0)
        cand_inv = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(cand_squares), eps))
        # [BLOCK_M, BLOCK_N]
        similarity = dots * query_inv[:, None] * cand_inv[None, :]
        allowed = cand_valid
        if HAS_EXCLUDED:
            excluded = tl.load(excluded_ptr + batch * excluded_stride_b + cands * excluded_stride_p, mask=cand_valid,
                               other=1)
            allowed = allowed & (excluded == 0)
        similarity = tl.where(allowed[None, :], similarity, float("-inf"))
        # NaN wins the max, as in torch.max. No allowed similarity is +inf (|q . c| <= ||q|| ||c||, and an infinite
        # key entry gives inf * 0 = NaN), so +inf marks NaN and the max below needs no NaN semantics of its own.
        similarity = tl.where(similarity != similarity, float("inf"), similarity)
        # [BLOCK_M]: the block's max and its lowest candidate; a later block must beat it strictly (ties: lowest index)
        block_best = tl.max(similarity, axis=1)
        block_index = tl.min(tl.where(similarity == block_best[:, None], cands[None, :], num_candidates), axis=1)
        better = block_best > best
        best_index = tl.where(better, block_index, best_index)
        best = tl.where(better, block_best, best)

    score = tl.where(best == float("inf"), float("nan"), best)
    tl.store(score_ptr + batch * num_queries + rows, score, mask=row_valid)
    tl.store(index_ptr + batch * num_queries + rows, best_index.to(tl.int64), mask=row_valid)


@torch.library.custom_op("hiap_kernels::nearest_tokens", mutates_args=(),
                         schema="(Tensor queries, Tensor candidates, Tensor? excluded) -> (Tensor, Tensor)")
def _nearest_tokens_op(queries: torch.Tensor, candidates: torch.Tensor,
                       excluded: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_queries, width = queries.shape
    num_candidates = candidates.shape[1]
    score = runtime.empty((batch, num_queries), torch.float32, queries.device)
    index = runtime.empty((batch, num_queries), torch.int64, queries.device)
    if batch == 0 or num_queries == 0:
        return score, index
    if queries.dtype == torch.bfloat16 and runtime.interpreter_active():
        # The interpreter's bf16 tl.dot is broken; bf16 products are exact in fp32, so fp32 copies give the same sums.
        queries, candidates = queries.float(), candidates.float()
    block_m, block_n, block_w, warps = _INTERPRETER_BLOCKS if runtime.interpreter_active() else _GPU_BLOCKS
    block_m = min(block_m, next_power_of_2_at_least_16(num_queries))
    mask = excluded.view(torch.uint8) if excluded is not None else score  # never read without HAS_EXCLUDED
    grid = (batch, triton.cdiv(num_queries, block_m))
    _nearest_tokens_kernel[grid](
        queries, candidates, mask, score, index, num_queries, num_candidates, width,
        queries.stride(0), queries.stride(1), candidates.stride(0), candidates.stride(1),
        mask.stride(0), mask.stride(1), _EPS,
        HAS_EXCLUDED=excluded is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w, num_warps=warps,
    )  # fmt: skip
    return score, index


@_nearest_tokens_op.register_fake
def _nearest_tokens_fake(queries, candidates, excluded):
    batch, num_queries, _ = queries.shape
    return (queries.new_empty((batch, num_queries), dtype=torch.float32),
            queries.new_empty((batch, num_queries), dtype=torch.int64))


def _unit_last_stride(name: str, tensor: torch.Tensor) -> None:
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit last stride (views like keys[:, ::2] are read in place), got "
                         f"strides {tuple(tensor.stride())}")


def nearest_tokens(queries: torch.Tensor, candidates: torch.Tensor,
                   excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's most cosine-similar candidate (``reference.nearest_tokens_reference`` is the contract), one launch,
    no similarity matrix in memory, no host sync.

    Args:
        queries: ``[B, M, W]`` fp32/fp16/bf16 keys, any batch and row strides, last stride 1 (strided views such as
            ``keys[:, ::2]`` are read in place, not copied).
        candidates: ``[B, P, W]``, queries' dtype and device, last stride 1.
        excluded: bool ``[B, P]`` (any strides), True where a candidate may not be chosen; None allows all.

    Returns:
        ``score [B, M]`` float32, the best cosine similarity, and ``index [B, M]`` int64, its candidate. Ties: the
        lowest index; every candidate excluded: (-inf, 0); NaN in a query or allowed candidate: (NaN, first NaN
        candidate), as ``torch.max`` over the reference's similarity row.
    """
    check_tensor("queries", queries, ndim=3)
    check_tensor("candidates", candidates, ndim=3, dtypes=(queries.dtype,), device=queries.device)
    if excluded is not None:
        check_tensor("excluded", excluded, ndim=2, dtypes=(torch.bool,), device=queries.device)
    runtime.require_triton_device("nearest_tokens", queries,
                                  "hiap_kernels.token_similarity.reference.nearest_tokens_reference")
    batch, _, width = queries.shape
    if candidates.shape[0] != batch or candidates.shape[2] != width:
        raise ValueError(f"candidates must have shape [B, P, W] with B = {batch} and W = {width} as queries "
                         f"[B, M, W], got {tuple(candidates.shape)}")
    if excluded is not None and tuple(excluded.shape) != (batch, candidates.shape[1]):
        raise ValueError(f"excluded must have shape {(batch, candidates.shape[1])} ([B, P]), got "
                         f"{tuple(excluded.shape)}")
    _unit_last_stride("queries", queries)
    _unit_last_stride("candidates", candidates)
    return _nearest_tokens_op(queries, candidates, excluded)
