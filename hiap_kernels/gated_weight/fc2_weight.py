"""Triton kernels of ``gated_fc2_weight``: fc2's weight with a layer's sampled neuron mask on its columns, one launch
forward; backward one launch for the weight and neuron gate gradients and a ``sum`` of per-program partials for the
block gate (the family's shared pieces: ``kernel.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import unit_last_stride
from hiap_kernels.gated_weight import kernel as family
from hiap_kernels.gated_weight.kernel import _GATE_SCHEMA, _check_common, _empty_like_rows, _gate
from hiap_kernels.gates.reference import seed_tensor, tau_tensor


@triton.jit(do_not_specialize=["offset"])
def _gated_fc2_weight_kernel(
    weight_ptr, block_ptr, neuron_ptr, out_weight_ptr,
    rows, cols, stride_weight, stride_out,
    seed_ptr, offset, tau_ptr,
    GROUP: tl.constexpr, HARD: tl.constexpr, SAMPLE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    seed = tl.load(seed_ptr)
    tau = tl.load(tau_ptr).to(tl.float32)
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = col < cols
    z_block, _ = _gate(block_ptr, 0, True, seed, offset, tau, HARD, SAMPLE)
    z_neuron, _ = _gate(neuron_ptr, col // GROUP, col_ok, seed, offset + 1 + col // GROUP, tau, HARD, SAMPLE)
    # [BLOCK_C] the neuron mask b * c, rounded to the weight's dtype as in the reference
    scale = (z_block * z_neuron).to(out_weight_ptr.dtype.element_ty).to(tl.float32)
    ok = (row < rows)[:, None] & col_ok[None, :]
    w = tl.load(weight_ptr + row[:, None] * stride_weight + col[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_weight_ptr + row[:, None] * stride_out + col[None, :],
             (w * scale[None, :]).to(out_weight_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["offset"])
def _gated_fc2_weight_backward_kernel(
    grad_weight_ptr, weight_ptr, block_ptr, neuron_ptr,
    out_grad_weight_ptr, out_grad_neuron_ptr, block_partial_ptr,
    rows, cols, stride_grad, stride_weight, stride_out,
    seed_ptr, offset, tau_ptr,
    GROUP: tl.constexpr, GROUPS: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr, BLOCK_GP: tl.constexpr,
    HARD: tl.constexpr, SAMPLE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    SPAN: tl.constexpr = GROUPS_PER_PROGRAM * GROUP
    seed = tl.load(seed_ptr)
    tau = tl.load(tau_ptr).to(tl.float32)
    program = tl.program_id(0)
    first_col = program * SPAN
    z_block, slope_block = _gate(block_ptr, 0, True, seed, offset, tau, HARD, SAMPLE)
    # [BLOCK_GP] this program's whole groups
    local_group = tl.arange(0, BLOCK_GP)
    group = program * GROUPS_PER_PROGRAM + local_group
    group_ok = (local_group < GROUPS_PER_PROGRAM) & (group < GROUPS)
    z_neuron, slope_neuron = _gate(neuron_ptr, group, group_ok, seed, offset + 1 + group, tau, HARD, SAMPLE)
    grad_group = tl.zeros((BLOCK_GP,), dtype=tl.float32)
    for start in range(0, SPAN, BLOCK_C):
        local_col = start + tl.arange(0, BLOCK_C)
        col = first_col + local_col
        col_ok = (local_col < SPAN) & (col < cols)
        # [BLOCK_C, BLOCK_GP] which of the program's groups each column belongs to
        in_group = ((local_col // GROUP)[:, None] == local_group[None, :]) & col_ok[:, None]
        col_z, _ = _gate(neuron_ptr, col // GROUP, col_ok, seed, offset + 1 + col // GROUP, tau, HARD, SAMPLE)
        weight_scale = (z_block * col_z).to(out_grad_weight_ptr.dtype.element_ty).to(tl.float32)
        # [BLOCK_C] dL/dm per column: <dW'[:, j], W[:, j]>, fp32
        grad_mask = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for row_start in range(0, rows, BLOCK_R):
            row = row_start + tl.arange(0, BLOCK_R)
            ok = (row < rows)[:, None] & col_ok[None, :]
            # [BLOCK_R, BLOCK_C]
            g = tl.load(grad_weight_ptr + row[:, None] * stride_grad + col[None, :], mask=ok, other=0.0).to(tl.float32)
            w = tl.load(weight_ptr + row[:, None] * stride_weight + col[None, :], mask=ok, other=0.0).to(tl.float32)
            tl.store(out_grad_weight_ptr + row[:, None] * stride_out + col[None, :],
                     (g * weight_scale[None, :]).to(out_grad_weight_ptr.dtype.element_ty), mask=ok)
            grad_mask += tl.sum(g * w, axis=0)
        grad_group += tl.sum(tl.where(in_group, grad_mask[:, None], 0.0), axis=0)
    grad_neuron = grad_group * z_block * slope_neuron
    tl.store(out_grad_neuron_ptr + group, grad_neuron.to(out_grad_neuron_ptr.dtype.element_ty), mask=group_ok)
    # This program's share of the block gate's gradient; the host sums the partials in a fixed order.
    tl.store(block_partial_ptr + program, tl.sum(tl.where(group_ok, grad_group * z_neuron, 0.0), axis=0) * slope_block)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers, custom ops (one graph node each way under torch.compile) and the public function
# ---------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("hiap_kernels::gated_fc2_weight", mutates_args=(),
                         schema=f"(Tensor weight, Tensor block, Tensor neuron, {_GATE_SCHEMA}) -> Tensor")
def _gated_fc2_weight_op(weight, block, neuron, tau, seed, offset, hard, sample):
    weight = unit_last_stride(weight)
    rows, cols = weight.shape
    out_weight = _empty_like_rows(weight)
    block_rows, block_cols = family._tiles()
    if rows and cols:
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))
        _gated_fc2_weight_kernel[grid](
            weight, block.contiguous(), neuron.contiguous(), out_weight, rows, cols, weight.stride(0),
            out_weight.stride(0), seed, offset, tau, GROUP=cols // neuron.numel(), HARD=hard, SAMPLE=sample,
            BLOCK_R=block_rows, BLOCK_C=block_cols,
        )
    return out_weight


@_gated_fc2_weight_op.register_fake
def _gated_fc2_weight_fake(weight, block, neuron, tau, seed, offset, hard, sample):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _fc2_groups_per_program(group: int, block_cols: int) -> int:
    """Whole groups per backward program: enough narrow groups to fill a tile's width, else one."""
    return max(1, block_cols // group)


@torch.library.custom_op(
    "hiap_kernels::gated_fc2_weight_backward", mutates_args=(),
    schema=f"(Tensor grad_weight, Tensor weight, Tensor block, Tensor neuron, {_GATE_SCHEMA})"
           " -> (Tensor, Tensor, Tensor)")
def _gated_fc2_weight_backward_op(grad_weight, weight, block, neuron, tau, seed, offset, hard, sample):
    grad_weight, weight = unit_last_stride(grad_weight), unit_last_stride(weight)
    rows, cols = weight.shape
    groups = neuron.numel()
    group = cols // groups
    block_rows, block_cols = family._tiles()
    per_program = _fc2_groups_per_program(group, block_cols)
    programs = triton.cdiv(groups, per_program)
    out_weight = _empty_like_rows(weight)
    out_neuron = _empty_like_rows(neuron)
    partials = runtime.empty(programs, torch.float32, weight.device)
    if programs:
        _gated_fc2_weight_backward_kernel[(programs,)](
            grad_weight, weight, block.contiguous(), neuron.contiguous(), out_weight, out_neuron, partials,
            rows, cols, grad_weight.stride(0), weight.stride(0), out_weight.stride(0), seed, offset, tau,
            GROUP=group, GROUPS=groups, GROUPS_PER_PROGRAM=per_program,
            BLOCK_GP=triton.next_power_of_2(per_program), HARD=hard, SAMPLE=sample, BLOCK_R=block_rows,
            BLOCK_C=block_cols,
        )
    # The block gate's gradient: the programs' partials summed in a fixed order (deterministic).
    return out_weight, partials.sum(0, keepdim=True).to(block.dtype), out_neuron


@_gated_fc2_weight_backward_op.register_fake
def _gated_fc2_weight_backward_fake(grad_weight, weight, block, neuron, tau, seed, offset, hard, sample):
    return (torch.empty_like(weight, memory_format=torch.contiguous_format), torch.empty_like(block),
            torch.empty_like(neuron))


def _fc2_setup_context(ctx, inputs, output):
    weight, block, neuron, tau, seed, offset, hard, sample = inputs
    ctx.save_for_backward(weight, block, neuron, tau, seed)
    ctx.offset, ctx.hard, ctx.sample = offset, hard, sample


def _fc2_backward(ctx, grad_weight):
    weight, block, neuron, tau, seed = ctx.saved_tensors
    grad_w, grad_block, grad_neuron = _gated_fc2_weight_backward_op(grad_weight, weight, block, neuron, tau, seed,
                                                                   ctx.offset, ctx.hard, ctx.sample)
    return grad_w, grad_block, grad_neuron, None, None, None, None, None


_gated_fc2_weight_op.register_autograd(_fc2_backward, setup_context=_fc2_setup_context)


def gated_fc2_weight(
    weight: torch.Tensor, block_logit: torch.Tensor, neuron_logits: torch.Tensor, *, tau: float | torch.Tensor,
    seed: int | torch.Tensor, offset: int, hard: bool = True, sample: bool = True,
) -> torch.Tensor:
    """fc2's weight with the layer's sampled neuron mask on its columns, in one launch (backward: one launch and a
    ``sum`` of per-program partials for the block gate).

    Same contract as :func:`hiap_kernels.gated_weight.reference.gated_fc2_weight_reference`: ``weight [D, F]``,
    ``block_logit [1]``, ``neuron_logits [F/G]``; returns ``weight * m[None, :]`` (contiguous, the weight's dtype).
    """
    logits = {"block_logit": block_logit, "neuron_logits": neuron_logits}
    _check_common("gated_fc2_weight", weight, logits, tau, seed, offset, block_logit.numel() + neuron_logits.numel())
    if block_logit.shape != (1,) or neuron_logits.dim() != 1 or neuron_logits.numel() == 0 \
            or weight.shape[1] % neuron_logits.numel():
        raise ValueError(f"logits must be block [1] and neuron [F/G] with G dividing F={weight.shape[1]}; got "
                         f"{tuple(block_logit.shape)}, {tuple(neuron_logits.shape)}")
    return _gated_fc2_weight_op(weight, block_logit, neuron_logits, tau_tensor(tau).to(weight.device),
                                seed_tensor(seed).to(weight.device), offset, bool(hard), bool(sample))
