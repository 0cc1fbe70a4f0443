"""Plain-PyTorch twin of ``gate_objective``: the gate terms of the HiAP loss from every layer's logits at once.

The terms (HiAP's cost model, budget and feasibility), over L layers of H heads with G q/k and G v groups each and N neuron groups:

    p = sigmoid(a)                                          keep probabilities (fp32, ``hiap_kernels.gates``)
    E[MACs] = static + U_qk * hg * sum_lh p_h alive_lh sum_g p_qk   alive_lh = 1 - prod_g (1 - p_v)   (fp64)
                     + U_v  * hg * sum_lh p_h sum_g p_v
                     + U_n  * ng * sum_l  p_b sum_n p_n
    macro   = hg G (U_qk + U_v) sum p_h + ng N U_n sum p_b
    decided = the MACs the hard decision keeps (what extraction keeps; no gradient)
    budget  = penalty: (lambda_macro macro + lambda_micro (E - static)) / dense
              target:  l1 gap + l2 gap^2, gap = decided / dense - target, the gradient E's (straight-through); each
                       ascending call first moves l1 += lr gap, l2 += lr gap^2 (in place), then resets l1 to 0 where
                       it has the other sign than the gap
    feasibility = w [sum_l relu(min(h_min, H) - sum_h p_h)^2 + sum_lh p_h (relu(f - mean p_qk)^2 + relu(f - mean p_v)^2)
                     + sum_l p_b relu(f_n - mean p_n)^2]

Logits come as one flat tensor, kind by kind and layer by layer: head ``[L, H]``, qk ``[L, H, G]``, v ``[L, H, G]``,
block ``[L, 1]``, neuron ``[L, N]`` (``GateLayout.split``). No Triton import: ``hiap``'s cost model and losses are
built from these functions, and the kernel is tested against them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hiap_kernels.gates.reference import keep_probability


class GateLayout(NamedTuple):
    """Shape of a model's stacked gates and the hard minimums of its decision (all ints)."""

    layers: int
    heads: int
    groups: int  # q/k groups per head (= v groups)
    neuron_groups: int
    head_group: int  # head dims per q/k or v gate
    neuron_group: int  # FFN neurons per neuron gate
    min_heads: int  # heads kept at least per layer (already min(min_heads, heads))
    dims_min: int  # q/k and v groups kept at least per kept head
    neurons_min: int  # neuron groups kept at least per kept FFN block

    @property
    def numel(self) -> int:
        """Logits of the whole model."""
        return self.layers * (self.heads * (1 + 2 * self.groups) + 1 + self.neuron_groups)

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views head ``[L, H]``, qk ``[L, H, G]``, v ``[L, H, G]``, block ``[L, 1]``, neuron ``[L, N]`` of ``flat``."""
        L, H, G, N = self.layers, self.heads, self.groups, self.neuron_groups
        shapes = [(L, H), (L, H, G), (L, H, G), (L, 1), (L, N)]
        sizes = [int(torch.Size(shape).numel()) for shape in shapes]
        return tuple(part.view(shape) for part, shape in zip(flat.split(sizes), shapes))


class ObjectiveConstants(NamedTuple):
    """The numbers the gate terms read besides the logits. Unit costs are MACs of one kept q/k dim, v dim and neuron."""

    unit_qk: float
    unit_v: float
    unit_neuron: float
    static: float
    dense: float
    lambda_macro: float
    lambda_micro: float
    lagrangian_lr: float
    feasibility_weight: float
    min_dim_fraction: float
    min_neuron_fraction: float

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """fp64 ``[11]`` on ``device``: what ``gate_objective`` reads (built once, so a step copies nothing)."""
        return torch.tensor(tuple(self), dtype=torch.float64, device=device)


def expected_gate_macs(p_head: torch.Tensor, p_qk: torch.Tensor, p_v: torch.Tensor, p_block: torch.Tensor,
                       p_neuron: torch.Tensor, *, head_group: int, neuron_group: int, unit_qk: int, unit_v: int,
                       unit_neuron: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected gated MACs and the macro gates' expected cost (Proposition 1: linear in the joint keep probabilities).

    P(v dim open) = P(g) P(dv); P(q/k dim counted) = P(g) P(dqk) P(head has a v dim open).

    Args:
        p_head ``[L, H]``, p_qk and p_v ``[L, H, G]``, p_block ``[L, 1]``, p_neuron ``[L, N]``: keep probabilities
        (fp64 for MAC-sized sums: 4.6e9 in fp32 is off by hundreds).

    Returns:
        ``(gated, macro)``: scalars in the probabilities' dtype, differentiable.
    """
    p_alive = 1.0 - torch.prod(1.0 - p_v, dim=-1)
    qk_dims = (p_head * p_alive * p_qk.sum(dim=-1)).sum() * head_group
    v_dims = (p_head * p_v.sum(dim=-1)).sum() * head_group
    neurons = (p_block[:, 0] * p_neuron.sum(dim=-1)).sum() * neuron_group
    gated = qk_dims * unit_qk + v_dims * unit_v + neurons * unit_neuron
    head_cost = p_qk.shape[-1] * head_group * (unit_qk + unit_v)
    macro = p_head.sum() * head_cost + p_block.sum() * (p_neuron.shape[-1] * neuron_group * unit_neuron)
    return gated, macro


