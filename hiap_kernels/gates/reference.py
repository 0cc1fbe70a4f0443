"""The gate distribution in plain PyTorch: a twin of Triton's counter-based generator (``tl.rand``), the
Gumbel-Sigmoid sample built on it, the keep probability, and the gate values of one layer.

Gate sampling happens inside the Triton kernels with ``tl.rand(seed, offset)`` (``kernel.py``). The reference path must draw the very
same uniforms for the same ``(seed, offset)`` so that both paths can be compared in training mode, and so that a run
keeps its gates when it switches backend. This module reproduces Philox-4x32-10 and Triton's uint32 -> float
conversion bit for bit with int64 tensor arithmetic (no triton import, runs on any device).

A gate with logit ``a`` opens with probability ``sigmoid(a)`` (:func:`keep_probability`) at every temperature; the cost
model and the objective read that probability, the gated layers the sampled values (:func:`gate_values`).

Gate layout of one layer, flattened in this order; gate ``i`` draws its noise from Philox counter ``offset + i``:
    attention: head gates [H], then q/k-dim gates [H, Dh // G] row-major, then v-dim gates [H, Dh // G]
    FFN:       block gate [1], then neuron gates [F // G]
with ``G`` the micro-gate group size: column ``j`` of a head (or neuron ``j``) uses micro gate ``j // G``.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_ROUNDS = 10
# Largest float32 scale such that (2**31 - 1) * scale < 1.0 after rounding; Triton's own constant.
_UNIFORM_SCALE = 4.6566127342e-10
MAX_SEED = 2**31 - 1
# Highest counter a layer may use: offset + gate index must stay a non-negative int32 (tl.rand's counter).
MAX_COUNTER = 2**31 - 1


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and a uint32-valued int64 tensor ``b``.

    The full product needs 64 unsigned bits, which int64 cannot hold, so ``b`` is split into 16-bit halves.
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    prod_lo = a * b_lo  # < 2**48
    prod_hi = a * b_hi  # < 2**48
    hi = (prod_hi + (prod_lo >> 16)) >> 16
    lo = (((prod_hi & 0xFFFF) << 16) + prod_lo) & _MASK32
    return hi & _MASK32, lo


def _philox_uniform_eager(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` with int64 tensor arithmetic; ``seed`` a 0-dim integer tensor (any device)."""
    c0 = offsets.to(torch.int64) & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed = seed.to(device=offsets.device, dtype=torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=offsets.device)


