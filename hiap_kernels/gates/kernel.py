"""In-kernel gates: the Triton twin of :func:`hiap_kernels.gates.reference.gumbel_sigmoid` and ``keep_probability``.

Gate ``i`` of a layer draws its uniform from Philox counter ``offset + i`` of stream ``seed`` (``tl.rand``), which
:func:`hiap_kernels.gates.reference.philox_uniform` reproduces bit for bit. Every expression below is the reference's,
evaluated in fp32 in the same order, so the hard decisions ``1[s > 0.5]`` agree with the reference exactly and the
soft values to float rounding.

The fused kernels in ``hiap_kernels.gated_linear`` and ``hiap_kernels.gated_weight`` call :func:`gate_value_and_slope`;
:func:`sample_gates` runs the same helper over a flat logit vector (the backward passes need the gate values and slopes
per gate). The objective kernel reads every gate's :func:`keep_probability`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor
from hiap_kernels.gates.reference import check_gate_arguments, seed_tensor, tau_tensor


@triton.jit
def keep_probability(logit):
    """P(open) = ``sigmoid(a)`` of each gate in fp32, the shape of fp32 ``logit``; the reference's
    ``keep_probability`` up to float rounding. 0 for a logit of -inf, 1 for +inf (no overflow to NaN)."""
    return 1.0 / (1.0 + tl.exp(-logit))


@triton.jit
def gumbel_sigmoid_soft(logit, seed, counter, tau):
    """Soft sample ``s = sigmoid((a + eps) / tau)`` of each gate; ``logit`` fp32, ``counter`` int32, same shape."""
    u = tl.rand(seed, counter)
    # Same clamp as the reference: eps = log(u) - log(1 - u) stays finite.
    u = tl.minimum(tl.maximum(u, 1e-6), 1.0 - 1e-6)
    noise = tl.log(u) - tl.log(1.0 - u)
    # IEEE division: a plain `/` lowers to an approximate divide on NVIDIA GPUs, the reference divides exactly.
    return tl.sigmoid(tl.math.div_rn(logit + noise, tau))


@triton.jit
def gate_value_and_slope(logit, seed, counter, tau, HARD: tl.constexpr, SAMPLE: tl.constexpr):
    """Forward value ``z`` and straight-through slope ``dz/da`` of each gate (fp32, shape of ``logit``).

    SAMPLE and HARD: z = 1[s > 0.5], slope ds/da = s (1 - s) / tau (straight-through estimator).
    SAMPLE, soft:    z = s, same slope.
    not SAMPLE:      the deterministic eval decision z = 1[a > 0]; no gradient reaches the logits (slope 0).
    """
    if SAMPLE:
        soft = gumbel_sigmoid_soft(logit, seed, counter, tau)
        slope = tl.math.div_rn(soft * (1.0 - soft), tau)
        if HARD:
            # A NaN logit gives a NaN gate, as the reference's straight-through expression does (1[NaN > 0.5] would
            # silently close it): one NaN policy on both paths.
            value = tl.where(soft == soft, (soft > 0.5).to(tl.float32), soft)
        else:
            value = soft
    else:
        value = (logit > 0.0).to(tl.float32)
        slope = tl.zeros_like(value)
    return value, slope


@triton.jit(do_not_specialize=["offset"])
def _sample_gates_kernel(
    logits_ptr,
    values_ptr,
    slopes_ptr,
    num_gates,
    seed_ptr,
    offset,
    tau_ptr,
    HARD: tl.constexpr,
    SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Read on the device: a new step's seed or temperature is a new value, not a new compilation.
    seed = tl.load(seed_ptr)
    tau = tl.load(tau_ptr).to(tl.float32)
    gate = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = gate < num_gates
    # [BLOCK]
    logit = tl.load(logits_ptr + gate, mask=valid, other=0.0).to(tl.float32)
    value, slope = gate_value_and_slope(logit, seed, offset + gate, tau, HARD, SAMPLE)
    tl.store(values_ptr + gate, value, mask=valid)
    tl.store(slopes_ptr + gate, slope, mask=valid)


def sample_gates(
    logits: torch.Tensor, *, tau: float | torch.Tensor, seed: int | torch.Tensor, offset: int, hard: bool = True,
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate values and straight-through slopes for a logit tensor, computed by the in-kernel sampler.

    Args:
        logits: float tensor of any shape (gate ``i`` is ``logits.flatten()[i]`` and uses counter ``offset + i``).
        tau: temperature > 0, a number or a 0-dim float tensor. seed: Philox stream in [0, 2**31 - 1], an int or a 0-dim
            integer tensor (tensors are read by the kernel: no host synchronisation). offset: first counter.
        hard: hard 0/1 values (straight-through) or soft values. sample: False gives the eval decision ``1[a > 0]``.

    Returns:
        values, slopes: fp32 ``[logits.numel()]``; ``values`` equals :func:`hiap_kernels.gates.reference.gumbel_sigmoid`
        (``1[a > 0]`` when not sampling) and ``slopes`` its derivative w.r.t. the logit (zeros when not sampling).
        ``values`` carries the straight-through gradient to ``logits`` (``d values / d logits = slopes``), so the
        sampler drops into a model as ``gumbel_sigmoid`` does; ``slopes`` has no gradient. A ``torch.library``
        custom op: one node in a compiled graph.
    """
    check_tensor("logits", logits)
    check_gate_arguments(tau, seed, offset, logits.numel())
    runtime.require_triton_device("sample_gates", logits, "hiap_kernels.gumbel_sigmoid")
    flat = logits.reshape(-1)
    return _sample_gates(flat, tau_tensor(tau).to(flat.device), seed_tensor(seed).to(flat.device), offset,
                         bool(hard), bool(sample))


@torch.library.custom_op(
    "hiap_kernels::sample_gates", mutates_args=(),
    schema="(Tensor logits, Tensor tau, Tensor seed, SymInt offset, bool hard, bool sample) -> (Tensor, Tensor)",
)
def _sample_gates(logits, tau, seed, offset, hard, sample):
    flat = logits.contiguous()
    values = runtime.empty(flat.numel(), torch.float32, flat.device)
    slopes = runtime.empty(flat.numel(), torch.float32, flat.device)
    if flat.numel() == 0:
        return values, slopes
    block = 128
    grid = (triton.cdiv(flat.numel(), block),)
    _sample_gates_kernel[grid](
        flat, values, slopes, flat.numel(), seed, offset, tau, HARD=hard, SAMPLE=sample, BLOCK=block,
    )
    return values, slopes


@_sample_gates.register_fake
def _sample_gates_fake(logits, tau, seed, offset, hard, sample):
    return logits.new_empty(logits.shape, dtype=torch.float32), logits.new_empty(logits.shape, dtype=torch.float32)


def _sample_gates_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.logit_dtype = inputs[0].dtype


def _sample_gates_backward(ctx, grad_values, grad_slopes):
    (slopes,) = ctx.saved_tensors
    grad_logits = None if grad_values is None else (grad_values * slopes).to(ctx.logit_dtype)
    return grad_logits, None, None, None, None, None


_sample_gates.register_autograd(_sample_gates_backward, setup_context=_sample_gates_setup_context)