def feasibility_shortfall(p_head: torch.Tensor, p_qk: torch.Tensor, p_v: torch.Tensor, p_block: torch.Tensor,
                          p_neuron: torch.Tensor, *, min_heads: int, min_dim_fraction: float,
                          min_neuron_fraction: float) -> torch.Tensor:
    """Squared-ReLU shortfalls below the hard minimums, summed over layers (unweighted; shapes as
    ``expected_gate_macs``)."""
    heads_short = F.relu(min(min_heads, p_head.shape[-1]) - p_head.sum(dim=-1)) ** 2  # [L]
    dims_short = (F.relu(min_dim_fraction - p_qk.mean(dim=-1)) ** 2
                  + F.relu(min_dim_fraction - p_v.mean(dim=-1)) ** 2)  # [L, H]
    neurons_short = p_block[:, 0] * F.relu(min_neuron_fraction - p_neuron.mean(dim=-1)) ** 2  # [L]
    return heads_short.sum() + (p_head * dims_short).sum() + neurons_short.sum()


@torch.no_grad()
def decided_gate_macs(head: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, block: torch.Tensor,
                      neuron: torch.Tensor, layout: GateLayout, *, unit_qk: int, unit_v: int,
                      unit_neuron: int) -> torch.Tensor:
    """Gated MACs of the hard decision from counts alone (fp64 scalar): what the kernel computes.

    The kept set of a row is ``{a > 0}`` united with its top k, and both are prefixes of the row's descending order,
    so a row keeps ``max(#{a > 0}, k)`` entries; only which heads are kept needs a rank (ties broken by index). A
    head keeps its q/k dims only while one of its v dims is kept. ``hiap``'s ``attention_decisions`` /
    ``ffn_decisions`` decide each entry; the tests check that the two agree.
    """
    heads = head.shape[-1]
    index = torch.arange(heads, device=head.device)
    ahead = (head[..., None, :] > head[..., :, None]) | (
        (head[..., None, :] == head[..., :, None]) & (index[None, :] < index[:, None]))
    keep_head = (head > 0) | (ahead.sum(dim=-1) < layout.min_heads)  # [L, H]
    v_count = torch.where(keep_head, (v > 0).sum(dim=-1).clamp(min=layout.dims_min), 0)
    qk_count = torch.where(v_count > 0, (qk > 0).sum(dim=-1).clamp(min=layout.dims_min), 0)
    neuron_count = torch.where(block[:, 0] > 0, (neuron > 0).sum(dim=-1).clamp(min=layout.neurons_min), 0)
    # fp64: exact for any MAC count below 2^53, whether the unit costs come as ints or floats
    return (qk_count.sum().double() * (layout.head_group * unit_qk)
            + v_count.sum().double() * (layout.head_group * unit_v)
            + neuron_count.sum().double() * (layout.neuron_group * unit_neuron))


