"""``gated_fc1``: launchers, autograd.Function (eager), custom ops (torch.compile) and the public function.

Kernels in ``fc1_kernels.py``; shared plumbing in ``interface.py``; the math is explained in the package docstring.
"""

from __future__ import annotations

import torch
import triton

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor, dot_precision, interpreter_active
from hiap_kernels.gated_linear.fc1_kernels import (
    POINTWISE_BLOCKS_GPU,
    POINTWISE_BLOCKS_INTERPRETER,
    fc1_backward_pointwise_kernel,
    fc1_forward_kernel,
)
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
from hiap_kernels.gates.kernel import sample_gates

# ----------------------------------------------------------------------------------------------------------------
# Launchers (every buffer comes from runtime.empty, so tests can poison them)
# ----------------------------------------------------------------------------------------------------------------


def _fc1_forward(x, weight, bias, block_logit, neuron_logits, tau, seed, offset, hard, sample, approximate, store_pre):
    """Launch the fused forward on ``x [M, D]``; returns (hidden [M, F], pre-activation [M, F] or an empty tensor)."""
    rows, dim = x.shape
    hidden_dim = weight.shape[0]
    out = runtime.empty((rows, hidden_dim), x.dtype, x.device)
    pre = runtime.empty((rows, hidden_dim), x.dtype, x.device) if store_pre else x.new_empty(0)
    if rows == 0:
        return out, pre
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(hidden_dim, meta["BLOCK_N"]),)  # noqa: E731
    fc1_forward_kernel[grid](
        x,
        weight,
        bias if bias is not None else dummy_pointer(x.device, x.dtype),
        block_logit,
        neuron_logits,
        out,
        pre if store_pre else dummy_pointer(x.device, x.dtype),
        rows,
        hidden_dim,
        dim,
        seed,
        offset,
        tau,
        GROUP=hidden_dim // neuron_logits.shape[0],
        HARD=hard,
        SAMPLE=sample,
        HAS_BIAS=bias is not None,
        APPROXIMATE_TANH=approximate == "tanh",
        STORE_PRE=store_pre,
        INPUT_PRECISION=dot_precision(x.dtype),
    )
    return out, pre


def _fc1_forward_fake(
    x, weight, bias, block_logit, neuron_logits, tau, seed, offset, hard, sample, approximate, store_pre
):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if store_pre else (0,))


