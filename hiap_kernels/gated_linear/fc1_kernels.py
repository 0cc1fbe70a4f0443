"""Triton kernels of ``gated_fc1``: forward GEMM with the bias + GELU + gate-mask epilogue, backward pointwise pass.

The backward's two weight-side GEMMs run on the vendor GEMM (see ``fc1.py``), which also holds the launchers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hiap_kernels.common.tiles import GATED_GEMM_CONFIGS, autotune, gelu_and_derivative, swizzled_tile, x_times_weight_t
from hiap_kernels.gates.kernel import gate_value_and_slope

# The fc1 backward pointwise kernel writes partial sums per row block, so its block sizes are fixed, not autotuned.
POINTWISE_BLOCKS_GPU = (64, 64, 4)  # BLOCK_M, BLOCK_N, num_warps
POINTWISE_BLOCKS_INTERPRETER = (32, 64, 4)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def ffn_column_mask(
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


@autotune(GATED_GEMM_CONFIGS, ["M", "N_OUT", "K"])
@triton.jit(do_not_specialize=["offset"])
def fc1_forward_kernel(
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
    seed_ptr,
    offset,
    tau_ptr,
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
    # Read on the device: a new step's seed or temperature is a new value, not a new compilation.
    seed = tl.load(seed_ptr)
    tau = tl.load(tau_ptr).to(tl.float32)
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # [BLOCK_M, BLOCK_N]
    pre = x_times_weight_t(x_ptr, w_ptr, rows, cols, M, N_OUT, K, K, K, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    col_valid = cols < N_OUT
    if HAS_BIAS:
        pre += tl.load(b_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    hidden, _ = gelu_and_derivative(pre, APPROXIMATE_TANH)
    # [BLOCK_N]
    mask = ffn_column_mask(cols, block_logit_ptr, neuron_logits_ptr, N_OUT, seed, offset, tau, GROUP, HARD, SAMPLE)
    offsets = rows[:, None].to(tl.int64) * N_OUT + cols[None, :]
    valid = (rows < M)[:, None] & col_valid[None, :]
    tl.store(out_ptr + offsets, (hidden * mask[None, :]).to(out_ptr.dtype.element_ty), mask=valid)
    if STORE_PRE:
        tl.store(pre_ptr + offsets, pre.to(pre_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["offset"])
def fc1_backward_pointwise_kernel(
    grad_ptr,
    pre_ptr,
    block_logit_ptr,
    neuron_logits_ptr,
    grad_pre_ptr,
    mask_grad_partial_ptr,
    bias_grad_partial_ptr,
    M,
    N_OUT,
    seed_ptr,
    offset,
    tau_ptr,
    GROUP: tl.constexpr,
    HARD: tl.constexpr,
    SAMPLE: tl.constexpr,
    APPROXIMATE_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """d pre = dh * m * GELU'(pre); per row block, partial column sums of dh * GELU(pre) (dL/dm) and of d pre (db)."""
    # Read on the device: a new step's seed or temperature is a new value, not a new compilation.
    seed = tl.load(seed_ptr)
    tau = tl.load(tau_ptr).to(tl.float32)
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N_OUT
    valid = (rows < M)[:, None] & col_valid[None, :]
    offsets = rows[:, None].to(tl.int64) * N_OUT + cols[None, :]
    # [BLOCK_M, BLOCK_N]
    grad = tl.load(grad_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    pre = tl.load(pre_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    hidden, derivative = gelu_and_derivative(pre, APPROXIMATE_TANH)
    # [BLOCK_N]
    mask = ffn_column_mask(cols, block_logit_ptr, neuron_logits_ptr, N_OUT, seed, offset, tau, GROUP, HARD, SAMPLE)
    grad_pre = grad * mask[None, :] * derivative
    tl.store(grad_pre_ptr + offsets, grad_pre.to(grad_pre_ptr.dtype.element_ty), mask=valid)
    partial_offsets = pid_m.to(tl.int64) * N_OUT + cols
    tl.store(mask_grad_partial_ptr + partial_offsets, tl.sum(grad * hidden, axis=0), mask=col_valid)
    tl.store(bias_grad_partial_ptr + partial_offsets, tl.sum(grad_pre, axis=0), mask=col_valid)