def lagrangian_budget(total: torch.Tensor, macro: torch.Tensor, *, static: float, dense: float, target_mode: bool,
                      target: torch.Tensor | float, lambda1: torch.Tensor, lambda2: torch.Tensor, lagrangian_lr: float,
                      lambda_macro: float, lambda_micro: float, ascend: bool, gap_scale: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The budget term from the (expected or straight-through decided) MACs.

    Target mode moves the multipliers first when ``ascend`` (``lambda1 += lr gap``, ``lambda2 += lr gap^2``, in place,
    on the device) and returns ``lambda1 gap + lambda2 gap^2``, with ``gap = (fraction - target) * gap_scale`` (1 for
    MACs; a cost that falls slower than the MACs, such as a latency with fixed parts, scales its gap up to MAC-like
    steps); penalty mode the weighted macro and micro fractions.

    Returns:
        ``(budget fp32, fraction, macro fraction, micro fraction)``, the last three detached fp32.
    """
    fraction = total / dense
    macro = macro / dense
    micro = (total - static) / dense
    if not target_mode:
        budget = lambda_macro * macro + lambda_micro * micro
    else:
        gap = (fraction - target) * gap_scale
        if ascend:
            with torch.no_grad():
                measured = gap.detach().to(lambda1.dtype)
                # Through a one-element view: torch 2.11's compiler drops an in-place update of a 0-dim float64 CPU
                # tensor outright (its pass that turns such tensors into Python floats restarts the trace without
                # it), so a compiled step would never move the multipliers. The view is the same memory.
                lambda1.view(1).add_(lagrangian_lr * measured)
                # The integral never pushes across the target: it is reset at each crossing (anti-windup), so the
                # multiplier built while the decided MACs lagged a falling target does not drive them past it.
                lambda1.view(1).copy_(torch.where(measured < 0, lambda1.clamp(max=0), lambda1.clamp(min=0)).view(1))
                lambda2.view(1).add_(lagrangian_lr * measured * measured)
        budget = lambda1 * gap + lambda2 * gap**2
    return budget.float(), fraction.detach().float(), macro.detach().float(), micro.detach().float()


def gate_objective_reference(flat: torch.Tensor, constants: torch.Tensor, lambda1: torch.Tensor,
                             lambda2: torch.Tensor, target: torch.Tensor, layout: GateLayout, *, target_mode: bool,
                             ascend: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Budget plus feasibility of a model's stacked gates (the module docstring's terms).

    Args:
        flat: ``[layout.numel]`` logits (differentiable).
        constants: fp64 ``[11]``, an ``ObjectiveConstants`` as a tensor.
        lambda1, lambda2, target: fp64 0-dim; the multipliers move in place when ``target_mode`` and ``ascend``.

    Returns:
        ``gate_terms`` (fp32 0-dim, ``budget + feasibility``, differentiable) and ``diagnostics`` (fp32 ``[3]``:
        budget, feasibility, MAC fraction; decided in target mode, expected in penalty mode).
    """
    c = ObjectiveConstants(*constants.tolist())
    units = dict(unit_qk=c.unit_qk, unit_v=c.unit_v, unit_neuron=c.unit_neuron)
    probabilities = keep_probability(flat.float())
    p64 = layout.split(probabilities.double())
    gated, macro = expected_gate_macs(*p64, head_group=layout.head_group, neuron_group=layout.neuron_group, **units)
    total = gated + c.static
    if target_mode:
        decided = decided_gate_macs(*layout.split(flat.detach()), layout, **units) + c.static
        total = total - total.detach() + decided.to(total.dtype)
    budget, fraction, _, _ = lagrangian_budget(
        total, macro, static=c.static, dense=c.dense, target_mode=target_mode, target=target, lambda1=lambda1,
        lambda2=lambda2, lagrangian_lr=c.lagrangian_lr, lambda_macro=c.lambda_macro, lambda_micro=c.lambda_micro,
        ascend=ascend)
    feasibility = c.feasibility_weight * feasibility_shortfall(
        *layout.split(probabilities), min_heads=layout.min_heads, min_dim_fraction=c.min_dim_fraction,
        min_neuron_fraction=c.min_neuron_fraction)
    gate_terms = budget + feasibility
    return gate_terms, torch.stack([budget, feasibility, fraction]).detach()
