"""``gated_qkv``: launchers, autograd.Function (eager), custom ops (torch.compile) and the public function.

Kernels in ``qkv_kernels.py``; shared plumbing in ``interface.py``; the math is explained in the package docstring.
"""

from __future__ import annotations

import torch
import triton

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor, dot_precision, interpreter_active
from hiap_kernels.gated_linear.interface import (
    ACTIVATION_DTYPES,
    GATE_SCHEMA,
    LOGIT_DTYPES,
    check_common,
    define_custom_op,
    dummy_pointer,
    gate_tensors,
    interpreter_safe,
    needs_grad_flags,
    not_requested,
    requested,
    unify_dtypes,
)
from hiap_kernels.gated_linear.qkv_kernels import (
    DW_BLOCK_K_GPU,
    DW_BLOCK_K_INTERPRETER,
    qkv_backward_dw_kernel,
    qkv_backward_dx_kernel,
    qkv_column_mask_kernel,
    qkv_forward_kernel,
)
from hiap_kernels.gates.kernel import sample_gates

# ----------------------------------------------------------------------------------------------------------------
# Launchers (every buffer comes from runtime.empty, so tests can poison them)
# ----------------------------------------------------------------------------------------------------------------


def _qkv_forward(x, weight, bias, head_logits, qk_logits, v_logits, tau, seed, offset, hard, sample) -> torch.Tensor:
    """Launch the fused forward on validated, dtype-unified, contiguous inputs; returns the [3, B, H, N, Dh] buffer."""
    batch, tokens, dim = x.shape
    num_heads, groups_per_head = qk_logits.shape
    n_out = weight.shape[0]
    head_dim = n_out // (3 * num_heads)
    rows = batch * tokens
    out = runtime.empty((3, batch, num_heads, tokens, head_dim), x.dtype, x.device)
    if rows == 0:
        return out
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)  # noqa: E731
    qkv_forward_kernel[grid](
        x.reshape(rows, dim),
        weight,
        bias if bias is not None else dummy_pointer(x.device, x.dtype),
        head_logits,
        qk_logits,
        v_logits,
        out,
        rows,
        n_out,
        dim,
        tokens,
        batch * num_heads * tokens * head_dim,
        seed,
        offset,
        tau,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        GROUP=head_dim // groups_per_head,
        HARD=hard,
        SAMPLE=sample,
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=dot_precision(x.dtype),
    )
    return out


