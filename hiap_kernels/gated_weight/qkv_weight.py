"""Triton kernels of ``gated_qkv_weight``: the fused qkv weight and bias with a layer's sampled row masks (``dqk`` on
q rows, 1 on k rows, ``g * dv`` on v rows), one launch forward; backward one launch per head and part for the weight
and bias gradients and the head, q/k and v gate gradients (the family's shared pieces: ``kernel.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common.runtime import check_tensor, unit_last_stride
from hiap_kernels.gated_weight import kernel as family
from hiap_kernels.gated_weight.kernel import _GATE_SCHEMA, _check_common, _empty_like_rows, _gate
from hiap_kernels.gates.reference import seed_tensor, tau_tensor


@triton.jit
def _qkv_row_scale(row, row_ok, head_ptr, qk_ptr, v_ptr, seed, offset, tau, NUM_HEADS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, HARD: tl.constexpr, SAMPLE: tl.constexpr):
    """Row mask of the fused qkv weight: ``dqk`` on q rows, 1 on k rows, ``g * dv`` on v rows (fp32, per ``row``)."""
    GROUPS: tl.constexpr = HEAD_DIM // GROUP
    part = row // (NUM_HEADS * HEAD_DIM)
    within = row % (NUM_HEADS * HEAD_DIM)
    head = within // HEAD_DIM
    micro = head * GROUPS + (within % HEAD_DIM) // GROUP
    is_q = row_ok & (part == 0)
    is_v = row_ok & (part == 2)
    z_qk, _ = _gate(qk_ptr, micro, is_q, seed, offset + NUM_HEADS + micro, tau, HARD, SAMPLE)
    z_head, _ = _gate(head_ptr, head, is_v, seed, offset + head, tau, HARD, SAMPLE)
    z_v, _ = _gate(v_ptr, micro, is_v, seed, offset + NUM_HEADS + NUM_HEADS * GROUPS + micro, tau, HARD, SAMPLE)
    return tl.where(part == 0, z_qk, tl.where(part == 2, z_head * z_v, 1.0))


@triton.jit(do_not_specialize=["offset"])
def _gated_qkv_weight_kernel(
    weight_ptr, bias_ptr, head_ptr, qk_ptr, v_ptr, out_weight_ptr, out_bias_ptr,
    rows, cols, stride_weight, stride_out,
    seed_ptr, offset, tau_ptr,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    HARD: tl.constexpr, SAMPLE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    seed = tl.load(seed_ptr)
    tau = tl.load(tau_ptr).to(tl.float32)
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    # [BLOCK_R] in fp32, rounded to the weight's dtype first as the reference's `scale.to(weight.dtype)` is
    scale = _qkv_row_scale(row, row_ok, head_ptr, qk_ptr, v_ptr, seed, offset, tau, NUM_HEADS, HEAD_DIM, GROUP,
                           HARD, SAMPLE)
    scale = scale.to(out_weight_ptr.dtype.element_ty).to(tl.float32)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = row_ok[:, None] & (col < cols)[None, :]
    # [BLOCK_R, BLOCK_C]
    w = tl.load(weight_ptr + row[:, None] * stride_weight + col[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_weight_ptr + row[:, None] * stride_out + col[None, :],
             (w * scale[:, None]).to(out_weight_ptr.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            b = tl.load(bias_ptr + row, mask=row_ok, other=0.0).to(tl.float32)
            bias_scale = scale.to(out_bias_ptr.dtype.element_ty).to(tl.float32)
            tl.store(out_bias_ptr + row, (b * bias_scale).to(out_bias_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["offset"])
def _gated_qkv_weight_backward_kernel(
    grad_weight_ptr, weight_ptr, grad_bias_ptr, bias_ptr, head_ptr, qk_ptr, v_ptr,
    out_grad_weight_ptr, out_grad_bias_ptr, out_grad_head_ptr, out_grad_qk_ptr, out_grad_v_ptr,
    cols, stride_grad, stride_weight, stride_out,
    seed_ptr, offset, tau_ptr,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    HARD: tl.constexpr, SAMPLE: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    GROUPS: tl.constexpr = HEAD_DIM // GROUP
    seed = tl.load(seed_ptr)
    tau = tl.load(tau_ptr).to(tl.float32)
    head = tl.program_id(0)
    # [BLOCK_DH] the head's dims, [BLOCK_G] its groups, [BLOCK_DH, BLOCK_G] which group each dim belongs to
    dim = tl.arange(0, BLOCK_DH)
    dim_ok = dim < HEAD_DIM
    group = tl.arange(0, BLOCK_G)
    group_ok = group < GROUPS
    in_group = ((dim // GROUP)[:, None] == group[None, :]) & dim_ok[:, None] & group_ok[None, :]
    micro = head * GROUPS + group
    z_qk, slope_qk = _gate(qk_ptr, micro, group_ok, seed, offset + NUM_HEADS + micro, tau, HARD, SAMPLE)
    z_v, slope_v = _gate(v_ptr, micro, group_ok, seed, offset + NUM_HEADS + NUM_HEADS * GROUPS + micro, tau, HARD,
                         SAMPLE)
    z_head, slope_head = _gate(head_ptr, head, True, seed, offset + head, tau, HARD, SAMPLE)
    # This program's part of the head: its q (0), k (1) or v (2) rows.
    part = tl.program_id(1)
    row = part * NUM_HEADS * HEAD_DIM + head * HEAD_DIM + dim
    # [BLOCK_DH] each row's mask, expanded from its group's gate
    q_scale = tl.sum(tl.where(in_group, z_qk[None, :], 0.0), axis=1)
    v_scale = tl.sum(tl.where(in_group, z_v[None, :], 0.0), axis=1) * z_head
    scale = tl.where(part == 0, q_scale, tl.where(part == 2, v_scale, tl.where(dim_ok, 1.0, 0.0)))
    weight_scale = scale.to(out_grad_weight_ptr.dtype.element_ty).to(tl.float32)
    # dL/dm per row: <dW'[r], W[r]> (+ db'[r] b[r]), fp32
    grad_mask = tl.zeros((BLOCK_DH,), dtype=tl.float32)
    for start in range(0, cols, BLOCK_C):
        col = start + tl.arange(0, BLOCK_C)
        ok = dim_ok[:, None] & (col < cols)[None, :]
        # [BLOCK_DH, BLOCK_C]
        g = tl.load(grad_weight_ptr + row[:, None] * stride_grad + col[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + row[:, None] * stride_weight + col[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(out_grad_weight_ptr + row[:, None] * stride_out + col[None, :],
                 (g * weight_scale[:, None]).to(out_grad_weight_ptr.dtype.element_ty), mask=ok)
        grad_mask += tl.sum(g * w, axis=1)
    if HAS_BIAS:
        gb = tl.load(grad_bias_ptr + row, mask=dim_ok, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + row, mask=dim_ok, other=0.0).to(tl.float32)
        bias_scale = scale.to(out_grad_bias_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_grad_bias_ptr + row, (gb * bias_scale).to(out_grad_bias_ptr.dtype.element_ty), mask=dim_ok)
        grad_mask += gb * b
    # [BLOCK_G] summed over each gate's group of rows; the k rows have no gate
    grad_group = tl.sum(tl.where(in_group, grad_mask[:, None], 0.0), axis=0)
    if part == 0:
        tl.store(out_grad_qk_ptr + micro, (grad_group * slope_qk).to(out_grad_qk_ptr.dtype.element_ty), mask=group_ok)
    if part == 2:
        tl.store(out_grad_v_ptr + micro, (grad_group * z_head * slope_v).to(out_grad_v_ptr.dtype.element_ty),
                 mask=group_ok)
        grad_head = tl.sum(tl.where(group_ok, grad_group * z_v, 0.0), axis=0)
        tl.store(out_grad_head_ptr + head, (grad_head * slope_head).to(out_grad_head_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------------------
# Launchers, custom ops (one graph node each way under torch.compile) and the public function
# ---------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("hiap_kernels::gated_qkv_weight", mutates_args=(),
                         schema=f"(Tensor weight, Tensor? bias, Tensor head, Tensor qk, Tensor v, {_GATE_SCHEMA})"
                                " -> (Tensor, Tensor)")
def _gated_qkv_weight_op(weight, bias, head, qk, v, tau, seed, offset, hard, sample):
    weight = unit_last_stride(weight)
    rows, cols = weight.shape
    num_heads, groups = qk.shape
    head_dim = rows // (3 * num_heads)
    out_weight = _empty_like_rows(weight)
    out_bias = _empty_like_rows(bias) if bias is not None else weight.new_empty(0)
    bias = bias.contiguous() if bias is not None else None
    block_rows, block_cols = family._tiles()
    if rows and cols:
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))
        _gated_qkv_weight_kernel[grid](
            weight, bias if bias is not None else out_weight, head.contiguous(), qk.contiguous(), v.contiguous(),
            out_weight, out_bias if bias is not None else out_weight,
            rows, cols, weight.stride(0), out_weight.stride(0), seed, offset, tau,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, GROUP=head_dim // groups, HAS_BIAS=bias is not None,
            HARD=hard, SAMPLE=sample, BLOCK_R=block_rows, BLOCK_C=block_cols,
        )
    return out_weight, out_bias


@_gated_qkv_weight_op.register_fake
def _gated_qkv_weight_fake(weight, bias, head, qk, v, tau, seed, offset, hard, sample):
    return torch.empty_like(weight, memory_format=torch.contiguous_format), (
        torch.empty_like(bias) if bias is not None else weight.new_empty(0))


@torch.library.custom_op(
    "hiap_kernels::gated_qkv_weight_backward", mutates_args=(),
    schema=f"(Tensor grad_weight, Tensor? grad_bias, Tensor weight, Tensor? bias, Tensor head, Tensor qk, Tensor v, "
           f"{_GATE_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _gated_qkv_weight_backward_op(grad_weight, grad_bias, weight, bias, head, qk, v, tau, seed, offset, hard, sample):
    grad_weight, weight = unit_last_stride(grad_weight), unit_last_stride(weight)
    rows, cols = weight.shape
    num_heads, groups = qk.shape
    head_dim = rows // (3 * num_heads)
    has_bias = bias is not None
    if has_bias and grad_bias is None:
        grad_bias = torch.zeros_like(bias)
    out_weight = _empty_like_rows(weight)
    out_bias = _empty_like_rows(bias) if has_bias else weight.new_empty(0)
    out_head, out_qk, out_v = _empty_like_rows(head), _empty_like_rows(qk), _empty_like_rows(v)
    if num_heads:
        _gated_qkv_weight_backward_kernel[(num_heads, 3)](
            grad_weight, weight, grad_bias.contiguous() if has_bias else grad_weight,
            bias.contiguous() if has_bias else weight, head.contiguous(), qk.contiguous(), v.contiguous(),
            out_weight, out_bias if has_bias else out_weight, out_head, out_qk, out_v,
            cols, grad_weight.stride(0), weight.stride(0), out_weight.stride(0), seed, offset, tau,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, GROUP=head_dim // groups, HAS_BIAS=has_bias, HARD=hard,
            SAMPLE=sample, BLOCK_DH=triton.next_power_of_2(head_dim), BLOCK_G=triton.next_power_of_2(groups),
            BLOCK_C=family._tiles()[1],
        )
    return out_weight, out_bias, out_head, out_qk, out_v


@_gated_qkv_weight_backward_op.register_fake
def _gated_qkv_weight_backward_fake(grad_weight, grad_bias, weight, bias, head, qk, v, tau, seed, offset, hard,
                                    sample):
    return (torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(bias) if bias is not None else weight.new_empty(0),
            torch.empty_like(head), torch.empty_like(qk), torch.empty_like(v))


def _qkv_setup_context(ctx, inputs, output):
    weight, bias, head, qk, v, tau, seed, offset, hard, sample = inputs
    ctx.save_for_backward(weight, bias, head, qk, v, tau, seed)
    ctx.offset, ctx.hard, ctx.sample = offset, hard, sample
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # no zeros for the empty bias output of a layer without a bias


def _qkv_backward(ctx, grad_weight, grad_bias):
    weight, bias, head, qk, v, tau, seed = ctx.saved_tensors
    if grad_weight is None:  # only the bias was used
        grad_weight = torch.zeros_like(weight)
    grads = _gated_qkv_weight_backward_op(grad_weight, grad_bias if ctx.has_bias else None, weight, bias, head, qk, v,
                                          tau, seed, ctx.offset, ctx.hard, ctx.sample)
    grad_w, grad_b, grad_head, grad_qk, grad_v = grads
    return grad_w, grad_b if ctx.has_bias else None, grad_head, grad_qk, grad_v, None, None, None, None, None


_gated_qkv_weight_op.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


def gated_qkv_weight(
    weight: torch.Tensor, bias: torch.Tensor | None, head_logits: torch.Tensor, qk_logits: torch.Tensor,
    v_logits: torch.Tensor, *, tau: float | torch.Tensor, seed: int | torch.Tensor, offset: int, hard: bool = True,
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The qkv weight and bias with the layer's sampled row masks, in one launch (backward: one launch).

    Same contract as :func:`hiap_kernels.gated_weight.reference.gated_qkv_weight_reference`: ``weight [3 H Dh, D]``,
    ``bias [3 H Dh]`` or None, logits ``head [H]``, ``qk [H, Dh/G]``, ``v [H, Dh/G]``; returns ``(weight * m[:, None],
    bias * m)`` in their dtypes (contiguous), with gradients to the weight, the bias and (when sampling) the logits.
    A ``torch.library`` custom op with its backward as a second one: one graph node each way under torch.compile.
    """
    logits = {"head_logits": head_logits, "qk_logits": qk_logits, "v_logits": v_logits}
    _check_common("gated_qkv_weight", weight, logits, tau, seed, offset,
                  head_logits.numel() + qk_logits.numel() + v_logits.numel())
    num_heads = head_logits.numel()
    if head_logits.dim() != 1 or qk_logits.dim() != 2 or qk_logits.shape != v_logits.shape \
            or qk_logits.shape[0] != num_heads:
        raise ValueError(f"logits must be head [H], qk and v [H, G]; got {tuple(head_logits.shape)}, "
                         f"{tuple(qk_logits.shape)}, {tuple(v_logits.shape)}")
    rows = weight.shape[0]
    groups = qk_logits.shape[1]
    if num_heads == 0 or rows % (3 * num_heads) or groups == 0 or (rows // (3 * num_heads)) % groups:
        raise ValueError(f"weight has {rows} rows, not 3 x {num_heads} heads x a head dim divisible by {groups} groups")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=weight.device)
        if bias.shape[0] != rows:
            raise ValueError(f"bias has {bias.shape[0]} entries for {rows} weight rows")
    out_weight, out_bias = _gated_qkv_weight_op(weight, bias, head_logits, qk_logits, v_logits,
                                                tau_tensor(tau).to(weight.device), seed_tensor(seed).to(weight.device),
                                                offset, bool(hard), bool(sample))
    return out_weight, out_bias if bias is not None else None
