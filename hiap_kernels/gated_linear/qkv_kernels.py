"""Triton kernels of ``gated_qkv``: forward GEMM with the gate-mask epilogue, column mask, backward dx and dW.

The forward writes straight into the ``[3, B, H, N, Dh]`` layout; the backward kernels read dq, dk, dv where they lie.
The dW kernel also emits the partial mask gradient ``<W[n], G[n]>`` (see the package docstring). Launchers live in
``qkv.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hiap_kernels.common.runtime import pick_configs
from hiap_kernels.common.tiles import GATED_GEMM_CONFIGS, autotune, gemm_config, swizzled_tile, x_times_weight_t
from hiap_kernels.gates.kernel import gate_value_and_slope

# ----------------------------------------------------------------------------------------------------------------
# Autotune configs of the backward kernels (the forward uses the shared GATED_GEMM_CONFIGS)
# ----------------------------------------------------------------------------------------------------------------


# dx tiles [M, K]; BLOCK_N is the reduction step over the projection's output columns.
DX_CONFIGS = pick_configs(
    [
        gemm_config(128, 64, 64, 8, 3),
        gemm_config(128, 32, 64, 4, 4),
        gemm_config(64, 64, 64, 4, 4),
        gemm_config(64, 32, 128, 4, 4),
        gemm_config(64, 64, 128, 8, 3),
    ],
    gemm_config(32, 64, 32, 4, 1),
)


def dw_config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# dW tiles [N_OUT, K]; BLOCK_M is the reduction step over tokens. (A 128 x 128 tile at 3 stages needs 242 KiB of shared
# memory in bf16, more than an H100 block gets: bench/compile_sm90.py.) BLOCK_K is fixed by the launcher instead: the kernel
# writes one row of mask-gradient partial sums per K tile, and a row count that depended on the config would leave rows
# of a previously benchmarked config behind.
DW_CONFIGS = pick_configs(
    [
        dw_config(64, 64, 4, 4),
        dw_config(128, 64, 8, 3),
        dw_config(64, 128, 8, 3),
        dw_config(32, 64, 4, 5),
    ],
    dw_config(32, 64, 4, 1),
)
DW_BLOCK_K_GPU = 64
DW_BLOCK_K_INTERPRETER = 32


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def qkv_column_mask(
    cols,
    head_logits_ptr,
    qk_logits_ptr,
    v_logits_ptr,
    seed,
    offset,
    tau,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    HARD: tl.constexpr,
    SAMPLE: tl.constexpr,
):
    """Mask of qkv output columns ``cols`` (flattened [3, H, Dh]): m_q = dqk, 1 for k, m_v = g * dv (fp32)."""
    GROUPS_PER_HEAD: tl.constexpr = HEAD_DIM // GROUP
    WIDTH: tl.constexpr = NUM_HEADS * HEAD_DIM
    part = cols // WIDTH
    within = cols % WIDTH
    head = within // HEAD_DIM
    micro = head * GROUPS_PER_HEAD + (within % HEAD_DIM) // GROUP
    is_q = part == 0
    is_v = part == 2
    # A q column needs its q/k-dim gate, a v column its v-dim gate and head gate: two draws per column, not three.
    qk_logit = tl.load(qk_logits_ptr + micro, mask=is_q, other=0.0).to(tl.float32)
    v_logit = tl.load(v_logits_ptr + micro, mask=is_v, other=0.0).to(tl.float32)
    micro_logit = tl.where(is_q, qk_logit, v_logit)
    # Gate order of a layer: [H] head gates, [H, Dh // G] q/k-dim gates, [H, Dh // G] v-dim gates.
    micro_counter = offset + NUM_HEADS + tl.where(is_q, 0, NUM_HEADS * GROUPS_PER_HEAD) + micro
    z_micro, _ = gate_value_and_slope(micro_logit, seed, micro_counter, tau, HARD, SAMPLE)
    head_logit = tl.load(head_logits_ptr + head, mask=is_v, other=0.0).to(tl.float32)
    z_head, _ = gate_value_and_slope(head_logit, seed, offset + head, tau, HARD, SAMPLE)
    return tl.where(is_q, z_micro, tl.where(is_v, z_head * z_micro, 1.0))


@autotune(GATED_GEMM_CONFIGS, ["M", "N_OUT", "K"])
@triton.jit(do_not_specialize=["offset"])
def qkv_forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    head_logits_ptr,
    qk_logits_ptr,
    v_logits_ptr,
    out_ptr,
    M,
    N_OUT,
    K,
    TOKENS,
    PART_STRIDE,
    seed_ptr,
    offset,
    tau_ptr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    HARD: tl.constexpr,
    SAMPLE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Read on the device: a new step's seed or temperature is a new value, not a new compilation.
    seed = tl.load(seed_ptr)
    tau = tl.load(tau_ptr).to(tl.float32)
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # [BLOCK_M, BLOCK_N]
    acc = x_times_weight_t(x_ptr, w_ptr, rows, cols, M, N_OUT, K, K, K, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    col_valid = cols < N_OUT
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    # [BLOCK_N]
    mask = qkv_column_mask(
        cols, head_logits_ptr, qk_logits_ptr, v_logits_ptr, seed, offset, tau, NUM_HEADS, HEAD_DIM, GROUP, HARD, SAMPLE
    )
    acc = acc * mask[None, :]

    # Store straight into [3, B, H, N, Dh]: row m = (batch, token), column n = (part, head, dim).
    WIDTH: tl.constexpr = NUM_HEADS * HEAD_DIM
    batch = rows // TOKENS
    token = rows % TOKENS
    row_offset = batch.to(tl.int64) * NUM_HEADS * TOKENS * HEAD_DIM + token.to(tl.int64) * HEAD_DIM
    part = cols // WIDTH
    head = (cols % WIDTH) // HEAD_DIM
    dim = cols % HEAD_DIM
    col_offset = part.to(tl.int64) * PART_STRIDE + head.to(tl.int64) * TOKENS * HEAD_DIM + dim
    out_ptrs = out_ptr + row_offset[:, None] + col_offset[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & col_valid[None, :])


@triton.jit(do_not_specialize=["offset"])
def qkv_column_mask_kernel(
    head_logits_ptr,
    qk_logits_ptr,
    v_logits_ptr,
    mask_ptr,
    N_OUT,
    seed_ptr,
    offset,
    tau_ptr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    HARD: tl.constexpr,
    SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The forward epilogue's column mask, written out once so the backward GEMMs read it instead of re-sampling."""
    # Read on the device: a new step's seed or temperature is a new value, not a new compilation.
    seed = tl.load(seed_ptr)
    tau = tl.load(tau_ptr).to(tl.float32)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = qkv_column_mask(
        cols, head_logits_ptr, qk_logits_ptr, v_logits_ptr, seed, offset, tau, NUM_HEADS, HEAD_DIM, GROUP, HARD, SAMPLE
    )
    tl.store(mask_ptr + cols, mask, mask=cols < N_OUT)