def _qkv_forward_fake(x, weight, bias, head_logits, qk_logits, v_logits, tau, seed, offset, hard, sample):
    batch, tokens, _ = x.shape
    num_heads = head_logits.shape[0]
    return x.new_empty((3, batch, num_heads, tokens, weight.shape[0] // (3 * num_heads)))


def _qkv_column_mask_values(head_logits, qk_logits, v_logits, n_out, tau, seed, offset, hard, sample) -> torch.Tensor:
    """Column mask [3 * H * Dh] (fp32) from the forward epilogue's own helper."""
    num_heads, groups_per_head = qk_logits.shape
    head_dim = n_out // (3 * num_heads)
    mask = runtime.empty((n_out,), torch.float32, head_logits.device)
    block = 128
    qkv_column_mask_kernel[(triton.cdiv(n_out, block),)](
        head_logits,
        qk_logits,
        v_logits,
        mask,
        n_out,
        seed,
        offset,
        tau,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        GROUP=head_dim // groups_per_head,
        HARD=hard,
        SAMPLE=sample,
        BLOCK=block,
    )
    return mask


def _shared_grad_strides(dq, dk, dv):
    """dq, dk, dv with one set of strides (the kernels take one); copies only when their layouts differ."""
    if not (dq.stride() == dk.stride() == dv.stride()):
        dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    return dq, dk, dv, dq.stride()


def _qkv_backward(
    dq, dk, dv, x, weight, bias, head_logits, qk_logits, v_logits, tau, seed, offset, hard, sample, needs_grad
):
    """Gradients (dx, dW, db, d head_logits, d qk_logits, d v_logits); ``needs_grad`` = [x, weight, bias, logits]."""
    need_dx, need_dw, need_db, need_logits = needs_grad
    need_logits = need_logits and sample
    batch, tokens, dim = x.shape
    num_heads, groups_per_head = qk_logits.shape
    n_out = weight.shape[0]
    head_dim = n_out // (3 * num_heads)
    rows = batch * tokens
    device = x.device

    dq, dk, dv = (g.to(x.dtype) for g in (dq, dk, dv))
    dq, dk, dv, (stride_b, stride_h, stride_n, stride_d) = _shared_grad_strides(dq, dk, dv)
    col_mask = _qkv_column_mask_values(head_logits, qk_logits, v_logits, n_out, tau, seed, offset, hard, sample)
    precision = dot_precision(x.dtype)
    grads = [not_requested(device) for _ in range(6)]

    if need_dx:
        dx = grads[0] = runtime.empty((batch, tokens, dim), x.dtype, device)
        if rows > 0:
            grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(dim, meta["BLOCK_K"]),)  # noqa: E731
            qkv_backward_dx_kernel[grid](
                dq, dk, dv, col_mask, weight, dx, rows, n_out, dim, tokens,
                stride_b, stride_h, stride_n, stride_d,
                NUM_HEADS=num_heads, HEAD_DIM=head_dim, INPUT_PRECISION=precision,
            )  # fmt: skip

    if need_dw or need_db or need_logits:
        block_k = DW_BLOCK_K_INTERPRETER if interpreter_active() else DW_BLOCK_K_GPU
        k_tiles = triton.cdiv(dim, block_k)
        dw = runtime.empty((n_out, dim), weight.dtype, device) if need_dw else dummy_pointer(device, weight.dtype)
        mask_grad_partial = runtime.empty((k_tiles, n_out), torch.float32, device)
        col_sum = runtime.empty((n_out,), torch.float32, device)
        grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), k_tiles)  # noqa: E731
        qkv_backward_dw_kernel[grid](
            dq, dk, dv, x.reshape(rows, dim), weight, col_mask, dw, mask_grad_partial, col_sum,
            rows, n_out, dim, tokens, stride_b, stride_h, stride_n, stride_d,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, STORE_DW=need_dw, INPUT_PRECISION=precision, BLOCK_K=block_k,
        )  # fmt: skip
        if need_dw:
            grads[1] = dw
        if need_db:
            grads[2] = (col_mask * col_sum).to(bias.dtype)
        if need_logits:
            mask_grad = mask_grad_partial.sum(0)
            if bias is not None:
                mask_grad = mask_grad + bias.float() * col_sum
            grads[3:6] = _attention_logit_grads(
                mask_grad, head_logits, qk_logits, v_logits, head_dim, tau, seed, offset, hard
            )
    return tuple(grads)


def _qkv_backward_fake(
    dq, dk, dv, x, weight, bias, head_logits, qk_logits, v_logits, tau, seed, offset, hard, sample, needs_grad
):
    need_dx, need_dw, need_db, need_logits = needs_grad
    need_logits = need_logits and sample
    grads = [not_requested(x.device) for _ in range(6)]
    if need_dx:
        grads[0] = torch.empty_like(x)
    if need_dw:
        grads[1] = torch.empty_like(weight)
    if need_db:
        grads[2] = torch.empty_like(bias)
    if need_logits:
        grads[3:6] = [torch.empty_like(t) for t in (head_logits, qk_logits, v_logits)]
    return tuple(grads)