# Opaque to torch.compile: the ten unrolled rounds reuse every intermediate several times, and inductor's lowering
# re-walks such chains once per use, which is exponential in the rounds (compiling one gated layer did not finish in
# 5 minutes). As a custom op the sampler stays in the graph, without a graph break, and runs eagerly inside it. The
# seed is a tensor, so a new seed every step is a new value of the same graph, not a recompilation.
@torch.library.custom_op("hiap_kernels::philox_uniform", mutates_args=(), schema="(Tensor seed, Tensor offsets) -> Tensor")
def _philox_uniform_op(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _philox_uniform_eager(seed, offsets)


@_philox_uniform_op.register_fake
def _philox_uniform_fake(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(offsets, dtype=torch.float32)


def philox_uniform(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) equal to ``tl.rand(seed, offsets)`` in a Triton kernel.

    Args:
        seed: integer in [0, 2**31 - 1], or a 0-dim integer tensor holding one (its value is not read back).
        offsets: integer tensor of any shape with values in [0, 2**31 - 1] (the Philox counters).

    Returns:
        float32 tensor of ``offsets.shape`` on ``offsets.device``.
    """
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be an integer tensor, got {getattr(offsets, 'dtype', type(offsets).__name__)}")
    return _philox_uniform_op(seed_tensor(seed), offsets)


def seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """A Philox stream as a 0-dim int64 tensor: a Python int is range-checked; a tensor is checked for shape and
    dtype only (reading its value would wait for the device; ``hiap``'s gate schedule checks values when set)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed must be an int or a one-element integer tensor, got {seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(())
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64)


def tau_tensor(tau: float | torch.Tensor) -> torch.Tensor:
    """A temperature as a 0-dim float32 tensor: a Python number must be finite and > 0; a tensor is checked for
    shape and dtype only (its value is checked where it is set, without a device round trip here)."""
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1 or not tau.dtype.is_floating_point:
            raise TypeError(f"tau must be a number or a one-element float tensor, got {tau.dtype} {tuple(tau.shape)}")
        return tau.reshape(()).float()
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0 < tau < float("inf"):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    return torch.tensor(float(tau), dtype=torch.float32)


# Uniforms are clamped away from 0 and 1 so that the logistic noise log(u) - log(1 - u) stays finite in fp32.
UNIFORM_EPS = 1e-6


def logistic_noise(seed: int | torch.Tensor, offset: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Logistic noise ``log(u) - log(1 - u)`` for gates ``offset .. offset + count - 1`` of the Philox stream ``seed``.

    Returns:
        float32 tensor ``[count]``. Gate ``i`` of a layer always uses counter ``offset + i``, in Triton and here.
    """
    counters = torch.arange(offset, offset + count, device=device, dtype=torch.int64)
    u = philox_uniform(seed, counters).clamp(UNIFORM_EPS, 1.0 - UNIFORM_EPS)
    # log(1 - u) rather than log1p(-u): the Triton kernels evaluate exactly this expression.
    return torch.log(u) - torch.log(1.0 - u)


def gumbel_sigmoid(
    logits: torch.Tensor, tau: float | torch.Tensor, seed: int | torch.Tensor, offset: int, hard: bool = True
) -> torch.Tensor:
    """Binary-concrete gate sample with the straight-through estimator (plain-PyTorch reference).

    ``s = sigmoid((a + eps) / tau)`` with ``eps`` from :func:`logistic_noise` over ``logits.flatten()``;
    returns the hard value ``1[s > 0.5]`` with the gradient of ``s`` when ``hard`` (P(open) = sigmoid(a) for every
    tau), else ``s``.

    Args:
        logits: float tensor of any shape (gate ``i`` is ``logits.flatten()[i]``).
        tau: temperature > 0 (a number, or a 0-dim float tensor: a new value then needs no recompilation).
        seed, offset: Philox stream (an int or a 0-dim integer tensor) and first counter.

    Returns:
        tensor of ``logits.shape`` and dtype.
    """
    check_gate_arguments(tau, seed, offset, logits.numel())
    noise = logistic_noise(seed, offset, logits.numel(), logits.device).view_as(logits)
    soft = torch.sigmoid((logits.float() + noise) / tau)
    if not hard:
        return soft.to(logits.dtype)
    hard_value = (soft > 0.5).to(soft.dtype)
    # This association is exact in floating point ((1 - s) + s == 1 and (0 - s) + s == 0 for s on the matching side
    # of 0.5), so the forward value is exactly 0 or 1 as in the kernels; hard + s - s would leave 0.99999994.
    return ((hard_value - soft.detach()) + soft).to(logits.dtype)


def keep_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(open) = ``sigmoid(a)`` of each gate: the probability that a hard :func:`gumbel_sigmoid` sample opens it, at
    every temperature. ``logits`` of any shape; returns that shape and dtype, differentiable."""
    return torch.sigmoid(logits)


def gate_values(
    logits: torch.Tensor, *, tau: float | torch.Tensor, seed: int | torch.Tensor, offset: int, hard: bool = True,
    sample: bool = True,
) -> torch.Tensor:
    """Gate values for a flat logit vector ``[n]``: sampled (:func:`gumbel_sigmoid`, training) or the deterministic
    decision ``1[a > 0]`` (eval; no gradient to the logits). Returns ``[n]`` in the logits' dtype."""
    if sample:
        return gumbel_sigmoid(logits, tau, seed, offset, hard)
    return (logits > 0).to(logits.dtype)


def attention_gate_values(
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
    """Sample (or decide) the head ``[H]``, q/k-dim ``[H, Dh//G]`` and v-dim ``[H, Dh//G]`` gates of one layer, in
    the layout's counter order (:func:`gate_values` on the three concatenated)."""
    flat = torch.cat([head_logits.reshape(-1), qk_logits.reshape(-1), v_logits.reshape(-1)])
    z = gate_values(flat, tau=tau, seed=seed, offset=offset, hard=hard, sample=sample)
    num_heads, groups = qk_logits.shape
    z_head, z_qk, z_v = torch.split(z, [num_heads, num_heads * groups, num_heads * groups])
    return z_head, z_qk.view(num_heads, groups), z_v.view(num_heads, groups)


def attention_column_masks(
    z_head: torch.Tensor, z_qk: torch.Tensor, z_v: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective column masks ``m_q = dqk`` and ``m_v = g * dv``, both ``[H, Dh]`` (micro gates expanded over groups),
    from gate values ``z_head [H]``, ``z_qk`` and ``z_v [H, Dh//G]``."""
    group = head_dim // z_qk.shape[1]
    m_q = z_qk.repeat_interleave(group, dim=1)
    m_v = z_head[:, None] * z_v.repeat_interleave(group, dim=1)
    return m_q, m_v


def ffn_gate_values(
    block_logit: torch.Tensor,
    neuron_logits: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    seed: int | torch.Tensor,
    offset: int,
    hard: bool = True,
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (or decide) the FFN block gate ``[1]`` and neuron gates ``[F//G]`` of one layer, block first."""
    flat = torch.cat([block_logit.reshape(-1), neuron_logits.reshape(-1)])
    z = gate_values(flat, tau=tau, seed=seed, offset=offset, hard=hard, sample=sample)
    return z[:1], z[1:]


def ffn_neuron_mask(z_block: torch.Tensor, z_neuron: torch.Tensor, hidden: int) -> torch.Tensor:
    """Effective neuron mask ``m = b * c``, ``[F]`` with ``F = hidden``, from gate values ``z_block [1]`` and
    ``z_neuron [F//G]``."""
    group = hidden // z_neuron.shape[0]
    return z_block * z_neuron.repeat_interleave(group)


def check_gate_arguments(tau, seed, offset: int, num_gates: int) -> None:
    """ValueError / TypeError unless tau > 0, seed in [0, 2**31 - 1] (Python values; tensors: shape and dtype) and the
    counters up to ``offset + num_gates - 1`` fit int32."""
    tau_tensor(tau)
    seed_tensor(seed)
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if offset + num_gates - 1 > MAX_COUNTER:
        raise ValueError(f"offset {offset} + {num_gates} gates passes the int32 Philox counter range (2**31 - 1)")
