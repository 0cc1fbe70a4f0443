"""Host-side plumbing both fused gated ops share: argument checks, dtype handling and the custom-op / autograd glue.

Eager calls go through ``torch.autograd.Function`` subclasses; under ``torch.compile`` the same launchers run as
custom ops (``hiap_kernels::gated_qkv_forward`` ...) with fake shapes and a registered autograd formula, so a compiled
model keeps one graph.
"""

from __future__ import annotations

import torch

from hiap_kernels.common.runtime import FLOAT_DTYPES, check_tensor, interpreter_active, require_triton_device
from hiap_kernels.gates.reference import check_gate_arguments, seed_tensor, tau_tensor

ACTIVATION_DTYPES = FLOAT_DTYPES
LOGIT_DTYPES = (*FLOAT_DTYPES, torch.float64)

# tau and seed are 0-dim tensors the kernels read on the device: a new temperature or seed every step is a new value
# of the same compiled graph, never a recompilation. The offset is fixed per layer.
GATE_SCHEMA = "Tensor tau, Tensor seed, SymInt offset, bool hard, bool sample"


def dummy_pointer(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for a pointer argument the kernel never reads (no bias, no stored pre-activation)."""
    return torch.empty(1, dtype=dtype, device=device)


def not_requested(device: torch.device) -> torch.Tensor:
    """Placeholder for a gradient nobody asked for: custom ops return tensors, never None."""
    return torch.empty(0, dtype=torch.float32, device=device)


def define_custom_op(name: str, schema: str, impl, fake):
    """``hiap_kernels::<name>`` with its fake (shape-only) implementation registered."""
    op = torch.library.custom_op(f"hiap_kernels::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def requested(grads, needs_grad):
    """None for the placeholders of gradients that were not requested."""
    return [g if need else None for g, need in zip(grads, needs_grad)]


def needs_grad_flags(ctx, num_tensor_inputs, sample):
    """[x, weight, bias, any logit] flags for the backward launchers; no logit gradient in eval mode."""
    needs = ctx.needs_input_grad
    return [needs[0], needs[1], needs[2], any(needs[3:num_tensor_inputs]) and sample]


def unify_dtypes(x, weight, bias):
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


def interpreter_safe(x, weight, bias):
    """bf16 ``tl.dot`` gives garbage in the Triton interpreter, so there bf16 inputs run on fp32 copies."""
    if x.dtype == torch.bfloat16 and interpreter_active():
        return x.float(), weight.float(), None if bias is None else bias.float()
    return x, weight, bias


def check_common(op, x, weight, bias, logits: dict, tau, seed, offset, num_gates):
    """The checks both ops share: tensors, devices, feature counts, gate arguments and where Triton can run."""
    check_tensor("x", x, dtypes=ACTIVATION_DTYPES)
    device = x.device
    check_tensor("weight", weight, ndim=2, dtypes=ACTIVATION_DTYPES, device=device)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=ACTIVATION_DTYPES, device=device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},) from weight")
    for name, tensor in logits.items():
        check_tensor(name, tensor, dtypes=LOGIT_DTYPES, device=device)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight {tuple(weight.shape)} expects {weight.shape[1]}")
    check_gate_arguments(tau, seed, offset, num_gates)
    require_triton_device(op, x, f"hiap_kernels.gated_linear.reference.{op}_reference")


def gate_tensors(tau, seed, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """tau (float32) and seed (int64) as 0-dim tensors on ``device`` (no copy when they are there already)."""
    return tau_tensor(tau).to(device), seed_tensor(seed).to(device)