def _attention_logit_grads(mask_grad, head_logits, qk_logits, v_logits, head_dim, tau, seed, offset, hard):
    """Chain rule from dL/dm over the columns [3 * H * Dh] to the head, q/k-dim and v-dim logits."""
    num_heads, groups_per_head = qk_logits.shape
    flat = torch.cat([head_logits.reshape(-1), qk_logits.reshape(-1), v_logits.reshape(-1)])
    values, slopes = sample_gates(flat, tau=tau, seed=seed, offset=offset, hard=hard)
    sizes = [num_heads, num_heads * groups_per_head, num_heads * groups_per_head]
    z_head, _, z_v = (t.view(num_heads, -1) for t in values.split(sizes))
    slope_head, slope_qk, slope_v = (t.view(num_heads, -1) for t in slopes.split(sizes))
    per_group = mask_grad.view(3, num_heads, groups_per_head, head_dim // groups_per_head).sum(-1)
    # m_q = z_qk; m_v = z_head * z_v (both expanded over the group's columns)
    d_qk = per_group[0] * slope_qk
    d_v = per_group[2] * z_head * slope_v
    d_head = (per_group[2] * z_v).sum(-1, keepdim=True) * slope_head
    return [
        d_head.view_as(head_logits).to(head_logits.dtype),
        d_qk.to(qk_logits.dtype),
        d_v.to(v_logits.dtype),
    ]


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function (eager) and custom ops (torch.compile)
# ----------------------------------------------------------------------------------------------------------------


class GatedQKVFunction(torch.autograd.Function):
    """Autograd wrapper of the fused gated qkv projection (inputs already validated, dtype-unified and contiguous).

    Eager path. Receives dq, dk, dv as three tensors and reads them where they lie, so no stacked gradient is built.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, head_logits, qk_logits, v_logits, tau, seed, offset, hard, sample):
        gate_args = (int(offset), bool(hard), bool(sample))
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = _qkv_forward(x, weight, bias, head_logits, qk_logits, v_logits, tau, seed, *gate_args)
        ctx.gate_args = gate_args
        ctx.save_for_backward(x, weight, bias, head_logits, qk_logits, v_logits, tau, seed)
        return tuple(out.unbind(0))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        needs_grad = needs_grad_flags(ctx, 6, ctx.gate_args[-1])
        with torch.autocast(device_type=dq.device.type, enabled=False):
            grads = _qkv_backward(dq, dk, dv, *ctx.saved_tensors, *ctx.gate_args, needs_grad)
        return (*requested(grads, needs_grad[:3] + [needs_grad[3]] * 3), None, None, None, None, None)


_qkv_forward_op = define_custom_op(
    "gated_qkv_forward",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor head_logits, Tensor qk_logits, Tensor v_logits, "
    f"{GATE_SCHEMA}) -> Tensor",
    _qkv_forward,
    _qkv_forward_fake,
)
_qkv_backward_op = define_custom_op(
    "gated_qkv_backward",
    "(Tensor dq, Tensor dk, Tensor dv, Tensor x, Tensor weight, Tensor? bias, Tensor head_logits, Tensor qk_logits, "
    f"Tensor v_logits, {GATE_SCHEMA}, bool[] needs_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _qkv_backward,
    _qkv_backward_fake,
)


def _qkv_op_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])  # x, weight, bias, the three logits, tau, seed
    ctx.gate_args = tuple(inputs[8:])


def _qkv_op_backward(ctx, grad_packed):
    needs_grad = needs_grad_flags(ctx, 6, ctx.gate_args[-1])
    dq, dk, dv = grad_packed.unbind(0)
    grads = _qkv_backward_op(dq, dk, dv, *ctx.saved_tensors, *ctx.gate_args, needs_grad)
    return (*requested(grads, needs_grad[:3] + [needs_grad[3]] * 3), None, None, None, None, None)


_qkv_forward_op.register_autograd(_qkv_op_backward, setup_context=_qkv_op_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def gated_qkv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    head_logits: torch.Tensor,
    qk_logits: torch.Tensor,
    v_logits: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    seed: int | torch.Tensor,
    offset: int,
    hard: bool = True,
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused gated qkv projection with in-kernel gate sampling (Triton twin of ``gated_qkv_reference``).

    Args:
        x: ``[B, N, D]`` activations (fp32, fp16 or bf16; any strides).
        weight: ``[3 * H * Dh, D]`` in timm's fused layout (q rows, k rows, v rows; head-major inside each).
        bias: ``[3 * H * Dh]`` or None.
        head_logits: ``[H]``; qk_logits, v_logits: ``[H, Dh // G]`` (fp32 parameters, also with half activations).
        tau: temperature > 0. seed: Philox stream in [0, 2**31 - 1]. Either may be a 0-dim tensor (the kernels read it
            on the device, so nothing waits for the host and a new value needs no recompilation). offset: counter of
            the layer's first gate
            (the layer uses ``H + 2 * H * Dh // G`` counters). hard: straight-through 0/1 gates, else soft values.
        sample: False uses the eval decision ``1[a > 0]`` and gives the logits no gradient.

    Returns:
        q, k, v: ``[B, H, N, Dh]`` each, contiguous views of one ``[3, B, H, N, Dh]`` buffer (the layout
        ``F.scaled_dot_product_attention`` reads); ``q`` times ``m_q = dqk``, ``v`` times ``m_v = g * dv``, ``k``
        unmasked. The views must not be modified in place.

    Dtypes: under autocast for x's device, x, weight and bias run in the autocast dtype (like ``F.linear``); otherwise
    they must share one dtype. Outputs have that dtype, gradients the dtype of their input. Under the Triton
    interpreter bf16 runs on fp32 copies (its bf16 ``tl.dot`` is broken), so there q, k, v are three separate tensors.
    Under ``torch.compile`` the op is one custom op (no graph break); tau and seed are tensor inputs of the graph, so
    an annealed run with a new seed every step compiles once.
    """
    check_tensor("x", x, ndim=3, dtypes=ACTIVATION_DTYPES)
    check_tensor("head_logits", head_logits, ndim=1, dtypes=LOGIT_DTYPES)
    check_tensor("qk_logits", qk_logits, ndim=2, dtypes=LOGIT_DTYPES)
    check_tensor("v_logits", v_logits, ndim=2, dtypes=LOGIT_DTYPES)
    num_heads = head_logits.shape[0]
    if num_heads == 0 or qk_logits.shape[0] != num_heads or qk_logits.shape[1] == 0:
        raise ValueError(f"qk_logits has shape {tuple(qk_logits.shape)}, expected ({num_heads}, Dh // G) with H >= 1")
    if v_logits.shape != qk_logits.shape:
        raise ValueError(f"v_logits has shape {tuple(v_logits.shape)}, expected {tuple(qk_logits.shape)} (qk_logits)")
    check_tensor("weight", weight, ndim=2, dtypes=ACTIVATION_DTYPES)
    if weight.shape[0] == 0 or weight.shape[0] % (3 * num_heads):
        raise ValueError(f"weight has {weight.shape[0]} rows, expected 3 * H * Dh with H = {num_heads}")
    head_dim = weight.shape[0] // (3 * num_heads)
    groups_per_head = qk_logits.shape[1]
    if head_dim % groups_per_head:
        raise ValueError(f"head dim {head_dim} is not divisible by the {groups_per_head} q/k-dim gate groups per head")
    num_gates = num_heads + 2 * qk_logits.numel()
    logits = {"head_logits": head_logits, "qk_logits": qk_logits, "v_logits": v_logits}
    check_common("gated_qkv", x, weight, bias, logits, tau, seed, offset, num_gates)
    tau, seed = gate_tensors(tau, seed, x.device)
    x, weight, bias = unify_dtypes(x, weight, bias)
    out_dtype = x.dtype
    x, weight, bias = interpreter_safe(x, weight, bias)
    tensors = [t if t is None else t.contiguous() for t in (x, weight, bias, head_logits, qk_logits, v_logits)]
    if torch.compiler.is_compiling():
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = _qkv_forward_op(*tensors, tau, seed, offset, hard, sample).unbind(0)
    else:
        q, k, v = GatedQKVFunction.apply(*tensors, tau, seed, offset, hard, sample)
    if q.dtype != out_dtype:
        q, k, v = q.to(out_dtype), k.to(out_dtype), v.to(out_dtype)
    return q, k, v


__all__ = ["GatedQKVFunction", "gated_qkv"]
