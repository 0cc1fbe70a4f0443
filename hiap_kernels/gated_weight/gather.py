"""Triton kernels of ``gather_weight``: once a run has fixed its structure, each weight's kept rows (qkv with its bias
and the decision's scale, fc1 with its bias) or columns (proj, fc2) gathered for the library GEMM, in one launch; and
backward the whole weight's gradient, the gathered one scattered back with zeros where a row or column was removed,
in one launch from the inverse map fixed with the structure.

Contract: :func:`hiap_kernels.gated_weight.reference.gather_weight_reference` (index_select and the scale). Tiles as
in ``kernel.py`` (``kernel._tiles``: one policy for the whole family).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor, unit_last_stride
from hiap_kernels.gated_weight import kernel as gated
from hiap_kernels.gated_weight.reference import check_gather_indices


@triton.jit
def _gather_weight_kernel(
    weight_ptr, bias_ptr, index_ptr, scale_ptr, out_ptr, out_bias_ptr,
    out_rows, out_cols, source_extent, stride_weight, stride_out,
    GATHER_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = row < out_rows
    col_ok = col < out_cols
    ok = row_ok[:, None] & col_ok[None, :]
    # [BLOCK_R] or [BLOCK_C]: where each output row / column comes from, and its scale (in the weight's dtype). An
    # index outside the weight is never read: its values load as 0 and its scale is NaN, so its row / column (and
    # bias) come out NaN.
    if GATHER_ROWS:
        source = tl.load(index_ptr + row, mask=row_ok, other=0)
        inside = (source >= 0) & (source < source_extent)
        scale = tl.full((BLOCK_R,), 1.0, tl.float32)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + row, mask=row_ok, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
        scale = tl.where(inside, scale, float("nan"))
        w = tl.load(weight_ptr + source[:, None] * stride_weight + col[None, :], mask=ok & inside[:, None],
                    other=0.0).to(tl.float32)
        out = w * scale[:, None]
    else:
        source = tl.load(index_ptr + col, mask=col_ok, other=0)
        inside = (source >= 0) & (source < source_extent)
        scale = tl.full((BLOCK_C,), 1.0, tl.float32)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + col, mask=col_ok, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
        scale = tl.where(inside, scale, float("nan"))
        w = tl.load(weight_ptr + row[:, None] * stride_weight + source[None, :], mask=ok & inside[None, :],
                    other=0.0).to(tl.float32)
        out = w * scale[None, :]
    tl.store(out_ptr + row[:, None] * stride_out + col[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            b = tl.load(bias_ptr + source, mask=row_ok & inside, other=0.0).to(tl.float32)
            bias_scale = scale.to(out_bias_ptr.dtype.element_ty).to(tl.float32)
            tl.store(out_bias_ptr + row, (b * bias_scale).to(out_bias_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gather_weight_backward_kernel(
    grad_ptr, grad_bias_ptr, inverse_ptr, scale_ptr, out_grad_ptr, out_grad_bias_ptr,
    rows, cols, num_kept, stride_grad, stride_out,
    GATHER_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Over the whole weight [rows, cols]: a kept row / column takes its gathered gradient times the scale, the others 0.
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = row < rows
    col_ok = col < cols
    ok = row_ok[:, None] & col_ok[None, :]
    # [BLOCK_R] or [BLOCK_C]: each row's / column's position in the gathered weight (-1 where it was left out; one
    # outside [-1, num_kept) is never read: its gradient comes out NaN), and its scale (0 where left out)
    if GATHER_ROWS:
        slot = tl.load(inverse_ptr + row, mask=row_ok, other=-1)
        lane_ok = row_ok
    else:
        slot = tl.load(inverse_ptr + col, mask=col_ok, other=-1)
        lane_ok = col_ok
    outside = lane_ok & ((slot < -1) | (slot >= num_kept))
    kept = lane_ok & (slot >= 0) & (slot < num_kept)
    slot = tl.where(kept, slot, 0)
    scale = tl.where(kept, 1.0, 0.0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + slot, mask=kept, other=0.0).to(out_grad_ptr.dtype.element_ty).to(tl.float32)
    if GATHER_ROWS:
        g = tl.load(grad_ptr + slot[:, None] * stride_grad + col[None, :], mask=ok & kept[:, None],
                    other=0.0).to(tl.float32)
        out = tl.where(outside[:, None], float("nan"), g * scale[:, None])
    else:
        g = tl.load(grad_ptr + row[:, None] * stride_grad + slot[None, :], mask=ok & kept[None, :],
                    other=0.0).to(tl.float32)
        out = tl.where(outside[None, :], float("nan"), g * scale[None, :])
    tl.store(out_grad_ptr + row[:, None] * stride_out + col[None, :], out.to(out_grad_ptr.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            gb = tl.load(grad_bias_ptr + slot, mask=kept, other=0.0).to(tl.float32)
            bias_scale = scale.to(out_grad_bias_ptr.dtype.element_ty).to(tl.float32)
            out_bias = tl.where(outside, float("nan"), gb * bias_scale)
            tl.store(out_grad_bias_ptr + row, out_bias.to(out_grad_bias_ptr.dtype.element_ty), mask=row_ok)


@torch.library.custom_op(
    "hiap_kernels::gather_weight", mutates_args=(),
    schema="(Tensor weight, Tensor? bias, Tensor index, Tensor inverse, Tensor? scale, int dim) -> (Tensor, Tensor)")
def _gather_weight_op(weight, bias, index, inverse, scale, dim):
    weight = unit_last_stride(weight)
    rows, cols = weight.shape
    kept = index.numel()
    out_rows, out_cols = (kept, cols) if dim == 0 else (rows, kept)
    out = runtime.empty((out_rows, out_cols), weight.dtype, weight.device)
    has_bias = bias is not None and dim == 0
    out_bias = runtime.empty(kept, bias.dtype, bias.device) if has_bias else weight.new_empty(0)
    block_rows, block_cols = gated._tiles()
    if out_rows and out_cols:
        grid = (triton.cdiv(out_rows, block_rows), triton.cdiv(out_cols, block_cols))
        _gather_weight_kernel[grid](
            weight, bias.contiguous() if has_bias else weight, index.contiguous(),
            scale.contiguous() if scale is not None else weight, out, out_bias if has_bias else out,
            out_rows, out_cols, weight.shape[dim], weight.stride(0), out.stride(0), GATHER_ROWS=dim == 0,
            HAS_BIAS=has_bias,
            HAS_SCALE=scale is not None, BLOCK_R=block_rows, BLOCK_C=block_cols,
        )
    return out, out_bias


@_gather_weight_op.register_fake
def _gather_weight_fake(weight, bias, index, inverse, scale, dim):
    rows, cols = weight.shape
    shape = (index.shape[0], cols) if dim == 0 else (rows, index.shape[0])
    has_bias = bias is not None and dim == 0
    return weight.new_empty(shape), (bias.new_empty(index.shape[0]) if has_bias else weight.new_empty(0))


@torch.library.custom_op(
    "hiap_kernels::gather_weight_backward", mutates_args=(),
    schema="(Tensor grad, Tensor? grad_bias, Tensor weight, Tensor? bias, Tensor inverse, Tensor? scale, int dim)"
           " -> (Tensor, Tensor)")
def _gather_weight_backward_op(grad, grad_bias, weight, bias, inverse, scale, dim):
    grad = unit_last_stride(grad)
    rows, cols = weight.shape
    out = runtime.empty((rows, cols), weight.dtype, weight.device)
    has_bias = bias is not None and dim == 0
    if has_bias and grad_bias is None:
        grad_bias = torch.zeros(grad.shape[0], dtype=bias.dtype, device=bias.device)
    out_bias = runtime.empty(rows, bias.dtype, bias.device) if has_bias else weight.new_empty(0)
    block_rows, block_cols = gated._tiles()
    if rows and cols:
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))
        _gather_weight_backward_kernel[grid](
            grad, grad_bias.contiguous() if has_bias else grad, inverse.contiguous(),
            scale.contiguous() if scale is not None else grad, out, out_bias if has_bias else out,
            rows, cols, grad.shape[dim], grad.stride(0), out.stride(0), GATHER_ROWS=dim == 0, HAS_BIAS=has_bias,
            HAS_SCALE=scale is not None, BLOCK_R=block_rows, BLOCK_C=block_cols,
        )
    return out, out_bias


@_gather_weight_backward_op.register_fake
def _gather_weight_backward_fake(grad, grad_bias, weight, bias, inverse, scale, dim):
    has_bias = bias is not None and dim == 0
    return weight.new_empty(weight.shape), (bias.new_empty(bias.shape) if has_bias else weight.new_empty(0))


def _gather_setup_context(ctx, inputs, output):
    weight, bias, index, inverse, scale, dim = inputs
    ctx.set_materialize_grads(False)  # the empty bias output of a column gather needs no zeros on the way back
    ctx.kept = index.shape[0]
    ctx.save_for_backward(weight, bias, inverse, scale)
    ctx.dim = dim


def _gather_backward(ctx, grad, grad_bias):
    weight, bias, inverse, scale = ctx.saved_tensors
    if grad is None:  # only the bias was used
        rows, cols = weight.shape
        grad = weight.new_zeros((ctx.kept, cols) if ctx.dim == 0 else (rows, ctx.kept))
    has_bias = bias is not None and ctx.dim == 0
    grad_weight, out_grad_bias = _gather_weight_backward_op(grad, grad_bias if has_bias else None, weight,
                                                            bias if has_bias else None, inverse, scale, ctx.dim)
    return grad_weight, out_grad_bias if has_bias else None, None, None, None, None


_gather_weight_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)


def gather_weight(
    weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, inverse: torch.Tensor,
    scale: torch.Tensor | None, *, dim: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kept rows (``dim=0``) or columns (``dim=1``) of a weight, scaled, in one launch; backward in one launch.

    Same contract as :func:`hiap_kernels.gated_weight.reference.gather_weight_reference`: ``index [K]`` the kept
    rows / columns (distinct), ``inverse`` each one's position in ``index`` or -1 (``[R]`` / ``[C]``; both fixed with
    the structure, so they are built once), ``scale [K]`` or None; a bias only with ``dim=0``.

    Indices are checked on the host (``reference.check_gather_indices``: ValueError for an index outside the weight
    or an ``inverse`` that is not ``index``'s) the first time a pair of index tensors comes (one device-to-host copy),
    and remembered per tensor object and version, so a structure's indices cost one check, not one per step. Under
    ``torch.compile`` the host check is left out, and the kernels never read outside their inputs: a row / column
    whose index lies outside the weight, or a gradient row / column whose ``inverse`` entry lies outside
    ``[-1, K)``, comes out NaN.
    """
    check_tensor("weight", weight, ndim=2)
    runtime.require_triton_device("gather_weight", weight, "hiap_kernels.gated_weight.gather_weight_reference")
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (rows) or 1 (columns), got {dim!r}")
    for name, tensor in (("index", index), ("inverse", inverse)):
        check_tensor(name, tensor, ndim=1, dtypes=(torch.int64,), device=weight.device)
    if inverse.shape[0] != weight.shape[dim]:
        raise ValueError(f"inverse has {inverse.shape[0]} entries for the weight's {weight.shape[dim]} "
                         f"{'rows' if dim == 0 else 'columns'}")
    if scale is not None:
        check_tensor("scale", scale, ndim=1, device=weight.device)
        if scale.shape != index.shape:
            raise ValueError(f"scale has {scale.shape[0]} entries for {index.shape[0]} kept rows / columns")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=weight.device)
        if dim != 0 or bias.shape[0] != weight.shape[0]:
            raise ValueError("a bias goes with a row gather (dim=0) and has one entry per weight row")
    check_gather_indices(index, inverse, weight.shape[dim], dim)
    out, out_bias = _gather_weight_op(weight, bias, index, inverse, scale, dim)
    return out, out_bias if bias is not None else None
