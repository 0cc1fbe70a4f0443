"""Fused output projection + bias + LayerScale + residual add for the blocks of extracted (pruned) ViTs.

A block ends each half with ``x + gamma * (h @ W^T + b)`` (attention's proj, the FFN's fc2). Here the bias, the
LayerScale and the residual add run in the GEMM epilogue on the fp32 accumulator: one kernel and one pass over the
residual stream instead of a GEMM, a multiply and an add. The PyTorch twin is ``reference.linear_residual_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor, dot_precision, unit_last_stride
from hiap_kernels.common.tiles import GEMM_CONFIGS, autotune, output_tile_grid, swizzled_tile, x_times_weight_t

__all__ = ["fused_linear_residual"]


@autotune(GEMM_CONFIGS, ["num_rows", "num_features", "in_features"])
@triton.jit
def _linear_residual_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    residual_ptr,
    out_ptr,
    num_rows,
    num_features,
    in_features,
    x_stride_m,
    weight_stride_f,
    residual_stride_m,
    out_stride_m,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzled_tile(tl.program_id(0), num_rows, num_features, BLOCK_M, BLOCK_N, GROUP_M)
    # [BLOCK_M], [BLOCK_N]
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # [BLOCK_M, BLOCK_N]
    acc = x_times_weight_t(
        x_ptr, weight_ptr, rows, cols, num_rows, num_features, in_features, x_stride_m, weight_stride_f,
        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
    )  # fmt: skip
    col_valid = cols < num_features
    valid = (rows < num_rows)[:, None] & col_valid[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    residual = tl.load(residual_ptr + rows.to(tl.int64)[:, None] * residual_stride_m + cols[None, :], mask=valid,
                       other=0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride_m + cols[None, :],
             (residual.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=valid)


def fused_linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                          layer_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + layer_scale * (x @ weight^T + bias)`` in one kernel, fp32 accumulation, everything in the epilogue.

    Args:
        x: ``[..., K]`` fp32/fp16/bf16, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        weight: ``[D, K]``, x's dtype and device.
        bias, layer_scale: ``[D]`` in x's dtype, or None.
        residual: ``[..., D]`` with x's leading shape, dtype and device.

    Returns:
        ``[..., D]`` in x's dtype (a new tensor; the residual is not written).
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
    for name, vector in (("bias", bias), ("layer_scale", layer_scale)):
        if vector is not None:
            check_tensor(name, vector, ndim=1, dtypes=(x.dtype,), device=x.device)
            if vector.shape[0] != weight.shape[0]:
                raise ValueError(f"{name} has {vector.shape[0]} entries but weight has D = {weight.shape[0]} rows")
    num_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {in_features} (weight shape [D, K])")
    if tuple(residual.shape) != (*x.shape[:-1], num_features):
        raise ValueError(f"residual must have shape {(*x.shape[:-1], num_features)}, got {tuple(residual.shape)}")
    runtime.require_triton_device("fused_linear_residual", x,
                                  "hiap_kernels.linear_residual.reference.linear_residual_reference")
    leading = x.shape[:-1]
    out = _linear_residual(x.reshape(-1, in_features), weight, bias, residual.reshape(-1, num_features), layer_scale)
    return out.reshape(*leading, num_features)


# A torch.library custom op, so torch.compile keeps the kernel in its graph (no break) and CUDA graphs capture it.
@torch.library.custom_op(
    "hiap_kernels::linear_residual", mutates_args=(),
    schema="(Tensor rows, Tensor weight, Tensor? bias, Tensor residual, Tensor? layer_scale) -> Tensor",
)
def _linear_residual(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                     layer_scale: torch.Tensor | None) -> torch.Tensor:
    """``[M, K], [D, K], [M, D] -> [M, D]`` on checked inputs; the output is contiguous."""
    rows, weight, residual = unit_last_stride(rows), unit_last_stride(weight), unit_last_stride(residual)
    num_rows, (num_features, in_features) = rows.shape[0], weight.shape
    out = runtime.empty((num_rows, num_features), rows.dtype, rows.device)
    if num_rows == 0:
        return out

    _linear_residual_kernel[output_tile_grid(num_rows, num_features)](
        rows, weight,
        bias.contiguous() if bias is not None else weight,  # never read without HAS_BIAS
        layer_scale.contiguous() if layer_scale is not None else weight,  # never read without HAS_SCALE
        residual, out, num_rows, num_features, in_features,
        rows.stride(0), weight.stride(0), residual.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, HAS_SCALE=layer_scale is not None, DOT_PRECISION=dot_precision(rows.dtype),
    )  # fmt: skip
    return out


@_linear_residual.register_fake
def _linear_residual_fake(rows, weight, bias, residual, layer_scale):
    return rows.new_empty((rows.shape[0], weight.shape[0]))
