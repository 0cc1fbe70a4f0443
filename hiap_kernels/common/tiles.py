"""Triton building blocks shared by the GEMM-shaped kernels: tile order, the ``x @ W^T`` k-loop, GELU, and the
autotune configs of an output-tiled GEMM.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

from hiap_kernels.common.runtime import interpreter_active, pick_configs


def autotune(configs, key):
    """``triton.autotune`` that keeps its choice on disk where Triton can (``cache_results``): a new process with the
    same shapes reuses the winning config instead of benchmarking every candidate again on its first call."""
    kwargs = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters and not interpreter_active():
        kwargs["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **kwargs)


def gemm_config(block_m, block_n, block_k, warps, stages, group_m=8) -> triton.Config:
    """One autotune config of an output-tiled GEMM: tiles [BLOCK_M, BLOCK_N], reduction step BLOCK_K."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
        num_warps=warps,
        num_stages=stages,
    )


# Output tiles of ``x @ W^T`` kernels [M, N_OUT]: several on a GPU, one under the interpreter (whose cost grows with
# the number of programs and block ops, not with the tile size).
GEMM_CONFIGS = pick_configs(
    [
        gemm_config(128, 128, 64, 8, 3),
        gemm_config(128, 64, 64, 4, 4),
        gemm_config(64, 128, 64, 4, 4),
        gemm_config(64, 64, 64, 4, 4),
        gemm_config(128, 128, 32, 8, 4),
        gemm_config(64, 64, 32, 4, 5),
    ],
    gemm_config(32, 64, 32, 4, 1, group_m=2),
)

# The gated training GEMMs sample their gates in the epilogue, which costs registers: compiled for sm_90, their
# 128 x 128 tiles at 8 warps reach the 255-register ceiling and spill (bench/compile_sm90.py), so they tile at most
# 128 x 64 or 64 x 128.
GATED_GEMM_CONFIGS = [config for config in GEMM_CONFIGS
                      if config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] < 128 * 128] or GEMM_CONFIGS


def output_tile_grid(num_rows: int, num_cols: int):
    """The launch grid of an output-tiled GEMM: one program per ``[BLOCK_M, BLOCK_N]`` tile, on one flat axis (the
    kernel orders the tiles with ``swizzled_tile``)."""
    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(num_cols, meta["BLOCK_N"]),)

    return grid


_SQRT_HALF = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def swizzled_tile(pid, num_rows, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
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
def x_times_weight_t(
    x_ptr,
    w_ptr,
    rows,
    cols,
    num_rows,
    num_cols,
    K,
    x_stride,
    w_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """fp32 tile ``x[rows] @ W[cols]^T`` for ``x [num_rows, K]`` and ``W [num_cols, K]`` with unit last strides."""
    ks = tl.arange(0, BLOCK_K)
    row_valid = rows < num_rows
    col_valid = cols < num_cols
    # [BLOCK_M, BLOCK_K]; int64 because rows * stride passes 2**31 for large token batches.
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * x_stride + ks[None, :]
    # [BLOCK_K, BLOCK_N]: W read transposed
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * w_stride + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = (k0 + ks) < K
        x_tile = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def sigmoid(x):
    """Logistic function from ``exp(-|x|)``, which never overflows; saturates cleanly to 0 or 1."""
    decay = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + decay), decay / (1.0 + decay))


@triton.jit
def gelu(pre, APPROXIMATE_TANH: tl.constexpr):
    """GELU of fp32 ``pre``: erf form, or the tanh form written as ``x * sigmoid(2u)`` (no tanh in core tl).

    A ``pre`` that is not finite (+inf, -inf, NaN) gives NaN, the policy of the references
    (``hiap_kernels.linear_gelu.reference.gelu_reference``): a broken input stays visible downstream.
    """
    if APPROXIMATE_TANH:
        inner = _SQRT_2_OVER_PI * (pre + 0.044715 * pre * pre * pre)
        value = pre * sigmoid(2.0 * inner)
    else:
        value = 0.5 * pre * (1.0 + tl.erf(pre * _SQRT_HALF))
    return value + pre * 0.0  # 0 where pre is finite, NaN where it is not (IEEE: inf * 0 and NaN * 0 are NaN)


@triton.jit
def gelu_and_derivative(pre, APPROXIMATE_TANH: tl.constexpr):
    """GELU(pre) and GELU'(pre) in fp32."""
    if APPROXIMATE_TANH:
        inner = _SQRT_2_OVER_PI * (pre + 0.044715 * pre * pre * pre)
        # 0.5 * (1 + tanh(u)) = sigmoid(2u)
        half_one_plus_tanh = sigmoid(2.0 * inner)
        tanh_inner = 2.0 * half_one_plus_tanh - 1.0
        value = pre * half_one_plus_tanh
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * pre * pre)
        derivative = half_one_plus_tanh + 0.5 * pre * (1.0 - tanh_inner * tanh_inner) * d_inner
    else:
        cdf = 0.5 * (1.0 + tl.erf(pre * _SQRT_HALF))
        value = pre * cdf
        # pdf of the standard normal: exp(-x^2 / 2) / sqrt(2 pi)
        derivative = cdf + pre * tl.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
    return value, derivative


@triton.jit
def inverse_row_norms(row_ptrs, row_valid, width, eps, BLOCK_ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``1 / max(|row|, eps)`` in fp32 for the ``[BLOCK_ROWS, BLOCK_W]`` pointers ``row_ptrs`` (each row's first
    ``BLOCK_W`` elements, unit stride), summed a width chunk at a time; rows not ``row_valid`` read as zeros."""
    ws = tl.arange(0, BLOCK_W)
    squares = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for w0 in range(0, width, BLOCK_W):
        chunk = tl.load(row_ptrs + w0, mask=row_valid[:, None] & ((w0 + ws) < width)[None, :],
                        other=0.0).to(tl.float32)
        squares += tl.sum(chunk * chunk, axis=1)
    return tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(squares), eps))
