"""Gate sampling conventions, the one deterministic decision function, and the temperature schedule.

Sampling itself (Philox noise, Gumbel-Sigmoid with the straight-through estimator) lives in
``hiap_kernels.sampling`` / ``hiap_kernels.gated_linear_reference`` so the Triton kernels and the reference path
share it bit for bit. This module decides *which* stream a layer uses and *what is kept* at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hiap_kernels.sampling import MAX_SEED, gumbel_sigmoid, logistic_noise

__all__ = [
    "GateState",
    "attention_decisions",
    "ffn_decisions",
    "gate_offset",
    "gumbel_sigmoid",
    "logistic_noise",
    "step_seed",
    "temperature_at",
    "top_k_mask",
]

# Each gated module owns a window of this many Philox counters; one layer has far fewer gates than this.
GATES_PER_MODULE = 2**20


def gate_offset(layer_index: int, kind: str) -> int:
    """First Philox counter of a module's gates: attention of layer l at 2l * 2^20, its FFN at (2l + 1) * 2^20."""
    slot = 2 * layer_index + (0 if kind == "attention" else 1)
    offset = slot * GATES_PER_MODULE
    if offset + GATES_PER_MODULE > MAX_SEED:
        raise ValueError(f"layer index {layer_index} is too large for the gate counter space")
    return offset


def step_seed(base_seed: int, step: int) -> int:
    """Seed of training step ``step``: a splitmix64 hash of (base seed, step), reduced to [0, 2^31 - 1).

    Deterministic, so a resumed run and every DDP rank draw the same gates for the same step.
    """
    z = (base_seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z % MAX_SEED


@dataclass
class GateState:
    """What every gated module of one model reads at forward time (shared by reference, not copied)."""

    tau: float = 2.0
    seed: int = 0
    hard: bool = True


def temperature_at(step: int, total_steps: int, tau0: float = 2.0, tau_min: float = 0.5) -> float:
    """``tau(t) = max(tau_min, tau0 * (tau_min / tau0) ** (t / T))``: exponential anneal from tau0 to tau_min."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return max(tau_min, tau0 * (tau_min / tau0) ** progress)


def top_k_mask(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries along the last dim (ties broken by index; ``k`` may be 0).

    ``k`` is an int or a tensor broadcastable to ``logits.shape[:-1]``.
    """
    order = torch.argsort(logits, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(logits.shape[-1], device=logits.device).expand_as(order))
    k = torch.as_tensor(k, device=logits.device)
    return rank < (k[..., None] if k.dim() > 0 else k)


def minimum_count(fraction: float, total: int) -> int:
    """``ceil(fraction * total)``, guarded against float noise (0.125 * 64 must give 8, not 9)."""
    return min(total, math.ceil(fraction * total - 1e-9))


@torch.no_grad()
def attention_decisions(
    head_logits: torch.Tensor,
    qk_logits: torch.Tensor,
    v_logits: torch.Tensor,
    *,
    min_heads: int,
    min_dim_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deterministic keep decision of one attention layer (eval mode, MAC count and extraction all use this).

    ``z = 1[a > 0]``, then the hard feasibility minimums: the ``min_heads`` highest head logits are kept, and in
    every head the top ``ceil(min_dim_fraction * groups)`` q/k groups and v groups. Branch-free: where enough gates are
    open the top-k are among them already.

    Returns:
        keep_head ``[H]``, keep_qk ``[H, G]``, keep_v ``[H, G]`` (bool).
    """
    num_heads, groups = qk_logits.shape
    keep_head = (head_logits > 0) | top_k_mask(head_logits, min(min_heads, num_heads))
    dims_min = minimum_count(min_dim_fraction, groups)
    keep_qk = (qk_logits > 0) | top_k_mask(qk_logits, dims_min)
    keep_v = (v_logits > 0) | top_k_mask(v_logits, dims_min)
    return keep_head, keep_qk, keep_v


@torch.no_grad()
def ffn_decisions(
    block_logit: torch.Tensor, neuron_logits: torch.Tensor, *, min_neuron_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic keep decision of one FFN block: block ``[1]`` and neurons ``[F // G]`` (bool).

    A kept block keeps at least ``ceil(min_neuron_fraction * groups)`` neuron groups; blocks themselves have no
    minimum (a whole FFN may go).
    """
    keep_block = block_logit > 0
    keep_neuron = (neuron_logits > 0) | top_k_mask(neuron_logits, minimum_count(min_neuron_fraction, neuron_logits.numel()))
    return keep_block, keep_neuron
