"""Fused fc1 + bias + GELU for the FFN blocks of extracted (pruned) ViTs.

After extraction an FFN block is two dense GEMMs at the kept width F. The first one's bias and GELU run in the GEMM
epilogue on the fp32 accumulator, so the pre-activation ``[M, F]`` never goes to memory. fc2 stays a plain Linear.
The plain-PyTorch twin is ``inference_ffn_reference.linear_gelu_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels._runtime import check_tensor, interpreter_active, pick_configs
from hiap_kernels.inference_ffn_reference import GELU_APPROXIMATIONS, linear_gelu_reference

__all__ = ["fused_linear_gelu", "linear_gelu_reference"]

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)

_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
# The interpreter's cost grows with the number of programs and block ops, not with the tile size.
_INTERPRETER_CONFIG = triton.Config(
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1
)


@triton.autotune(
    configs=pick_configs(_GPU_CONFIGS, _INTERPRETER_CONFIG),
    key=["num_rows", "num_features", "in_features"],
)
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
    # Programs walk GROUP_M row blocks per column block so that neighbouring programs share weight tiles in L2.
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(num_rows, BLOCK_M)
    col_blocks = tl.cdiv(num_features, BLOCK_N)
    programs_per_group = GROUP_M * col_blocks
    first_row_block = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(row_blocks - first_row_block, GROUP_M)
    pid_m = first_row_block + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    # [BLOCK_M], [BLOCK_N], [BLOCK_K]
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_valid = rows < num_rows
    col_valid = cols < num_features
    # int64: rows * stride passes 2**31 for large token batches.
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_stride_m
    weight_cols = weight_ptr + cols.to(tl.int64)[None, :] * weight_stride_f

    # [BLOCK_M, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, in_features, BLOCK_K):
        k_valid = (k_start + ks) < in_features
        # [BLOCK_M, BLOCK_K]
        x_tile = tl.load(x_rows + (k_start + ks)[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        # [BLOCK_K, BLOCK_N]: W^T read straight from the row-major [F, D] weight.
        weight_tile = tl.load(
            weight_cols + (k_start + ks)[:, None], mask=k_valid[:, None] & col_valid[None, :], other=0.0
        )
        acc = tl.dot(x_tile, weight_tile, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        # [BLOCK_N]
        bias = tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if APPROXIMATE_TANH:
        # 0.5 * x * (1 + tanh(u)) == x * sigmoid(2u), which needs no tanh; exp of -|2u| never overflows, and the
        # sigmoid saturates cleanly to 0 or 1 for large |u|.
        inner = _SQRT_2_OVER_PI * (acc + 0.044715 * acc * acc * acc)
        decay = tl.exp(-2.0 * tl.abs(inner))
        sigmoid = tl.where(inner >= 0, 1.0 / (1.0 + decay), decay / (1.0 + decay))
        activated = acc * sigmoid
    else:
        activated = 0.5 * acc * (1.0 + tl.erf(acc * _SQRT_HALF))

    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * out_stride_m + cols[None, :],
        activated.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & col_valid[None, :],
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
        ``[..., F]`` in x's dtype.
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
    if x.device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"fused_linear_gelu runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); x is on {x.device}. "
            "Use linear_gelu_reference on other devices."
        )

    leading = x.shape[:-1]
    rows = x.reshape(-1, in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    bias_arg = bias.contiguous() if bias is not None else weight  # never read when HAS_BIAS is False
    num_rows = rows.shape[0]
    out = torch.empty(num_rows, num_features, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out.reshape(*leading, num_features)

    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(num_features, meta["BLOCK_N"]),)

    _linear_gelu_kernel[grid](
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
        # fp32 inputs keep full fp32 products (no tf32), as F.linear does by default; halves are unaffected.
        DOT_PRECISION="ieee",
    )
    return out.reshape(*leading, num_features)