def _fc1_backward(
    grad_hidden, x, weight, bias, block_logit, neuron_logits, pre,
    tau, seed, offset, hard, sample, approximate, needs_grad,
):  # fmt: skip
    """Gradients (dx [M, D], dW, db, d block_logit, d neuron_logits); ``needs_grad`` = [x, weight, bias, logits]."""
    need_dx, need_dw, need_db, need_logits = needs_grad
    need_logits = need_logits and sample
    rows, dim = x.shape
    hidden_dim = weight.shape[0]
    group = hidden_dim // neuron_logits.shape[0]
    grad_hidden = grad_hidden.reshape(rows, hidden_dim).to(x.dtype).contiguous()

    block_m, block_n, warps = POINTWISE_BLOCKS_INTERPRETER if interpreter_active() else POINTWISE_BLOCKS_GPU
    row_blocks = triton.cdiv(rows, block_m)
    grad_pre = runtime.empty((rows, hidden_dim), x.dtype, x.device)
    mask_grad_partial = runtime.empty((row_blocks, hidden_dim), torch.float32, x.device)
    bias_grad_partial = runtime.empty((row_blocks, hidden_dim), torch.float32, x.device)
    if rows > 0:
        fc1_backward_pointwise_kernel[(row_blocks, triton.cdiv(hidden_dim, block_n))](
            grad_hidden, pre, block_logit, neuron_logits, grad_pre, mask_grad_partial, bias_grad_partial,
            rows, hidden_dim, seed, offset, tau,
            GROUP=group, HARD=hard, SAMPLE=sample, APPROXIMATE_TANH=approximate == "tanh",
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip

    grads = [not_requested(x.device) for _ in range(5)]
    # Once d pre exists the two weight-side GEMMs have nothing left to fuse, so the vendor GEMM does them.
    if need_dx:
        grads[0] = grad_pre @ weight
    if need_dw:
        grads[1] = grad_pre.t() @ x
    if need_db:
        grads[2] = bias_grad_partial.sum(0).to(bias.dtype)
    if need_logits:
        grads[3:5] = _ffn_logit_grads(
            mask_grad_partial.sum(0), block_logit, neuron_logits, group, tau, seed, offset, hard
        )
    return tuple(grads)


def _fc1_backward_fake(
    grad_hidden, x, weight, bias, block_logit, neuron_logits, pre,
    tau, seed, offset, hard, sample, approximate, needs_grad,
):  # fmt: skip
    need_dx, need_dw, need_db, need_logits = needs_grad
    grads = [not_requested(x.device) for _ in range(5)]
    if need_dx:
        grads[0] = torch.empty_like(x)
    if need_dw:
        grads[1] = torch.empty_like(weight)
    if need_db:
        grads[2] = torch.empty_like(bias)
    if need_logits and sample:
        grads[3:5] = [torch.empty_like(block_logit), torch.empty_like(neuron_logits)]
    return tuple(grads)


def _ffn_logit_grads(mask_grad, block_logit, neuron_logits, group, tau, seed, offset, hard):
    """Chain rule from dL/dm over the hidden columns [F] to the block logit and the neuron logits."""
    flat = torch.cat([block_logit.reshape(-1), neuron_logits.reshape(-1)])
    values, slopes = sample_gates(flat, tau=tau, seed=seed, offset=offset, hard=hard)
    per_group = mask_grad.view(-1, group).sum(-1)
    # m = z_block * z_neuron (expanded over the group's columns)
    d_neuron = per_group * values[:1] * slopes[1:]
    d_block = (per_group * values[1:]).sum().reshape(1) * slopes[:1]
    return [d_block.view_as(block_logit).to(block_logit.dtype), d_neuron.view_as(neuron_logits).to(neuron_logits.dtype)]


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function (eager) and custom ops (torch.compile)
# ----------------------------------------------------------------------------------------------------------------


class GatedFC1Function(torch.autograd.Function):
    """Autograd wrapper of the fused gated fc1 + GELU (inputs already validated, dtype-unified and contiguous).

    Backward memory: the pre-activation ``x @ W^T + b`` is stored in the activation dtype (one [M, F] tensor, half of
    what the unfused reference keeps: GELU's input and output). Recomputing it instead would cost a third GEMM of the
    fc1 size in every backward; the FFN hidden activations are kept anyway by fc2, so the extra memory is the cheaper
    side of the trade.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, block_logit, neuron_logits, tau, seed, offset, hard, sample, approximate):
        gate_args = (int(offset), bool(hard), bool(sample))
        store_pre = any(ctx.needs_input_grad[:5])
        x2d = x.reshape(-1, x.shape[-1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            hidden, pre = _fc1_forward(
                x2d, weight, bias, block_logit, neuron_logits, tau, seed, *gate_args, approximate, store_pre
            )
        ctx.gate_args = gate_args
        ctx.approximate = approximate
        ctx.save_for_backward(x2d, weight, bias, block_logit, neuron_logits, pre, tau, seed)
        return hidden.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_hidden):
        needs_grad = needs_grad_flags(ctx, 5, ctx.gate_args[-1])
        with torch.autocast(device_type=grad_hidden.device.type, enabled=False):
            grads = _fc1_backward(grad_hidden, *ctx.saved_tensors, *ctx.gate_args, ctx.approximate, needs_grad)
        dx, dw, db, d_block, d_neuron = requested(grads, needs_grad[:3] + [needs_grad[3]] * 2)
        if dx is not None:
            dx = dx.view(*grad_hidden.shape[:-1], dx.shape[-1])
        return (dx, dw, db, d_block, d_neuron, None, None, None, None, None, None)


_fc1_forward_op = define_custom_op(
    "gated_fc1_forward",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor block_logit, Tensor neuron_logits, "
    f"{GATE_SCHEMA}, str approximate, bool store_pre) -> (Tensor, Tensor)",
    _fc1_forward,
    _fc1_forward_fake,
)
_fc1_backward_op = define_custom_op(
    "gated_fc1_backward",
    "(Tensor grad_hidden, Tensor x, Tensor weight, Tensor? bias, Tensor block_logit, Tensor neuron_logits, "
    f"Tensor pre, {GATE_SCHEMA}, str approximate, bool[] needs_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fc1_backward,
    _fc1_backward_fake,
)


def _fc1_op_setup_context(ctx, inputs, output):
    # x, weight, bias, both logits, the pre-activation, tau, seed: the order _fc1_backward takes them in.
    ctx.save_for_backward(*inputs[:5], output[1], inputs[5], inputs[6])
    ctx.gate_args = tuple(inputs[7:10])
    ctx.approximate = inputs[10]


def _fc1_op_backward(ctx, grad_hidden, _grad_pre):
    needs_grad = needs_grad_flags(ctx, 5, ctx.gate_args[-1])
    grads = _fc1_backward_op(grad_hidden, *ctx.saved_tensors, *ctx.gate_args, ctx.approximate, needs_grad)
    return (*requested(grads, needs_grad[:3] + [needs_grad[3]] * 2), None, None, None, None, None, None, None)


_fc1_forward_op.register_autograd(_fc1_op_backward, setup_context=_fc1_op_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def gated_fc1(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block_logit: torch.Tensor,
    neuron_logits: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    seed: int | torch.Tensor,
    offset: int,
    hard: bool = True,
    sample: bool = True,
    approximate: str = "none",
) -> torch.Tensor:
    """Fused gated FFN hidden layer ``GELU(x @ W^T + b) * (z_block * z_neuron)``, twin of ``gated_fc1_reference``.

    Args:
        x: ``[..., D]`` activations (fp32, fp16 or bf16; any strides).
        weight: ``[F, D]``; bias: ``[F]`` or None.
        block_logit: ``[1]``; neuron_logits: ``[F // G]`` (fp32 parameters, also with half activations).
        tau, seed, offset, hard, sample: as in :func:`gated_qkv` (the layer uses ``1 + F // G`` counters).
        approximate: GELU flavour, ``"none"`` (erf) or ``"tanh"``.

    Returns:
        ``[..., F]`` in the activation dtype; dtypes, autocast and ``torch.compile`` as in :func:`gated_qkv`.
    """
    check_tensor("x", x, dtypes=ACTIVATION_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., D]")
    check_tensor("block_logit", block_logit, dtypes=LOGIT_DTYPES)
    check_tensor("neuron_logits", neuron_logits, ndim=1, dtypes=LOGIT_DTYPES)
    if block_logit.numel() != 1:
        raise ValueError(f"block_logit must hold one logit, got shape {tuple(block_logit.shape)}")
    check_tensor("weight", weight, ndim=2, dtypes=ACTIVATION_DTYPES)
    hidden_dim = weight.shape[0]
    if neuron_logits.shape[0] == 0 or hidden_dim % neuron_logits.shape[0]:
        raise ValueError(f"FFN width {hidden_dim} is not divisible by the {neuron_logits.shape[0]} neuron gate groups")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    logits = {"block_logit": block_logit, "neuron_logits": neuron_logits}
    check_common("gated_fc1", x, weight, bias, logits, tau, seed, offset, 1 + neuron_logits.shape[0])
    tau, seed = gate_tensors(tau, seed, x.device)
    x, weight, bias = unify_dtypes(x, weight, bias)
    out_dtype = x.dtype
    x, weight, bias = interpreter_safe(x, weight, bias)
    tensors = [t if t is None else t.contiguous() for t in (x, weight, bias, block_logit, neuron_logits)]
    if torch.compiler.is_compiling():
        store_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        tensors[0] = tensors[0].reshape(-1, x.shape[-1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            hidden, _ = _fc1_forward_op(*tensors, tau, seed, offset, hard, sample, approximate, store_pre)
        hidden = hidden.view(*x.shape[:-1], weight.shape[0])
    else:
        hidden = GatedFC1Function.apply(*tensors, tau, seed, offset, hard, sample, approximate)
    return hidden.to(out_dtype)


__all__ = ["GatedFC1Function", "gated_fc1"]
