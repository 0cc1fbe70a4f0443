"""Fused training kernels for gated projections: ``gated_qkv`` and ``gated_fc1``, forward and backward.

Both ops compute ``y = x @ W^T + b`` tile by tile and, in the GEMM epilogue, sample the layer's gates with ``tl.rand``
(see ``gates.py``), form the conditioned column mask and multiply it in. The backward passes regenerate the masks from
``(seed, offset)``; nothing mask-shaped is stored between forward and backward.

Contract: :func:`hiap_kernels.gated_linear_reference.gated_qkv_reference` and ``gated_fc1_reference`` (same arguments,
same gates for the same seed, same values and gradients up to float rounding).

Gate gradients without the pre-mask output. For a masked column ``y[:, n] = m[n] * (x @ W[n] + b[n])``::

    G = dY^T @ x                       (the unmasked weight gradient)
    dW[n] = m[n] * G[n]                db[n] = m[n] * colsum(dY)[n]
    dL/dm[n] = <W[n], G[n]> + b[n] * colsum(dY)[n]

so the dW kernel of qkv emits ``dL/dm`` from its epilogue; the chain rule from ``dL/dm`` through the conditioning
products and group sums to the logits is a handful of tiny torch ops on per-gate vectors.

Eager calls go through ``torch.autograd.Function`` subclasses; under ``torch.compile`` the same launchers run as
custom ops (``hiap_kernels::gated_qkv_forward`` ...) with fake shapes and a registered autograd formula.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels._runtime import can_run_triton, check_tensor, interpreter_active, pick_configs
from hiap_kernels.gates import check_gate_arguments, gate_value_and_slope, sample_gates

_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the ops allocate goes through here, so tests can poison them with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Autotune configs: several on a GPU, exactly one under the interpreter.
# ----------------------------------------------------------------------------------------------------------------


def _config(block_m, block_n, block_k, warps, stages, group_m=8):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
        num_warps=warps,
        num_stages=stages,
    )


# Tiles of the output [M, N_OUT]; BLOCK_K is the reduction step.
_FORWARD_CONFIGS = pick_configs(
    [
        _config(128, 128, 64, 8, 3),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        _config(64, 64, 64, 4, 4),
        _config(128, 128, 32, 8, 4),
        _config(64, 64, 32, 4, 5),
    ],
    _config(32, 64, 32, 4, 1, group_m=2),
)

# dx tiles [M, K]; BLOCK_N is the reduction step over the projection's output columns.
_DX_CONFIGS = pick_configs(
    [
        _config(128, 64, 64, 8, 3),
        _config(128, 32, 64, 4, 4),
        _config(64, 64, 64, 4, 4),
        _config(64, 32, 128, 4, 4),
        _config(64, 64, 128, 8, 3),
    ],
    _config(32, 64, 32, 4, 1),
)


def _dw_config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# dW tiles [N_OUT, K]; BLOCK_M is the reduction step over tokens. BLOCK_K is fixed by the launcher instead: the kernel
# writes one row of mask-gradient partial sums per K tile, and a row count that depended on the config would leave rows
# of a previously benchmarked config behind.
_DW_CONFIGS = pick_configs(
    [
        _dw_config(64, 64, 4, 4),
        _dw_config(128, 64, 8, 3),
        _dw_config(64, 128, 8, 3),
        _dw_config(32, 64, 4, 5),
        _dw_config(128, 128, 8, 3),
    ],
    _dw_config(32, 64, 4, 1),
)
_DW_BLOCK_K_GPU = 64
_DW_BLOCK_K_INTERPRETER = 32

# The fc1 backward pointwise kernel writes partial sums per row block, so its block sizes are fixed, not autotuned.
_POINTWISE_BLOCKS_GPU = (64, 64, 4)  # BLOCK_M, BLOCK_N, num_warps
_POINTWISE_BLOCKS_INTERPRETER = (32, 64, 4)


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: fp32 inputs honour torch's matmul precision setting (IEEE unless TF32 was allowed)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# ----------------------------------------------------------------------------------------------------------------
# Shared Triton helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _swizzled_tile(pid, num_rows, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``, walking GROUP_M row tiles per column so weight tiles stay in L2."""
    tiles_m = tl.cdiv(num_rows, BLOCK_M)
    tiles_n = tl.cdiv(num_cols, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _x_times_weight_t(
    x_ptr,
    w_ptr,
    rows,
    cols,
    num_rows,
    num_cols,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """fp32 tile ``x[rows] @ W[cols]^T`` for row-major ``x [num_rows, K]`` and ``W [num_cols, K]``."""
    ks = tl.arange(0, BLOCK_K)
    row_valid = rows < num_rows
    col_valid = cols < num_cols
    # [BLOCK_M, BLOCK_K]
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
    # [BLOCK_K, BLOCK_N]: W read transposed
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = (k0 + ks) < K
        x_tile = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


# ----------------------------------------------------------------------------------------------------------------
# gated qkv: kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _qkv_column_mask(
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


@triton.autotune(configs=_FORWARD_CONFIGS, key=["M", "N_OUT", "K"])
@triton.jit(do_not_specialize=["seed", "offset"])
def _qkv_forward_kernel(
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
    seed,
    offset,
    tau,
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
    pid_m, pid_n = _swizzled_tile(tl.program_id(0), M, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # [BLOCK_M, BLOCK_N]
    acc = _x_times_weight_t(x_ptr, w_ptr, rows, cols, M, N_OUT, K, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    col_valid = cols < N_OUT
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    # [BLOCK_N]
    mask = _qkv_column_mask(
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


@triton.jit(do_not_specialize=["seed", "offset"])
def _qkv_column_mask_kernel(
    head_logits_ptr,
    qk_logits_ptr,
    v_logits_ptr,
    mask_ptr,
    N_OUT,
    seed,
    offset,
    tau,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    HARD: tl.constexpr,
    SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The forward epilogue's column mask, written out once so the backward GEMMs read it instead of re-sampling."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = _qkv_column_mask(
        cols, head_logits_ptr, qk_logits_ptr, v_logits_ptr, seed, offset, tau, NUM_HEADS, HEAD_DIM, GROUP, HARD, SAMPLE
    )
    tl.store(mask_ptr + cols, mask, mask=cols < N_OUT)


@triton.jit
def _load_qkv_grad_tile(
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


@triton.autotune(configs=_DX_CONFIGS, key=["M", "N_OUT", "K"])
@triton.jit
def _qkv_backward_dx_kernel(
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
    pid_m, pid_k = _swizzled_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = ks < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N_OUT, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_valid = cols < N_OUT
        # [BLOCK_M, BLOCK_N]
        grad = _load_qkv_grad_tile(
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


@triton.autotune(configs=_DW_CONFIGS, key=["M", "N_OUT", "K"])
@triton.jit
def _qkv_backward_dw_kernel(
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
        grad = _load_qkv_grad_tile(
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


# ----------------------------------------------------------------------------------------------------------------
# gated qkv: launchers, autograd.Function (eager) and custom ops (torch.compile)
# ----------------------------------------------------------------------------------------------------------------


def _dummy_pointer(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(1, dtype=dtype, device=device)


def _not_requested(device: torch.device) -> torch.Tensor:
    """Placeholder for a gradient nobody asked for: custom ops return tensors, never None."""
    return torch.empty(0, dtype=torch.float32, device=device)


def _qkv_forward(x, weight, bias, head_logits, qk_logits, v_logits, tau, seed, offset, hard, sample) -> torch.Tensor:
    """Launch the fused forward on validated, dtype-unified, contiguous inputs; returns the [3, B, H, N, Dh] buffer."""
    batch, tokens, dim = x.shape
    num_heads, groups_per_head = qk_logits.shape
    n_out = weight.shape[0]
    head_dim = n_out // (3 * num_heads)
    rows = batch * tokens
    out = _empty((3, batch, num_heads, tokens, head_dim), x.dtype, x.device)
    if rows == 0:
        return out
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)  # noqa: E731
    _qkv_forward_kernel[grid](
        x.reshape(rows, dim),
        weight,
        bias if bias is not None else _dummy_pointer(x.device, x.dtype),
        head_logits,
        qk_logits,
        v_logits,
        out,
        rows,
        n_out,
        dim,
        tokens,
        batch * num_heads * tokens * head_dim,
        seed,
        offset,
        tau,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        GROUP=head_dim // groups_per_head,
        HARD=hard,
        SAMPLE=sample,
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    return out


def _qkv_forward_fake(x, weight, bias, head_logits, qk_logits, v_logits, tau, seed, offset, hard, sample):
    batch, tokens, _ = x.shape
    num_heads = head_logits.shape[0]
    return x.new_empty((3, batch, num_heads, tokens, weight.shape[0] // (3 * num_heads)))


def _qkv_column_mask_values(head_logits, qk_logits, v_logits, n_out, tau, seed, offset, hard, sample) -> torch.Tensor:
    """Column mask [3 * H * Dh] (fp32) from the forward epilogue's own helper."""
    num_heads, groups_per_head = qk_logits.shape
    head_dim = n_out // (3 * num_heads)
    mask = _empty((n_out,), torch.float32, head_logits.device)
    block = 128
    _qkv_column_mask_kernel[(triton.cdiv(n_out, block),)](
        head_logits,
        qk_logits,
        v_logits,
        mask,
        n_out,
        seed,
        offset,
        tau,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        GROUP=head_dim // groups_per_head,
        HARD=hard,
        SAMPLE=sample,
        BLOCK=block,
    )
    return mask


def _shared_grad_strides(dq, dk, dv):
    """dq, dk, dv with one set of strides (the kernels take one); copies only when their layouts differ."""
    if not (dq.stride() == dk.stride() == dv.stride()):
        dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    return dq, dk, dv, dq.stride()


def _qkv_backward(
    dq, dk, dv, x, weight, bias, head_logits, qk_logits, v_logits, tau, seed, offset, hard, sample, needs_grad
):
    """Gradients (dx, dW, db, d head_logits, d qk_logits, d v_logits); ``needs_grad`` = [x, weight, bias, logits]."""
    need_dx, need_dw, need_db, need_logits = needs_grad
    need_logits = need_logits and sample
    batch, tokens, dim = x.shape
    num_heads, groups_per_head = qk_logits.shape
    n_out = weight.shape[0]
    head_dim = n_out // (3 * num_heads)
    rows = batch * tokens
    device = x.device

    dq, dk, dv = (g.to(x.dtype) for g in (dq, dk, dv))
    dq, dk, dv, (stride_b, stride_h, stride_n, stride_d) = _shared_grad_strides(dq, dk, dv)
    col_mask = _qkv_column_mask_values(head_logits, qk_logits, v_logits, n_out, tau, seed, offset, hard, sample)
    precision = _input_precision(x.dtype)
    grads = [_not_requested(device) for _ in range(6)]

    if need_dx:
        dx = grads[0] = _empty((batch, tokens, dim), x.dtype, device)
        if rows > 0:
            grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(dim, meta["BLOCK_K"]),)  # noqa: E731
            _qkv_backward_dx_kernel[grid](
                dq, dk, dv, col_mask, weight, dx, rows, n_out, dim, tokens,
                stride_b, stride_h, stride_n, stride_d,
                NUM_HEADS=num_heads, HEAD_DIM=head_dim, INPUT_PRECISION=precision,
            )  # fmt: skip

    if need_dw or need_db or need_logits:
        block_k = _DW_BLOCK_K_INTERPRETER if interpreter_active() else _DW_BLOCK_K_GPU
        k_tiles = triton.cdiv(dim, block_k)
        dw = _empty((n_out, dim), weight.dtype, device) if need_dw else _dummy_pointer(device, weight.dtype)
        mask_grad_partial = _empty((k_tiles, n_out), torch.float32, device)
        col_sum = _empty((n_out,), torch.float32, device)
        grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), k_tiles)  # noqa: E731
        _qkv_backward_dw_kernel[grid](
            dq, dk, dv, x.reshape(rows, dim), weight, col_mask, dw, mask_grad_partial, col_sum,
            rows, n_out, dim, tokens, stride_b, stride_h, stride_n, stride_d,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, STORE_DW=need_dw, INPUT_PRECISION=precision, BLOCK_K=block_k,
        )  # fmt: skip
        if need_dw:
            grads[1] = dw
        if need_db:
            grads[2] = (col_mask * col_sum).to(bias.dtype)
        if need_logits:
            mask_grad = mask_grad_partial.sum(0)
            if bias is not None:
                mask_grad = mask_grad + bias.float() * col_sum
            grads[3:6] = _attention_logit_grads(
                mask_grad, head_logits, qk_logits, v_logits, head_dim, tau, seed, offset, hard
            )
    return tuple(grads)


def _qkv_backward_fake(
    dq, dk, dv, x, weight, bias, head_logits, qk_logits, v_logits, tau, seed, offset, hard, sample, needs_grad
):
    need_dx, need_dw, need_db, need_logits = needs_grad
    need_logits = need_logits and sample
    grads = [_not_requested(x.device) for _ in range(6)]
    if need_dx:
        grads[0] = torch.empty_like(x)
    if need_dw:
        grads[1] = torch.empty_like(weight)
    if need_db:
        grads[2] = torch.empty_like(bias)
    if need_logits:
        grads[3:6] = [torch.empty_like(t) for t in (head_logits, qk_logits, v_logits)]
    return tuple(grads)


def _attention_logit_grads(mask_grad, head_logits, qk_logits, v_logits, head_dim, tau, seed, offset, hard):
    """Chain rule from dL/dm over the columns [3 * H * Dh] to the head, q/k-dim and v-dim logits."""
    num_heads, groups_per_head = qk_logits.shape
    flat = torch.cat([head_logits.reshape(-1), qk_logits.reshape(-1), v_logits.reshape(-1)])
    values, slopes = sample_gates(flat, tau=tau, seed=seed, offset=offset, hard=hard)
    sizes = [num_heads, num_heads * groups_per_head, num_heads * groups_per_head]
    z_head, _, z_v = (t.view(num_heads, -1) for t in values.split(sizes))
    slope_head, slope_qk, slope_v = (t.view(num_heads, -1) for t in slopes.split(sizes))
    per_group = mask_grad.view(3, num_heads, groups_per_head, head_dim // groups_per_head).sum(-1)
    # m_q = z_qk; m_v = z_head * z_v (both expanded over the group's columns)
    d_qk = per_group[0] * slope_qk
    d_v = per_group[2] * z_head * slope_v
    d_head = (per_group[2] * z_v).sum(-1, keepdim=True) * slope_head
    return [
        d_head.view_as(head_logits).to(head_logits.dtype),
        d_qk.to(qk_logits.dtype),
        d_v.to(v_logits.dtype),
    ]


def _custom_op(name: str, schema: str, impl, fake):
    op = torch.library.custom_op(f"hiap_kernels::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def _requested(grads, needs_grad):
    """None for the placeholders of gradients that were not requested."""
    return [g if need else None for g, need in zip(grads, needs_grad)]


def _needs_grad(ctx, num_tensor_inputs, sample):
    """[x, weight, bias, any logit] flags for the backward launchers; no logit gradient in eval mode."""
    needs = ctx.needs_input_grad
    return [needs[0], needs[1], needs[2], any(needs[3:num_tensor_inputs]) and sample]


class GatedQKVFunction(torch.autograd.Function):
    """Autograd wrapper of the fused gated qkv projection (inputs already validated, dtype-unified and contiguous).

    Eager path. Receives dq, dk, dv as three tensors and reads them where they lie, so no stacked gradient is built.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, head_logits, qk_logits, v_logits, tau, seed, offset, hard, sample):
        gate_args = (float(tau), int(seed), int(offset), bool(hard), bool(sample))
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = _qkv_forward(x, weight, bias, head_logits, qk_logits, v_logits, *gate_args)
        ctx.gate_args = gate_args
        ctx.save_for_backward(x, weight, bias, head_logits, qk_logits, v_logits)
        return tuple(out.unbind(0))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        needs_grad = _needs_grad(ctx, 6, ctx.gate_args[-1])
        with torch.autocast(device_type=dq.device.type, enabled=False):
            grads = _qkv_backward(dq, dk, dv, *ctx.saved_tensors, *ctx.gate_args, needs_grad)
        return (*_requested(grads, needs_grad[:3] + [needs_grad[3]] * 3), None, None, None, None, None)


# torch.compile path: opaque custom ops with fake shapes and a registered autograd formula, so a compiled model keeps
# one graph. Seed and offset are SymInt: a seed that changes every step costs one recompile, not one per seed. Eager
# mode skips the dispatcher and uses the autograd.Functions above, which also avoid stacking dq, dk, dv into one tensor.
_GATE_SCHEMA = "float tau, SymInt seed, SymInt offset, bool hard, bool sample"
_qkv_forward_op = _custom_op(
    "gated_qkv_forward",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor head_logits, Tensor qk_logits, Tensor v_logits, "
    f"{_GATE_SCHEMA}) -> Tensor",
    _qkv_forward,
    _qkv_forward_fake,
)
_qkv_backward_op = _custom_op(
    "gated_qkv_backward",
    "(Tensor dq, Tensor dk, Tensor dv, Tensor x, Tensor weight, Tensor? bias, Tensor head_logits, Tensor qk_logits, "
    f"Tensor v_logits, {_GATE_SCHEMA}, bool[] needs_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _qkv_backward,
    _qkv_backward_fake,
)


def _qkv_op_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.gate_args = tuple(inputs[6:])


def _qkv_op_backward(ctx, grad_packed):
    needs_grad = _needs_grad(ctx, 6, ctx.gate_args[-1])
    dq, dk, dv = grad_packed.unbind(0)
    grads = _qkv_backward_op(dq, dk, dv, *ctx.saved_tensors, *ctx.gate_args, needs_grad)
    return (*_requested(grads, needs_grad[:3] + [needs_grad[3]] * 3), None, None, None, None, None)


_qkv_forward_op.register_autograd(_qkv_op_backward, setup_context=_qkv_op_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# gated fc1: kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _ffn_column_mask(
    cols,
    block_logit_ptr,
    neuron_logits_ptr,
    num_cols,
    seed,
    offset,
    tau,
    GROUP: tl.constexpr,
    HARD: tl.constexpr,
    SAMPLE: tl.constexpr,
):
    """Mask of FFN hidden columns ``cols``: m = z_block * z_neuron[col // G] (fp32)."""
    neuron = cols // GROUP
    neuron_logit = tl.load(neuron_logits_ptr + neuron, mask=cols < num_cols, other=0.0).to(tl.float32)
    # Gate order of a layer: [1] block gate, then [F // G] neuron gates.
    z_neuron, _ = gate_value_and_slope(neuron_logit, seed, offset + 1 + neuron, tau, HARD, SAMPLE)
    # The block gate is drawn per lane (same counter everywhere) to keep every value a block of one shape.
    block_logit = tl.load(block_logit_ptr + neuron * 0).to(tl.float32)
    z_block, _ = gate_value_and_slope(block_logit, seed, offset + neuron * 0, tau, HARD, SAMPLE)
    return z_block * z_neuron


@triton.jit
def _gelu_and_derivative(pre, APPROXIMATE_TANH: tl.constexpr):
    """GELU(pre) and GELU'(pre) in fp32."""
    if APPROXIMATE_TANH:
        # sqrt(2 / pi) * (x + 0.044715 x^3); tanh via the logistic function (no tanh in core tl)
        inner = 0.7978845608028654 * (pre + 0.044715 * pre * pre * pre)
        tanh_inner = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        value = 0.5 * pre * (1.0 + tanh_inner)
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * pre * pre)
        derivative = 0.5 * (1.0 + tanh_inner) + 0.5 * pre * (1.0 - tanh_inner * tanh_inner) * d_inner
    else:
        cdf = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
        value = pre * cdf
        # pdf of the standard normal: exp(-x^2 / 2) / sqrt(2 pi)
        derivative = cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327
    return value, derivative


@triton.autotune(configs=_FORWARD_CONFIGS, key=["M", "N_OUT", "K"])
@triton.jit(do_not_specialize=["seed", "offset"])
def _fc1_forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    block_logit_ptr,
    neuron_logits_ptr,
    out_ptr,
    pre_ptr,
    M,
    N_OUT,
    K,
    seed,
    offset,
    tau,
    GROUP: tl.constexpr,
    HARD: tl.constexpr,
    SAMPLE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPROXIMATE_TANH: tl.constexpr,
    STORE_PRE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _swizzled_tile(tl.program_id(0), M, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # [BLOCK_M, BLOCK_N]
    pre = _x_times_weight_t(x_ptr, w_ptr, rows, cols, M, N_OUT, K, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    col_valid = cols < N_OUT
    if HAS_BIAS:
        pre += tl.load(b_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    hidden, _ = _gelu_and_derivative(pre, APPROXIMATE_TANH)
    # [BLOCK_N]
    mask = _ffn_column_mask(cols, block_logit_ptr, neuron_logits_ptr, N_OUT, seed, offset, tau, GROUP, HARD, SAMPLE)
    offsets = rows[:, None].to(tl.int64) * N_OUT + cols[None, :]
    valid = (rows < M)[:, None] & col_valid[None, :]
    tl.store(out_ptr + offsets, (hidden * mask[None, :]).to(out_ptr.dtype.element_ty), mask=valid)
    if STORE_PRE:
        tl.store(pre_ptr + offsets, pre.to(pre_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["seed", "offset"])
def _fc1_backward_pointwise_kernel(
    grad_ptr,
    pre_ptr,
    block_logit_ptr,
    neuron_logits_ptr,
    grad_pre_ptr,
    mask_grad_partial_ptr,
    bias_grad_partial_ptr,
    M,
    N_OUT,
    seed,
    offset,
    tau,
    GROUP: tl.constexpr,
    HARD: tl.constexpr,
    SAMPLE: tl.constexpr,
    APPROXIMATE_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """d pre = dh * m * GELU'(pre); per row block, partial column sums of dh * GELU(pre) (dL/dm) and of d pre (db)."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N_OUT
    valid = (rows < M)[:, None] & col_valid[None, :]
    offsets = rows[:, None].to(tl.int64) * N_OUT + cols[None, :]
    # [BLOCK_M, BLOCK_N]
    grad = tl.load(grad_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    pre = tl.load(pre_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    hidden, derivative = _gelu_and_derivative(pre, APPROXIMATE_TANH)
    # [BLOCK_N]
    mask = _ffn_column_mask(cols, block_logit_ptr, neuron_logits_ptr, N_OUT, seed, offset, tau, GROUP, HARD, SAMPLE)
    grad_pre = grad * mask[None, :] * derivative
    tl.store(grad_pre_ptr + offsets, grad_pre.to(grad_pre_ptr.dtype.element_ty), mask=valid)
    partial_offsets = pid_m.to(tl.int64) * N_OUT + cols
    tl.store(mask_grad_partial_ptr + partial_offsets, tl.sum(grad * hidden, axis=0), mask=col_valid)
    tl.store(bias_grad_partial_ptr + partial_offsets, tl.sum(grad_pre, axis=0), mask=col_valid)


# ----------------------------------------------------------------------------------------------------------------
# gated fc1: launchers, autograd.Function (eager) and custom ops (torch.compile)
# ----------------------------------------------------------------------------------------------------------------


def _fc1_forward(x, weight, bias, block_logit, neuron_logits, tau, seed, offset, hard, sample, approximate, store_pre):
    """Launch the fused forward on ``x [M, D]``; returns (hidden [M, F], pre-activation [M, F] or an empty tensor)."""
    rows, dim = x.shape
    hidden_dim = weight.shape[0]
    out = _empty((rows, hidden_dim), x.dtype, x.device)
    pre = _empty((rows, hidden_dim), x.dtype, x.device) if store_pre else x.new_empty(0)
    if rows == 0:
        return out, pre
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(hidden_dim, meta["BLOCK_N"]),)  # noqa: E731
    _fc1_forward_kernel[grid](
        x,
        weight,
        bias if bias is not None else _dummy_pointer(x.device, x.dtype),
        block_logit,
        neuron_logits,
        out,
        pre if store_pre else _dummy_pointer(x.device, x.dtype),
        rows,
        hidden_dim,
        dim,
        seed,
        offset,
        tau,
        GROUP=hidden_dim // neuron_logits.shape[0],
        HARD=hard,
        SAMPLE=sample,
        HAS_BIAS=bias is not None,
        APPROXIMATE_TANH=approximate == "tanh",
        STORE_PRE=store_pre,
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    return out, pre


def _fc1_forward_fake(
    x, weight, bias, block_logit, neuron_logits, tau, seed, offset, hard, sample, approximate, store_pre
):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if store_pre else (0,))


def _fc1_backward(
    grad_hidden, x, weight, bias, block_logit, neuron_logits, pre,
    tau, seed, offset, hard, sample, approximate, needs_grad,
):  # fmt: skip
    """Gradients (dx [M, D], dW, db, d block_logit, d neuron_logits); ``needs_grad`` = [x, weight, bias, logits]."""
    need_dx, need_dw, need_db, need_logits = needs_grad
    need_logits = need_logits and sample
    rows, dim = x.shape
    hidden_dim = weight.shape[0]
    group = hidden_dim // neuron_logits.shape[0]
    grad_hidden = grad_hidden.reshape(rows, hidden_dim).to(x.dtype).contiguous()

    block_m, block_n, warps = _POINTWISE_BLOCKS_INTERPRETER if interpreter_active() else _POINTWISE_BLOCKS_GPU
    row_blocks = triton.cdiv(rows, block_m)
    grad_pre = _empty((rows, hidden_dim), x.dtype, x.device)
    mask_grad_partial = _empty((row_blocks, hidden_dim), torch.float32, x.device)
    bias_grad_partial = _empty((row_blocks, hidden_dim), torch.float32, x.device)
    if rows > 0:
        _fc1_backward_pointwise_kernel[(row_blocks, triton.cdiv(hidden_dim, block_n))](
            grad_hidden, pre, block_logit, neuron_logits, grad_pre, mask_grad_partial, bias_grad_partial,
            rows, hidden_dim, seed, offset, tau,
            GROUP=group, HARD=hard, SAMPLE=sample, APPROXIMATE_TANH=approximate == "tanh",
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip

    grads = [_not_requested(x.device) for _ in range(5)]
    # Once d pre exists the two weight-side GEMMs have nothing left to fuse, so the vendor GEMM does them.
    if need_dx:
        grads[0] = grad_pre @ weight
    if need_dw:
        grads[1] = grad_pre.t() @ x
    if need_db:
        grads[2] = bias_grad_partial.sum(0).to(bias.dtype)
    if need_logits:
        grads[3:5] = _ffn_logit_grads(
            mask_grad_partial.sum(0), block_logit, neuron_logits, group, tau, seed, offset, hard
        )
    return tuple(grads)


def _fc1_backward_fake(
    grad_hidden, x, weight, bias, block_logit, neuron_logits, pre,
    tau, seed, offset, hard, sample, approximate, needs_grad,
):  # fmt: skip
    need_dx, need_dw, need_db, need_logits = needs_grad
    grads = [_not_requested(x.device) for _ in range(5)]
    if need_dx:
        grads[0] = torch.empty_like(x)
    if need_dw:
        grads[1] = torch.empty_like(weight)
    if need_db:
        grads[2] = torch.empty_like(bias)
    if need_logits and sample:
        grads[3:5] = [torch.empty_like(block_logit), torch.empty_like(neuron_logits)]
    return tuple(grads)


def _ffn_logit_grads(mask_grad, block_logit, neuron_logits, group, tau, seed, offset, hard):
    """Chain rule from dL/dm over the hidden columns [F] to the block logit and the neuron logits."""
    flat = torch.cat([block_logit.reshape(-1), neuron_logits.reshape(-1)])
    values, slopes = sample_gates(flat, tau=tau, seed=seed, offset=offset, hard=hard)
    per_group = mask_grad.view(-1, group).sum(-1)
    # m = z_block * z_neuron (expanded over the group's columns)
    d_neuron = per_group * values[:1] * slopes[1:]
    d_block = (per_group * values[1:]).sum().reshape(1) * slopes[:1]
    return [d_block.view_as(block_logit).to(block_logit.dtype), d_neuron.view_as(neuron_logits).to(neuron_logits.dtype)]


class GatedFC1Function(torch.autograd.Function):
    """Autograd wrapper of the fused gated fc1 + GELU (inputs already validated, dtype-unified and contiguous).

    Backward memory: the pre-activation ``x @ W^T + b`` is stored in the activation dtype (one [M, F] tensor, half of
    what the unfused reference keeps: GELU's input and output). Recomputing it instead would cost a third GEMM of the
    fc1 size in every backward; the FFN hidden activations are kept anyway by fc2, so the extra memory is the cheaper
    side of the trade.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, block_logit, neuron_logits, tau, seed, offset, hard, sample, approximate):
        gate_args = (float(tau), int(seed), int(offset), bool(hard), bool(sample))
        store_pre = any(ctx.needs_input_grad[:5])
        x2d = x.reshape(-1, x.shape[-1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            hidden, pre = _fc1_forward(
                x2d, weight, bias, block_logit, neuron_logits, *gate_args, approximate, store_pre
            )
        ctx.gate_args = gate_args
        ctx.approximate = approximate
        ctx.save_for_backward(x2d, weight, bias, block_logit, neuron_logits, pre)
        return hidden.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_hidden):
        needs_grad = _needs_grad(ctx, 5, ctx.gate_args[-1])
        with torch.autocast(device_type=grad_hidden.device.type, enabled=False):
            grads = _fc1_backward(grad_hidden, *ctx.saved_tensors, *ctx.gate_args, ctx.approximate, needs_grad)
        dx, dw, db, d_block, d_neuron = _requested(grads, needs_grad[:3] + [needs_grad[3]] * 2)
        if dx is not None:
            dx = dx.view(*grad_hidden.shape[:-1], dx.shape[-1])
        return (dx, dw, db, d_block, d_neuron, None, None, None, None, None, None)


_fc1_forward_op = _custom_op(
    "gated_fc1_forward",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor block_logit, Tensor neuron_logits, "
    f"{_GATE_SCHEMA}, str approximate, bool store_pre) -> (Tensor, Tensor)",
    _fc1_forward,
    _fc1_forward_fake,
)
_fc1_backward_op = _custom_op(
    "gated_fc1_backward",
    "(Tensor grad_hidden, Tensor x, Tensor weight, Tensor? bias, Tensor block_logit, Tensor neuron_logits, "
    f"Tensor pre, {_GATE_SCHEMA}, str approximate, bool[] needs_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fc1_backward,
    _fc1_backward_fake,
)


def _fc1_op_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], output[1])
    ctx.gate_args = tuple(inputs[5:10])
    ctx.approximate = inputs[10]


def _fc1_op_backward(ctx, grad_hidden, _grad_pre):
    needs_grad = _needs_grad(ctx, 5, ctx.gate_args[-1])
    grads = _fc1_backward_op(grad_hidden, *ctx.saved_tensors, *ctx.gate_args, ctx.approximate, needs_grad)
    return (*_requested(grads, needs_grad[:3] + [needs_grad[3]] * 2), None, None, None, None, None, None, None)


_fc1_forward_op.register_autograd(_fc1_op_backward, setup_context=_fc1_op_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def _unify_dtypes(x, weight, bias):
    """Autocast's dtype when autocast is on for x's device (like F.linear), else all three must already agree."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        bias_dtype = None if bias is None else bias.dtype
        raise TypeError(
            f"x, weight and bias must share one dtype outside autocast, got {x.dtype}, {weight.dtype}, {bias_dtype}"
        )
    return x, weight, bias


def _interpreter_safe(x, weight, bias):
    """bf16 ``tl.dot`` gives garbage in the Triton interpreter, so there bf16 inputs run on fp32 copies."""
    if x.dtype == torch.bfloat16 and interpreter_active():
        return x.float(), weight.float(), None if bias is None else bias.float()
    return x, weight, bias


def _check_common(op, x, weight, bias, logits: dict, tau, seed, offset, num_gates):
    check_tensor("x", x, dtypes=_ACTIVATION_DTYPES)
    device = x.device
    check_tensor("weight", weight, ndim=2, dtypes=_ACTIVATION_DTYPES, device=device)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=_ACTIVATION_DTYPES, device=device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},) from weight")
    for name, tensor in logits.items():
        check_tensor(name, tensor, dtypes=_LOGIT_DTYPES, device=device)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight {tuple(weight.shape)} expects {weight.shape[1]}")
    check_gate_arguments(tau, seed, offset, num_gates)
    if not can_run_triton(x):
        raise RuntimeError(
            f"{op} runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before importing triton; "
            f"got a tensor on {device} (use the reference in hiap_kernels.gated_linear_reference instead)"
        )


def gated_qkv(
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
    """Fused gated qkv projection with in-kernel gate sampling (Triton twin of ``gated_qkv_reference``).

    Args:
        x: ``[B, N, D]`` activations (fp32, fp16 or bf16; any strides).
        weight: ``[3 * H * Dh, D]`` in timm's fused layout (q rows, k rows, v rows; head-major inside each).
        bias: ``[3 * H * Dh]`` or None.
        head_logits: ``[H]``; qk_logits, v_logits: ``[H, Dh // G]`` (fp32 parameters, also with half activations).
        tau: temperature > 0. seed: Philox stream in [0, 2**31 - 1]. offset: counter of the layer's first gate
            (the layer uses ``H + 2 * H * Dh // G`` counters). hard: straight-through 0/1 gates, else soft values.
        sample: False uses the eval decision ``1[a > 0]`` and gives the logits no gradient.

    Returns:
        q, k, v: ``[B, H, N, Dh]`` each, contiguous views of one ``[3, B, H, N, Dh]`` buffer (the layout
        ``F.scaled_dot_product_attention`` reads); ``q`` times ``m_q = dqk``, ``v`` times ``m_v = g * dv``, ``k``
        unmasked. The views must not be modified in place.

    Dtypes: under autocast for x's device, x, weight and bias run in the autocast dtype (like ``F.linear``); otherwise
    they must share one dtype. Outputs have that dtype, gradients the dtype of their input. Under the Triton
    interpreter bf16 runs on fp32 copies (its bf16 ``tl.dot`` is broken), so there q, k, v are three separate tensors.
    Under ``torch.compile`` the op is one custom op (no graph break); seed and offset are symbolic, tau is a constant
    of the compiled graph (a new tau value recompiles).
    """
    check_tensor("x", x, ndim=3, dtypes=_ACTIVATION_DTYPES)
    check_tensor("head_logits", head_logits, ndim=1, dtypes=_LOGIT_DTYPES)
    check_tensor("qk_logits", qk_logits, ndim=2, dtypes=_LOGIT_DTYPES)
    check_tensor("v_logits", v_logits, ndim=2, dtypes=_LOGIT_DTYPES)
    num_heads = head_logits.shape[0]
    if num_heads == 0 or qk_logits.shape[0] != num_heads or qk_logits.shape[1] == 0:
        raise ValueError(f"qk_logits has shape {tuple(qk_logits.shape)}, expected ({num_heads}, Dh // G) with H >= 1")
    if v_logits.shape != qk_logits.shape:
        raise ValueError(f"v_logits has shape {tuple(v_logits.shape)}, expected {tuple(qk_logits.shape)} (qk_logits)")
    check_tensor("weight", weight, ndim=2, dtypes=_ACTIVATION_DTYPES)
    if weight.shape[0] == 0 or weight.shape[0] % (3 * num_heads):
        raise ValueError(f"weight has {weight.shape[0]} rows, expected 3 * H * Dh with H = {num_heads}")
    head_dim = weight.shape[0] // (3 * num_heads)
    groups_per_head = qk_logits.shape[1]
    if head_dim % groups_per_head:
        raise ValueError(f"head dim {head_dim} is not divisible by the {groups_per_head} q/k-dim gate groups per head")
    num_gates = num_heads + 2 * qk_logits.numel()
    logits = {"head_logits": head_logits, "qk_logits": qk_logits, "v_logits": v_logits}
    _check_common("gated_qkv", x, weight, bias, logits, tau, seed, offset, num_gates)
    x, weight, bias = _unify_dtypes(x, weight, bias)
    out_dtype = x.dtype
    x, weight, bias = _interpreter_safe(x, weight, bias)
    tensors = [t if t is None else t.contiguous() for t in (x, weight, bias, head_logits, qk_logits, v_logits)]
    if torch.compiler.is_compiling():
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = _qkv_forward_op(*tensors, tau, seed, offset, hard, sample).unbind(0)
    else:
        q, k, v = GatedQKVFunction.apply(*tensors, tau, seed, offset, hard, sample)
    if q.dtype != out_dtype:
        q, k, v = q.to(out_dtype), k.to(out_dtype), v.to(out_dtype)
    return q, k, v


def gated_fc1(
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
    """Fused gated FFN hidden layer ``GELU(x @ W^T + b) * (z_block * z_neuron)``, twin of ``gated_fc1_reference``.

    Args:
        x: ``[..., D]`` activations (fp32, fp16 or bf16; any strides).
        weight: ``[F, D]``; bias: ``[F]`` or None.
        block_logit: ``[1]``; neuron_logits: ``[F // G]`` (fp32 parameters, also with half activations).
        tau, seed, offset, hard, sample: as in :func:`gated_qkv` (the layer uses ``1 + F // G`` counters).
        approximate: GELU flavour, ``"none"`` (erf) or ``"tanh"``.

    Returns:
        ``[..., F]`` in the activation dtype; dtypes, autocast and ``torch.compile`` as in :func:`gated_qkv`.
    """
    check_tensor("x", x, dtypes=_ACTIVATION_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., D]")
    check_tensor("block_logit", block_logit, dtypes=_LOGIT_DTYPES)
    check_tensor("neuron_logits", neuron_logits, ndim=1, dtypes=_LOGIT_DTYPES)
    if block_logit.numel() != 1:
        raise ValueError(f"block_logit must hold one logit, got shape {tuple(block_logit.shape)}")
    check_tensor("weight", weight, ndim=2, dtypes=_ACTIVATION_DTYPES)
    hidden_dim = weight.shape[0]
    if neuron_logits.shape[0] == 0 or hidden_dim % neuron_logits.shape[0]:
        raise ValueError(f"FFN width {hidden_dim} is not divisible by the {neuron_logits.shape[0]} neuron gate groups")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    logits = {"block_logit": block_logit, "neuron_logits": neuron_logits}
    _check_common("gated_fc1", x, weight, bias, logits, tau, seed, offset, 1 + neuron_logits.shape[0])
    x, weight, bias = _unify_dtypes(x, weight, bias)
    out_dtype = x.dtype
    x, weight, bias = _interpreter_safe(x, weight, bias)
    tensors = [t if t is None else t.contiguous() for t in (x, weight, bias, block_logit, neuron_logits)]
    if torch.compiler.is_compiling():
        store_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        tensors[0] = tensors[0].reshape(-1, x.shape[-1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            hidden, _ = _fc1_forward_op(*tensors, tau, seed, offset, hard, sample, approximate, store_pre)
        hidden = hidden.view(*x.shape[:-1], weight.shape[0])
    else:
        hidden = GatedFC1Function.apply(*tensors, tau, seed, offset, hard, sample, approximate)
    return hidden.to(out_dtype)


__all__ = ["GatedFC1Function", "GatedQKVFunction", "gated_fc1", "gated_qkv"]
