"""``token_redundancy`` in Triton: RAPID's prune score of every patch token, one program per image.

A program holds all of its image's patch tokens as the rows of one tile (BLOCK_P = the next power of two of P) and
walks the key width in chunks of BLOCK_W, twice:

1. the squared norm of every key, hence the inverse norms ``1 / max(||k_i||, eps)``;
2. per chunk, that chunk of ``sum_j m_j`` (a column sum of the tile scaled by the inverse norms) and every key's
   product with it, accumulated per row.

Then the class token's attention share, and only the scores reach memory. The keys are read twice, where they lie
(a strided view of the qkv projection), against three reads, a ``[B, 1, W]`` intermediate and about fifteen
launches for the PyTorch reference. Numerics: fp32 throughout; only the order of the fp32 sums differs from the
reference (a few ulp, which can swap two tokens whose scores tie to that precision). BLOCK_W shrinks as P grows so the
tile stays at 8K elements in registers; up to 4096 patch tokens (a ViT-L/14 at 896 px).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor, next_power_of_2_at_least_16
from hiap_kernels.common.tiles import inverse_row_norms

__all__ = ["token_redundancy"]

_GPU_TILE = 8192  # elements of the [BLOCK_P, BLOCK_W] key tile a program holds
_GPU_WARPS = 8
_INTERPRETER_BLOCK_W = 16
_MAX_PATCHES = 4096
_EPS = 1e-12  # F.normalize's default, and the floor of the attention sum


def _block_w(block_p: int) -> int:
    return _INTERPRETER_BLOCK_W if runtime.interpreter_active() else max(2, min(64, _GPU_TILE // block_p))


@triton.jit
def _token_redundancy_kernel(
    keys_ptr,
    cls_ptr,
    score_ptr,
    patches,
    width,
    keys_stride_b,
    keys_stride_p,
    cls_stride_b,
    cls_stride_p,
    redundancy_scale,  # 1 / max(P - 1, 1)
    share_scale,  # P: the attention share has mean 1
    importance_weight,
    eps,
    HAS_CLS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    # [BLOCK_P]
    rows = tl.arange(0, BLOCK_P)
    row_valid = rows < patches
    # [BLOCK_W]
    ws = tl.arange(0, BLOCK_W)
    # [BLOCK_P, BLOCK_W]
    key_ptrs = keys_ptr + batch * keys_stride_b + rows[:, None] * keys_stride_p + ws[None, :]

    # [BLOCK_P]: inverse key norms (padding rows are zero keys and add nothing below)
    inverse = inverse_row_norms(key_ptrs, row_valid, width, eps, BLOCK_P, BLOCK_W)

    # [BLOCK_P]: m_i . sum_j m_j, one chunk of the width at a time
    dots = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for w0 in range(0, width, BLOCK_W):
        chunk = tl.load(key_ptrs + w0, mask=row_valid[:, None] & ((w0 + ws) < width)[None, :],
                        other=0.0).to(tl.float32)
        # [BLOCK_W]: this chunk of sum_j k_j / |k_j|
        total = tl.sum(chunk * inverse[:, None], axis=0)
        dots += tl.sum(chunk * total[None, :], axis=1)
    score = (dots * inverse - 1.0) * redundancy_scale

    if HAS_CLS:
        attention = tl.load(cls_ptr + batch * cls_stride_b + rows * cls_stride_p, mask=row_valid,
                            other=0.0).to(tl.float32)
        share = attention / tl.maximum(tl.sum(attention, axis=0), eps) * share_scale
        score = score - importance_weight * share
    tl.store(score_ptr + batch * patches + rows, score, mask=row_valid)


@torch.library.custom_op("hiap_kernels::token_redundancy", mutates_args=(),
                         schema="(Tensor keys, Tensor? cls, float importance_weight) -> Tensor")
def _token_redundancy_op(keys: torch.Tensor, cls: torch.Tensor | None, importance_weight: float) -> torch.Tensor:
    batch, patches, width = keys.shape
    score = runtime.empty((batch, patches), torch.float32, keys.device)
    if batch == 0 or patches == 0:
        return score
    block_p = next_power_of_2_at_least_16(patches)
    attention = cls if cls is not None else score  # never read without HAS_CLS
    _token_redundancy_kernel[(batch,)](
        keys, attention, score, patches, width, keys.stride(0), keys.stride(1), attention.stride(0),
        attention.stride(1), 1.0 / max(patches - 1, 1), float(patches), importance_weight, _EPS,
        HAS_CLS=cls is not None, BLOCK_P=block_p, BLOCK_W=_block_w(block_p), num_warps=_GPU_WARPS,
    )  # fmt: skip
    return score


@_token_redundancy_op.register_fake
def _token_redundancy_fake(keys, cls, importance_weight):
    return keys.new_empty(keys.shape[:2], dtype=torch.float32)


def token_redundancy(keys: torch.Tensor, cls: torch.Tensor | None = None,
                     importance_weight: float = 1.0) -> torch.Tensor:
    """Every patch token's prune score (``reference.token_redundancy_reference`` is the contract), one launch, no
    host sync.

    Args:
        keys: ``[B, P, W]`` fp32/fp16/bf16 keys of the patch tokens, any batch and row strides (a view of the qkv
            projection is read in place), P <= 4096.
        cls: ``[B, P]`` float attention of the class token to them (any strides), or None (no importance term).
        importance_weight: finite, >= 0.

    Returns:
        ``score [B, P]`` float32: mean cosine similarity to the other tokens minus the weighted attention share.
    """
    check_tensor("keys", keys, ndim=3)
    batch, patches, _ = keys.shape
    if cls is not None:
        check_tensor("cls", cls, ndim=2, device=keys.device)
        if tuple(cls.shape) != (batch, patches):
            raise ValueError(f"cls must have shape {(batch, patches)} ([B, P] as keys [B, P, W]), got "
                             f"{tuple(cls.shape)}")
    weight = float(importance_weight)
    if not weight >= 0.0 or weight == float("inf"):
        raise ValueError(f"importance_weight must be finite and >= 0, got {importance_weight!r}")
    if patches > _MAX_PATCHES:
        raise ValueError(f"token_redundancy holds an image's tokens in one tile: at most {_MAX_PATCHES} patch tokens, "
                         f"got {patches} (use hiap_kernels.token_score.reference.token_redundancy_reference)")
    runtime.require_triton_device("token_redundancy", keys,
                                  "hiap_kernels.token_score.reference.token_redundancy_reference")
    return _token_redundancy_op(runtime.unit_last_stride(keys), cls if weight else None, weight)
