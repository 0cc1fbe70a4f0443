"""``merge_tokens`` in Triton: gather of the kept tokens, size weighting, the fold of the sources and the division in
one launch, deterministic (no atomics).

Grid: batch x blocks of kept tokens x blocks of channels. A program loads its kept rows, then streams the sources in
blocks of BLOCK_R: a ``[BLOCK_D, BLOCK_R]`` matrix holds the size of source ``r`` where ``target[r]`` is row ``d`` and
zero elsewhere, and one ``tl.dot`` with the sources' rows adds them where they belong. A merge step folds few tokens
(r per block, a few percent of them), so the ``D x R x C`` product costs little next to the rows it moves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor, unit_last_stride
from hiap_kernels.token_merge.reference import check_merge_indices

__all__ = ["merge_tokens"]

_GPU_BLOCKS = (32, 16, 64, 4)  # BLOCK_D, BLOCK_R, BLOCK_C, num_warps
_INTERPRETER_BLOCKS = (16, 16, 32, 1)


@triton.jit
def _merge_tokens_kernel(
    x_ptr,
    size_ptr,
    keep_ptr,
    source_ptr,
    target_ptr,
    out_ptr,
    out_size_ptr,
    num_tokens,
    num_kept,
    num_sources,
    channels,
    x_stride_b,
    x_stride_p,
    out_stride_b,
    out_stride_d,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    # [BLOCK_D], [BLOCK_C]
    rows = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_valid = rows < num_kept
    col_valid = cols < channels
    x_base = x_ptr + batch * x_stride_b

    keep = tl.load(keep_ptr + batch * num_kept + rows, mask=row_valid, other=0)
    # An index outside its range is never read, and makes sizes NaN, so that the division writes NaN: the size of the
    # row of a kept token outside the P tokens, every row's size for a source outside them or a target outside the D
    # rows (each program streams all of the image's sources, so every program of that image sees it).
    keep_inside = (keep >= 0) & (keep < num_tokens)
    # [BLOCK_D]: sizes in fp32; masked rows get 1 so that their (discarded) division stays finite.
    total = tl.load(size_ptr + batch * num_tokens + keep, mask=row_valid & keep_inside, other=1.0)
    total = tl.where(row_valid & (keep_inside == 0), float("nan"), total)
    # [BLOCK_D, BLOCK_C]
    kept_rows = tl.load(x_base + keep[:, None] * x_stride_p + cols[None, :],
                        mask=(row_valid & keep_inside)[:, None] & col_valid[None, :], other=0.0).to(tl.float32)
    acc = kept_rows * total[:, None]

    for start in range(0, num_sources, BLOCK_R):
        # [BLOCK_R]
        sources = start + tl.arange(0, BLOCK_R)
        source_valid = sources < num_sources
        source = tl.load(source_ptr + batch * num_sources + sources, mask=source_valid, other=0)
        target = tl.load(target_ptr + batch * num_sources + sources, mask=source_valid, other=-1)
        inside = (source >= 0) & (source < num_tokens) & (target >= 0) & (target < num_kept)
        source_size = tl.load(size_ptr + batch * num_tokens + source, mask=source_valid & inside, other=0.0)
        # [BLOCK_R, BLOCK_C]
        source_rows = tl.load(x_base + source[:, None] * x_stride_p + cols[None, :],
                              mask=(source_valid & inside)[:, None] & col_valid[None, :], other=0.0).to(tl.float32)
        # [BLOCK_D, BLOCK_R]: source r's size where it joins row d.
        weights = tl.where(rows[:, None] == target[None, :], source_size[None, :], 0.0)
        acc += tl.dot(weights, source_rows, input_precision="ieee")
        # NaN (for every row) when one of these sources or targets lies out of range, else 0
        broken = tl.sum(tl.where(source_valid & (inside == 0), float("nan"), 0.0), axis=0)
        total += tl.sum(weights, axis=1) + broken

    out = acc / total[:, None]
    tl.store(out_ptr + batch * out_stride_b + rows[:, None] * out_stride_d + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])
    if tl.program_id(2) == 0:
        tl.store(out_size_ptr + batch * num_kept + rows, total, mask=row_valid)


@torch.library.custom_op("hiap_kernels::merge_tokens", mutates_args=())
def _merge_tokens_op(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor, source: torch.Tensor,
                     target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, channels = x.shape
    kept, sources = keep.shape[1], source.shape[1]
    out = runtime.empty((batch, kept, channels), x.dtype, x.device)
    out_size = runtime.empty((batch, kept), torch.float32, x.device)
    if batch == 0 or kept == 0 or channels == 0:
        return out, out_size
    x = unit_last_stride(x)
    block_d, block_r, block_c, warps = _INTERPRETER_BLOCKS if runtime.interpreter_active() else _GPU_BLOCKS
    grid = (batch, triton.cdiv(kept, block_d), triton.cdiv(channels, block_c))
    _merge_tokens_kernel[grid](
        x, size.contiguous(), keep.contiguous(), source.contiguous(), target.contiguous(), out, out_size,
        tokens, kept, sources, channels, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return out, out_size


@_merge_tokens_op.register_fake
def _merge_tokens_fake(x, size, keep, source, target):
    batch, _, channels = x.shape
    return x.new_empty((batch, keep.shape[1], channels)), x.new_empty((batch, keep.shape[1]), dtype=torch.float32)


def merge_tokens(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor, source: torch.Tensor,
                 target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted token merge (``reference.merge_tokens_reference`` is the contract), one launch, no host sync.

    Args:
        x: ``[B, P, C]`` fp32/fp16/bf16 tokens, last stride 1 (otherwise copied).
        size: ``[B, P]`` float32 sizes.
        keep: int64 ``[B, D]`` tokens that stay, in output order.
        source: int64 ``[B, R]`` tokens folded away.
        target: int64 ``[B, R]`` for each source, its output row (index into ``keep``).

    Indices out of range are never read. On CPU tensors (the interpreter) they are refused on the host, as the
    reference refuses them (ValueError naming the index); on a GPU and under ``torch.compile``, where reading them
    would cost a host synchronisation per call (or a graph break), the kernel flags them: the row of a ``keep``
    outside ``[0, P)``, and every row of an image with a ``source`` outside ``[0, P)`` or a ``target`` outside
    ``[0, D)``, come out NaN (``out`` and ``out_size``), as in ``reference.merge_tokens_flagged``.

    Returns ``out [B, D, C]`` in x's dtype and ``out_size [B, D]`` float32.
    """
    check_tensor("x", x, ndim=3, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    check_tensor("size", size, ndim=2, dtypes=(torch.float32,), device=x.device)
    for name, index in (("keep", keep), ("source", source), ("target", target)):
        check_tensor(name, index, ndim=2, dtypes=(torch.int64,), device=x.device)
    runtime.require_triton_device("merge_tokens", x, "hiap_kernels.token_merge.reference.merge_tokens_reference")
    batch, tokens, _ = x.shape
    if tuple(size.shape) != (batch, tokens):
        raise ValueError(f"size must have shape {(batch, tokens)} ([B, P]), got {tuple(size.shape)}")
    if keep.shape[0] != batch or source.shape[0] != batch or tuple(target.shape) != tuple(source.shape):
        raise ValueError(f"keep [B, D], source and target [B, R] must share B = {batch}, got keep "
                         f"{tuple(keep.shape)}, source {tuple(source.shape)}, target {tuple(target.shape)}")
    if keep.shape[1] + source.shape[1] > tokens:
        raise ValueError(f"{keep.shape[1]} kept and {source.shape[1]} merged tokens are more than the {tokens} given")
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        check_merge_indices(tokens, keep, source, target)
    return _merge_tokens_op(x, size, keep, source, target)
