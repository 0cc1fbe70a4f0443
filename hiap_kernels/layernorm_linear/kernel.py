"""``act(LN(x) @ W^T + b)`` in one Triton GEMM: LayerNorm in the prologue, bias and GELU in the epilogue.

Each program owns a ``[BLOCK_M, BLOCK_N]`` output tile. It first streams its rows of x twice to get their mean and
variance (fp32, over the whole K), then runs the usual k-loop, normalising every x tile in registers
(``(x - mean) * rstd * gamma + beta``, rounded to x's dtype as ``F.layer_norm`` would output it) before the dot. The
normalised activations never reach memory; the price is that every column block re-reads its rows' x for the
statistics, which is small next to the GEMM for the widths of a ViT block (K = 384..1024).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor, dot_precision, unit_last_stride
from hiap_kernels.common.tiles import GEMM_CONFIGS, autotune, gelu, output_tile_grid, swizzled_tile
from hiap_kernels.layernorm_linear.reference import ACTIVATIONS

__all__ = ["fused_layernorm_linear"]


@autotune(GEMM_CONFIGS, ["num_rows", "num_features", "in_features"])
@triton.jit
def _layernorm_linear_kernel(
    x_ptr,
    norm_weight_ptr,
    norm_bias_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    num_rows,
    num_features,
    in_features,
    x_stride_m,
    weight_stride_f,
    out_stride_m,
    eps,
    HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0 none, 1 GELU (erf), 2 GELU (tanh)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzled_tile(tl.program_id(0), num_rows, num_features, BLOCK_M, BLOCK_N, GROUP_M)
    # [BLOCK_M], [BLOCK_N], [BLOCK_K]
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_valid = rows < num_rows
    col_valid = cols < num_features
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_stride_m

    # Row statistics over the whole K in fp32, two passes (mean, then squared deviations), as exact as LayerNorm's own
    # and free of the cancellation of E[x^2] - E[x]^2 on a residual stream with a large mean: [BLOCK_M]
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k_valid = (k0 + ks) < in_features
        tile = tl.load(x_rows + (k0 + ks)[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        total += tl.sum(tile.to(tl.float32), axis=1)
    mean = total / in_features
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k_valid = (k0 + ks) < in_features
        tile = tl.load(x_rows + (k0 + ks)[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        deviation = tl.where(k_valid[None, :], tile.to(tl.float32) - mean[:, None], 0.0)
        squares += tl.sum(deviation * deviation, axis=1)
    rstd = 1.0 / tl.sqrt(squares / in_features + eps)

    # [BLOCK_M, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_cols = weight_ptr + cols.to(tl.int64)[None, :] * weight_stride_f
    for k0 in range(0, in_features, BLOCK_K):
        k_valid = (k0 + ks) < in_features
        # [BLOCK_M, BLOCK_K], normalised in registers and rounded to x's dtype, as LayerNorm's output would be
        tile = tl.load(x_rows + (k0 + ks)[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        normed = (tile.to(tl.float32) - mean[:, None]) * rstd[:, None]
        if HAS_NORM_WEIGHT:
            normed *= tl.load(norm_weight_ptr + k0 + ks, mask=k_valid, other=0.0).to(tl.float32)[None, :]
        if HAS_NORM_BIAS:
            normed += tl.load(norm_bias_ptr + k0 + ks, mask=k_valid, other=0.0).to(tl.float32)[None, :]
        normed = tl.where(k_valid[None, :], normed, 0.0).to(x_ptr.dtype.element_ty)
        # [BLOCK_K, BLOCK_N]: W read transposed
        w_tile = tl.load(w_cols + (k0 + ks)[:, None], mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(normed, w_tile, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        acc = gelu(acc, False)
    elif ACTIVATION == 2:
        acc = gelu(acc, True)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride_m + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & col_valid[None, :])


def fused_layernorm_linear(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                           eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                           activation: str = "none") -> torch.Tensor:
    """``act(LayerNorm(x) @ weight^T + bias)`` in one kernel (``reference.layernorm_linear_reference``).

    Args:
        x: ``[..., K]`` fp32/fp16/bf16, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        norm_weight, norm_bias: LayerNorm's affine ``[K]`` in x's dtype, or None.
        eps: LayerNorm's epsilon (> 0).
        weight: ``[F, K]``, x's dtype and device; bias: ``[F]`` or None.
        activation: ``"none"``, ``"gelu"`` (erf) or ``"gelu_tanh"``.

    Returns:
        ``[..., F]`` in x's dtype; with a GELU, NaN where the pre-activation is not finite (as the reference).
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    num_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {in_features} (weight shape [F, K])")
    for name, vector, size in (("norm_weight", norm_weight, in_features), ("norm_bias", norm_bias, in_features),
                               ("bias", bias, num_features)):
        if vector is not None:
            check_tensor(name, vector, ndim=1, dtypes=(x.dtype,), device=x.device)
            if vector.shape[0] != size:
                raise ValueError(f"{name} has {vector.shape[0]} entries, expected {size}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not (float(eps) > 0.0):
        raise ValueError(f"eps must be > 0, got {eps}")
    runtime.require_triton_device("fused_layernorm_linear", x,
                                  "hiap_kernels.layernorm_linear.reference.layernorm_linear_reference")
    leading = x.shape[:-1]
    out = _layernorm_linear(x.reshape(-1, in_features), norm_weight, norm_bias, float(eps), weight, bias, activation)
    return out.reshape(*leading, num_features)


# A torch.library custom op, so torch.compile keeps the kernel in its graph (no break) and CUDA graphs capture it.
@torch.library.custom_op(
    "hiap_kernels::layernorm_linear", mutates_args=(),
    schema="(Tensor rows, Tensor? norm_weight, Tensor? norm_bias, float eps, Tensor weight, Tensor? bias, "
           "str activation) -> Tensor",
)
def _layernorm_linear(rows: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                      eps: float, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``[M, K] -> [M, F]`` on checked inputs; the output is contiguous."""
    rows, weight = unit_last_stride(rows), unit_last_stride(weight)
    num_rows, (num_features, in_features) = rows.shape[0], weight.shape
    out = runtime.empty((num_rows, num_features), rows.dtype, rows.device)
    if num_rows == 0:
        return out

    unused = weight  # a pointer never read when its flag is off
    _layernorm_linear_kernel[output_tile_grid(num_rows, num_features)](
        rows,
        norm_weight.contiguous() if norm_weight is not None else unused,
        norm_bias.contiguous() if norm_bias is not None else unused,
        weight, bias.contiguous() if bias is not None else unused, out,
        num_rows, num_features, in_features, rows.stride(0), weight.stride(0), out.stride(0), eps,
        HAS_NORM_WEIGHT=norm_weight is not None, HAS_NORM_BIAS=norm_bias is not None, HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATIONS.index(activation), DOT_PRECISION=dot_precision(rows.dtype),
    )  # fmt: skip
    return out


@_layernorm_linear.register_fake
def _layernorm_linear_fake(rows, norm_weight, norm_bias, eps, weight, bias, activation):
    return rows.new_empty((rows.shape[0], weight.shape[0]))
