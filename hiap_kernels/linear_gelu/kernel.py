"""Fused fc1 + bias + GELU for the FFN blocks of extracted (pruned) ViTs.

After extraction an FFN block is two dense GEMMs at the kept width F. The first one's bias and GELU run in the GEMM
epilogue on the fp32 accumulator, so the pre-activation ``[M, F]`` never goes to memory. fc2 stays a plain Linear.
The plain-PyTorch twin is ``reference.linear_gelu_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor, dot_precision, unit_last_stride
from hiap_kernels.common.tiles import GEMM_CONFIGS, autotune, gelu, output_tile_grid, swizzled_tile, x_times_weight_t
from hiap_kernels.linear_gelu.reference import GELU_APPROXIMATIONS

__all__ = ["fused_linear_gelu"]


@autotune(GEMM_CONFIGS, ["num_rows", "num_features", "in_features"])
@triton.jit
def _linear_gelu_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    num_rows,
    num_features,
    in_features,
    x_stride_m,
    weight_stride_f,
    out_stride_m,
    HAS_BIAS: tl.constexpr,
    APPROXIMATE_TANH: tl.constexpr,
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
    if HAS_BIAS:
        # [BLOCK_N]
        acc += tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    activated = gelu(acc, APPROXIMATE_TANH)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * out_stride_m + cols[None, :],
        activated.to(out_ptr.dtype.element_ty),
        mask=(rows < num_rows)[:, None] & col_valid[None, :],
    )


def fused_linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none"
) -> torch.Tensor:
    """``GELU(x @ weight^T + bias)`` in one kernel: fp32 accumulation, bias and GELU in the epilogue.

    Args:
        x: ``[..., D]`` fp32/fp16/bf16, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        weight: ``[F, D]``, x's dtype and device; F (the kept width) may be any value >= 1.
        bias: ``[F]`` in x's dtype, or None.
        approximate: ``"none"`` (erf GELU, timm's default) or ``"tanh"``.

    Returns:
        ``[..., F]`` in x's dtype; NaN where the pre-activation is not finite (+inf, -inf, NaN), as in
        ``reference.gelu_reference``.
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    num_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {in_features} (weight shape [F, D])")
    if num_features < 1 or in_features < 1:
        raise ValueError(f"weight must have F >= 1 and D >= 1, got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != num_features:
        raise ValueError(f"bias has {bias.shape[0]} entries but weight has F = {num_features} rows")
    runtime.require_triton_device("fused_linear_gelu", x, "hiap_kernels.linear_gelu.reference.linear_gelu_reference")

    leading = x.shape[:-1]
    rows = x.reshape(-1, in_features)
    out = _linear_gelu(rows, weight, bias, approximate)
    return out.reshape(*leading, num_features)


# A torch.library custom op, so torch.compile keeps the kernel in its graph (no break) and CUDA graphs capture it.
@torch.library.custom_op(
    "hiap_kernels::linear_gelu", mutates_args=(),
    schema="(Tensor rows, Tensor weight, Tensor? bias, str approximate) -> Tensor",
)
def _linear_gelu(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """``[M, D] -> [M, F]`` on checked inputs; the output is contiguous."""
    rows, weight = unit_last_stride(rows), unit_last_stride(weight)
    num_rows, (num_features, in_features) = rows.shape[0], weight.shape
    bias_arg = bias.contiguous() if bias is not None else weight  # never read when HAS_BIAS is False
    out = runtime.empty((num_rows, num_features), rows.dtype, rows.device)
    if num_rows == 0:
        return out

    _linear_gelu_kernel[output_tile_grid(num_rows, num_features)](
        rows,
        weight,
        bias_arg,
        out,
        num_rows,
        num_features,
        in_features,
        rows.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        APPROXIMATE_TANH=approximate == "tanh",
        DOT_PRECISION=dot_precision(rows.dtype),
    )
    return out


@_linear_gelu.register_fake
def _linear_gelu_fake(rows, weight, bias, approximate):
    return rows.new_empty((rows.shape[0], weight.shape[0]))