@triton.jit
def load_qkv_grad_tile(
    dq_ptr,
    dk_ptr,
    dv_ptr,
    rows,
    cols,
    M,
    TOKENS,
    stride_b,
    stride_h,
    stride_n,
    stride_d,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """``dY[rows, cols]`` of the fused projection, gathered from dq, dk, dv ``[B, H, N, Dh]`` (shared strides)."""
    WIDTH: tl.constexpr = NUM_HEADS * HEAD_DIM
    batch = rows // TOKENS
    token = rows % TOKENS
    # [BLOCK_M]
    row_offset = batch.to(tl.int64) * stride_b + token.to(tl.int64) * stride_n
    part = cols // WIDTH
    head = (cols % WIDTH) // HEAD_DIM
    dim = cols % HEAD_DIM
    # [BLOCK_N]
    col_offset = head.to(tl.int64) * stride_h + dim.to(tl.int64) * stride_d
    offsets = row_offset[:, None] + col_offset[None, :]
    valid = (rows < M)[:, None] & (part < 3)[None, :]
    # A tile may straddle q/k/v; each lane reads from exactly one of the three tensors, the others add zero.
    tile = tl.load(dq_ptr + offsets, mask=valid & (part == 0)[None, :], other=0.0)
    tile += tl.load(dk_ptr + offsets, mask=valid & (part == 1)[None, :], other=0.0)
    tile += tl.load(dv_ptr + offsets, mask=valid & (part == 2)[None, :], other=0.0)
    return tile


@autotune(DX_CONFIGS, ["M", "N_OUT", "K"])
@triton.jit
def qkv_backward_dx_kernel(
    dq_ptr,
    dk_ptr,
    dv_ptr,
    col_mask_ptr,
    w_ptr,
    dx_ptr,
    M,
    N_OUT,
    K,
    TOKENS,
    stride_b,
    stride_h,
    stride_n,
    stride_d,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx = (dY * m) @ W, dY read in head layout."""
    pid_m, pid_k = swizzled_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = ks < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N_OUT, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_valid = cols < N_OUT
        # [BLOCK_M, BLOCK_N]
        grad = load_qkv_grad_tile(
            dq_ptr, dk_ptr, dv_ptr, rows, cols, M, TOKENS, stride_b, stride_h, stride_n, stride_d, NUM_HEADS, HEAD_DIM
        )
        # [BLOCK_N]
        mask = tl.load(col_mask_ptr + cols, mask=col_valid, other=0.0)
        grad = (grad.to(tl.float32) * mask[None, :]).to(w_ptr.dtype.element_ty)
        # [BLOCK_N, BLOCK_K]
        w_tile = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :], mask=col_valid[:, None] & k_valid[None, :], other=0.0
        )
        acc = tl.dot(grad, w_tile, acc, input_precision=INPUT_PRECISION)
    dx_ptrs = dx_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(rows < M)[:, None] & k_valid[None, :])


@autotune(DW_CONFIGS, ["M", "N_OUT", "K"])
@triton.jit
def qkv_backward_dw_kernel(
    dq_ptr,
    dk_ptr,
    dv_ptr,
    x_ptr,
    w_ptr,
    col_mask_ptr,
    dw_ptr,
    mask_grad_partial_ptr,
    col_sum_ptr,
    M,
    N_OUT,
    K,
    TOKENS,
    stride_b,
    stride_h,
    stride_n,
    stride_d,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    STORE_DW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """G = dY^T @ x; dW = m * G; per K tile, the partial mask gradient <W, G> over the tile; colsum(dY) once."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_valid = cols < N_OUT
    k_valid = ks < K
    # [BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # [BLOCK_N]
    col_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        # [BLOCK_M, BLOCK_N]
        grad = load_qkv_grad_tile(
            dq_ptr, dk_ptr, dv_ptr, rows, cols, M, TOKENS, stride_b, stride_h, stride_n, stride_d, NUM_HEADS, HEAD_DIM
        )
        # [BLOCK_M, BLOCK_K]
        x_tile = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], mask=(rows < M)[:, None] & k_valid[None, :], other=0.0
        )
        acc = tl.dot(tl.trans(grad), x_tile, acc, input_precision=INPUT_PRECISION)
        col_sum += tl.sum(grad.to(tl.float32), axis=0)

    tile_offsets = cols[:, None].to(tl.int64) * K + ks[None, :]
    tile_valid = col_valid[:, None] & k_valid[None, :]
    if STORE_DW:
        mask = tl.load(col_mask_ptr + cols, mask=col_valid, other=0.0)
        tl.store(dw_ptr + tile_offsets, (acc * mask[:, None]).to(dw_ptr.dtype.element_ty), mask=tile_valid)
    w_tile = tl.load(w_ptr + tile_offsets, mask=tile_valid, other=0.0).to(tl.float32)
    tl.store(mask_grad_partial_ptr + pid_k * N_OUT + cols, tl.sum(w_tile * acc, axis=1), mask=col_valid)
    tl.store(col_sum_ptr + cols, col_sum, mask=col_valid & (pid_k == 0))
