"""Pieces shared by the fused gated training ops (``_gated_qkv*.py`` and ``_gated_fc1*.py``).

Host side: autotune configs of the ``x @ W^T`` forward GEMM, the ``tl.dot`` precision choice, the allocation helper,
argument checks and dtype handling of the public functions, and the custom-op / autograd plumbing both ops use.
Triton side: the swizzled tile order and the ``x @ W^T`` tile loop that both forward kernels put their epilogues on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels._runtime import can_run_triton, check_tensor, interpreter_active, pick_configs
from hiap_kernels.gates import check_gate_arguments

_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the ops allocate goes through here, so tests can poison them with NaN.

    The op modules call it as ``_gemm._empty(...)`` (a module attribute lookup at call time), so one monkeypatch of
    ``hiap_kernels._gemm._empty`` reaches every allocation of both ops.
    """
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
# Launcher and custom-op plumbing
# ----------------------------------------------------------------------------------------------------------------


def _dummy_pointer(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(1, dtype=dtype, device=device)


def _not_requested(device: torch.device) -> torch.Tensor:
    """Placeholder for a gradient nobody asked for: custom ops return tensors, never None."""
    return torch.empty(0, dtype=torch.float32, device=device)


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


# torch.compile path: opaque custom ops with fake shapes and a registered autograd formula, so a compiled model keeps
# one graph. Seed and offset are SymInt: a seed that changes every step costs one recompile, not one per seed. Eager
# mode skips the dispatcher and uses the autograd.Functions (``GatedQKVFunction``, ``GatedFC1Function``), which also
# avoid stacking dq, dk, dv into one tensor.
_GATE_SCHEMA = "float tau, SymInt seed, SymInt offset, bool hard, bool sample"


# ----------------------------------------------------------------------------------------------------------------
# Public-function helpers: argument checks and dtypes
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
