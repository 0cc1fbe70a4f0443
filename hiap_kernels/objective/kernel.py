"""Triton kernel of ``gate_objective``: a training step's gate terms (expected and decided MACs, the Lagrangian budget
and the feasibility penalties) and their gradient with respect to every logit, in one launch.

The torch formulation is ~140 small ops forward and ~100 backward whatever the depth (sigmoid, products, sums, sorts
for the decision's top k, casts, the multipliers' update), each a launch of a few hundred elements: on a GPU a step
paid more for them than for a dense model's forward. The logits of a whole model are a few thousand numbers, so one
program reads them all, reduces, and writes the gradient in the same pass; backward is one multiply by the incoming
gradient. Sums run in a fixed order (no atomics): deterministic.

One program walks the layers twice (sums first, then the gradient, which needs the whole model's gap), holding one
layer at a time, so its registers do not grow with depth. Block shapes: heads ``[BH]``, q/k and v groups
``[BH, BG]``, neuron groups ``[BN]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor
from hiap_kernels.gates.kernel import keep_probability
from hiap_kernels.objective.reference import GateLayout, ObjectiveConstants

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CONSTANTS = len(ObjectiveConstants._fields)


@triton.jit
def _multiply(a, b):
    return a * b


@triton.jit
def _masked_keep_probability(logit, ok):
    """Keep probability in fp32, 0 off the shapes (so padding adds nothing and multiplies products by 1)."""
    return tl.where(ok, keep_probability(logit), 0.0)


@triton.jit
def _layer_gates(flat_ptr, layer, LAYERS: tl.constexpr, HEADS: tl.constexpr, GROUPS: tl.constexpr,
                 NEURON_GROUPS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """One layer's logits (fp32), probabilities and masks: heads ``[BH]``, qk / v ``[BH, BG]``, block ``[1]``,
    neurons ``[BN]``; plus their flat indices, for the gradient's stores."""
    QK_START: tl.constexpr = LAYERS * HEADS
    V_START: tl.constexpr = QK_START + LAYERS * HEADS * GROUPS
    BLOCK_START: tl.constexpr = V_START + LAYERS * HEADS * GROUPS
    NEURON_START: tl.constexpr = BLOCK_START + LAYERS
    head = tl.arange(0, BLOCK_H)
    group = tl.arange(0, BLOCK_G)
    neuron = tl.arange(0, BLOCK_N)
    head_ok = head < HEADS
    micro_ok = head_ok[:, None] & (group[None, :] < GROUPS)
    neuron_ok = neuron < NEURON_GROUPS
    block_ok = tl.arange(0, 1) < 1
    head_index = layer * HEADS + head
    micro_index = QK_START + head_index[:, None] * GROUPS + group[None, :]
    block_index = BLOCK_START + layer + tl.arange(0, 1)
    neuron_index = NEURON_START + layer * NEURON_GROUPS + neuron
    a_head = tl.load(flat_ptr + head_index, mask=head_ok, other=0.0).to(tl.float32)
    a_qk = tl.load(flat_ptr + micro_index, mask=micro_ok, other=0.0).to(tl.float32)
    a_v = tl.load(flat_ptr + (LAYERS * HEADS * GROUPS) + micro_index, mask=micro_ok, other=0.0).to(tl.float32)
    a_block = tl.load(flat_ptr + block_index).to(tl.float32)
    a_neuron = tl.load(flat_ptr + neuron_index, mask=neuron_ok, other=0.0).to(tl.float32)
    return (a_head, a_qk, a_v, a_block, a_neuron,
            _masked_keep_probability(a_head, head_ok), _masked_keep_probability(a_qk, micro_ok),
            _masked_keep_probability(a_v, micro_ok), _masked_keep_probability(a_block, block_ok),
            _masked_keep_probability(a_neuron, neuron_ok),
            head_ok, micro_ok, neuron_ok, head_index, micro_index, block_index, neuron_index)


@triton.jit
def _layer_shortfalls(p_head, p_qk, p_v, p_neuron, min_dim_fraction, min_neuron_fraction, head_ok,
                      MIN_HEADS: tl.constexpr, GROUPS: tl.constexpr, NEURON_GROUPS: tl.constexpr):
    """The feasibility shortfalls of one layer (fp32, before squaring): heads ``[]``, q/k and v dims ``[BH]``,
    neurons ``[]``."""
    heads_short = tl.maximum(MIN_HEADS - tl.sum(p_head, axis=0), 0.0)
    qk_short = tl.where(head_ok, tl.maximum(min_dim_fraction - tl.sum(p_qk, axis=1) / GROUPS, 0.0), 0.0)
    v_short = tl.where(head_ok, tl.maximum(min_dim_fraction - tl.sum(p_v, axis=1) / GROUPS, 0.0), 0.0)
    neurons_short = tl.maximum(min_neuron_fraction - tl.sum(p_neuron, axis=0) / NEURON_GROUPS, 0.0)
    return heads_short, qk_short, v_short, neurons_short


@triton.jit
def _gate_objective_kernel(
    flat_ptr, constants_ptr, lambda1_ptr, lambda2_ptr, target_ptr, grad_ptr, terms_ptr, diagnostics_ptr,
    LAYERS: tl.constexpr, HEADS: tl.constexpr, GROUPS: tl.constexpr, NEURON_GROUPS: tl.constexpr,
    HEAD_GROUP: tl.constexpr, NEURON_GROUP: tl.constexpr, MIN_HEADS: tl.constexpr, DIMS_MIN: tl.constexpr,
    NEURONS_MIN: tl.constexpr, TARGET_MODE: tl.constexpr, ASCEND: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    unit_qk = tl.load(constants_ptr + 0)
    unit_v = tl.load(constants_ptr + 1)
    unit_neuron = tl.load(constants_ptr + 2)
    static = tl.load(constants_ptr + 3)
    dense = tl.load(constants_ptr + 4)
    lambda_macro = tl.load(constants_ptr + 5)
    lambda_micro = tl.load(constants_ptr + 6)
    lagrangian_lr = tl.load(constants_ptr + 7)
    # fp32, as the feasibility terms are computed in the logits' fp32 probabilities
    feasibility_weight = tl.load(constants_ptr + 8).to(tl.float32)
    min_dim_fraction = tl.load(constants_ptr + 9).to(tl.float32)
    min_neuron_fraction = tl.load(constants_ptr + 10).to(tl.float32)
    head = tl.arange(0, BLOCK_H)
    head_cost = (GROUPS * HEAD_GROUP) * (unit_qk + unit_v)
    block_cost = (NEURON_GROUPS * NEURON_GROUP) * unit_neuron

    # ---- pass 1, layer by layer: expected MACs (fp64), the decided ones (counts), feasibility (fp32) ----------------
    qk_dims = tl.zeros([BLOCK_H], tl.float64)  # per head slot, summed over layers
    v_dims = tl.zeros([BLOCK_H], tl.float64)
    head_mass = tl.zeros([BLOCK_H], tl.float64)
    neurons = tl.zeros([1], tl.float64)
    block_mass = tl.zeros([1], tl.float64)
    qk_kept = tl.zeros([BLOCK_H], tl.int32)
    v_kept = tl.zeros([BLOCK_H], tl.int32)
    neurons_kept = tl.zeros([1], tl.int32)
    feasibility = tl.zeros([BLOCK_H], tl.float32)
    for layer in range(LAYERS):
        (a_head, a_qk, a_v, a_block, a_neuron, p_head, p_qk, p_v, p_block, p_neuron,
         head_ok, micro_ok, neuron_ok, _, _, _, _) = _layer_gates(
            flat_ptr, layer, LAYERS, HEADS, GROUPS, NEURON_GROUPS, BLOCK_H, BLOCK_G, BLOCK_N)
        ph = p_head.to(tl.float64)
        pb = p_block.to(tl.float64)
        alive = 1.0 - tl.reduce(1.0 - p_v.to(tl.float64), 1, _multiply)  # [BH]
        qk_dims += ph * alive * tl.sum(p_qk.to(tl.float64), axis=1)
        v_dims += ph * tl.sum(p_v.to(tl.float64), axis=1)
        head_mass += ph
        neurons += pb * tl.sum(p_neuron.to(tl.float64), axis=0)
        block_mass += pb
        # The decision from counts: a row keeps max(#{a > 0}, its minimum) entries (both sets are prefixes of its
        # descending order); which heads are kept needs their rank, ties broken by index.
        # [BH, BH]: head j ranks ahead of head h
        ahead = (a_head[None, :] > a_head[:, None]) | (
            (a_head[None, :] == a_head[:, None]) & (head[None, :] < head[:, None]))
        rank = tl.sum((ahead & head_ok[None, :]).to(tl.int32), axis=1)  # [BH]
        keep_head = head_ok & ((a_head > 0) | (rank < MIN_HEADS))
        v_count = tl.where(keep_head, tl.maximum(tl.sum((micro_ok & (a_v > 0)).to(tl.int32), axis=1), DIMS_MIN), 0)
        v_kept += v_count
        qk_kept += tl.where(v_count > 0, tl.maximum(tl.sum((micro_ok & (a_qk > 0)).to(tl.int32), axis=1), DIMS_MIN), 0)
        neurons_kept += tl.where(a_block > 0, tl.maximum(tl.sum((neuron_ok & (a_neuron > 0)).to(tl.int32), axis=0),
                                                        NEURONS_MIN), 0)
        heads_short, qk_short, v_short, neurons_short = _layer_shortfalls(
            p_head, p_qk, p_v, p_neuron, min_dim_fraction, min_neuron_fraction, head_ok, MIN_HEADS, GROUPS,
            NEURON_GROUPS)
        # [BH]: the layer's scalar terms ride in slot 0
        feasibility += p_head * (qk_short * qk_short + v_short * v_short) + tl.where(
            head == 0, heads_short * heads_short + tl.sum(p_block * neurons_short * neurons_short, axis=0), 0.0)

    expected = ((tl.sum(qk_dims, axis=0) * HEAD_GROUP) * unit_qk + (tl.sum(v_dims, axis=0) * HEAD_GROUP) * unit_v
                + (tl.sum(neurons, axis=0) * NEURON_GROUP) * unit_neuron + static)
    macro = tl.sum(head_mass, axis=0) * head_cost + tl.sum(block_mass, axis=0) * block_cost
    feasibility_sum = feasibility_weight * tl.sum(feasibility, axis=0)

    # ---- the budget and the gradient it sends into the expected MACs ----------------------------------------------
    if TARGET_MODE:
        decided = (tl.sum(qk_kept, axis=0).to(tl.float64) * (HEAD_GROUP * unit_qk)
                   + tl.sum(v_kept, axis=0).to(tl.float64) * (HEAD_GROUP * unit_v)
                   + tl.sum(neurons_kept, axis=0).to(tl.float64) * (NEURON_GROUP * unit_neuron)) + static
        fraction = decided / dense
        gap = fraction - tl.load(target_ptr)
        lambda1 = tl.load(lambda1_ptr)
        lambda2 = tl.load(lambda2_ptr)
        if ASCEND:
            lambda1 += lagrangian_lr * gap
            # The integral never pushes across the target: reset at each crossing (anti-windup).
            lambda1 = tl.where(gap < 0, tl.minimum(lambda1, 0.0), tl.maximum(lambda1, 0.0))
            lambda2 += lagrangian_lr * gap * gap
            tl.store(lambda1_ptr, lambda1)
            tl.store(lambda2_ptr, lambda2)
        budget = lambda1 * gap + lambda2 * gap * gap
        d_total = (lambda1 + 2.0 * lambda2 * gap) / dense
        d_macro = d_total * 0.0
    else:
        fraction = expected / dense
        budget = lambda_macro * (macro / dense) + lambda_micro * ((expected - static) / dense)
        d_total = lambda_micro / dense
        d_macro = lambda_macro / dense
    budget32 = budget.to(tl.float32)
    tl.store(terms_ptr, budget32 + feasibility_sum)
    tl.store(diagnostics_ptr + 0, budget32)
    tl.store(diagnostics_ptr + 1, feasibility_sum)
    tl.store(diagnostics_ptr + 2, fraction.to(tl.float32))

    # ---- pass 2, layer by layer: d/dp of both terms, then through the sigmoid ----------------------------------------
    total_head = d_total * HEAD_GROUP
    total_neuron = d_total * NEURON_GROUP * unit_neuron
    dtype = grad_ptr.dtype.element_ty
    for layer in range(LAYERS):
        (_, _, _, _, _, p_head, p_qk, p_v, p_block, p_neuron, head_ok, micro_ok, neuron_ok, head_index, micro_index,
         block_index, neuron_index) = _layer_gates(
            flat_ptr, layer, LAYERS, HEADS, GROUPS, NEURON_GROUPS, BLOCK_H, BLOCK_G, BLOCK_N)
        ph = p_head.to(tl.float64)
        pb = p_block.to(tl.float64)
        closed_v = 1.0 - p_v.to(tl.float64)  # [BH, BG]
        closed_product = tl.reduce(closed_v, 1, _multiply)  # [BH]
        alive = 1.0 - closed_product
        sum_qk = tl.sum(p_qk.to(tl.float64), axis=1)
        sum_v = tl.sum(p_v.to(tl.float64), axis=1)
        # d alive / d p_v[g] = prod of the other groups' (1 - p_v) = prod / (1 - p_v[g]) while no factor is 0. A zero
        # factor is a probability of exactly 1 in fp32, whose sigmoid slope p (1 - p) is 0: its own gradient is 0
        # whatever this gives, and every other group of that head gets 0 from it (finite: the division is guarded).
        is_zero = closed_v == 0.0
        no_zero = tl.sum(is_zero.to(tl.int32), axis=1) == 0  # [BH]
        others = tl.where(no_zero[:, None], closed_product[:, None] / tl.where(is_zero, 1.0, closed_v), 0.0)
        heads_short, qk_short, v_short, neurons_short = _layer_shortfalls(
            p_head, p_qk, p_v, p_neuron, min_dim_fraction, min_neuron_fraction, head_ok, MIN_HEADS, GROUPS,
            NEURON_GROUPS)

        g_head = total_head * (unit_qk * alive * sum_qk + unit_v * sum_v) + d_macro * head_cost
        f_head = feasibility_weight * (qk_short * qk_short + v_short * v_short - 2.0 * heads_short)
        grad_head = (g_head.to(tl.float32) + f_head) * ((1.0 - p_head) * p_head)
        tl.store(grad_ptr + head_index, grad_head.to(dtype), mask=head_ok)

        g_qk = (total_head * unit_qk) * (ph * alive)[:, None]
        f_qk = feasibility_weight * (p_head * (-2.0 * qk_short / GROUPS))[:, None]
        grad_qk = (g_qk.to(tl.float32) + f_qk) * ((1.0 - p_qk) * p_qk)
        tl.store(grad_ptr + micro_index, grad_qk.to(dtype), mask=micro_ok)

        g_v = total_head * (unit_qk * (ph * sum_qk)[:, None] * others + unit_v * ph[:, None])
        f_v = feasibility_weight * (p_head * (-2.0 * v_short / GROUPS))[:, None]
        grad_v = (g_v.to(tl.float32) + f_v) * ((1.0 - p_v) * p_v)
        tl.store(grad_ptr + (LAYERS * HEADS * GROUPS) + micro_index, grad_v.to(dtype), mask=micro_ok)

        sum_neuron = tl.sum(p_neuron.to(tl.float64), axis=0)
        g_block = total_neuron * sum_neuron + d_macro * block_cost
        f_block = feasibility_weight * neurons_short * neurons_short
        grad_block = (g_block.to(tl.float32) + f_block) * ((1.0 - p_block) * p_block)
        tl.store(grad_ptr + block_index, grad_block.to(dtype))

        g_neuron = total_neuron * pb
        f_neuron = feasibility_weight * (p_block * (-2.0 * neurons_short / NEURON_GROUPS))
        grad_neuron = (g_neuron.to(tl.float32) + f_neuron) * ((1.0 - p_neuron) * p_neuron)
        tl.store(grad_ptr + neuron_index, grad_neuron.to(dtype), mask=neuron_ok)


def _num_warps(layout: GateLayout) -> int:
    """One program walks the layers holding one layer's gates: more warps for the per-dim / per-neuron layouts."""
    largest = max(layout.heads * layout.groups, layout.neuron_groups)
    return 4 if largest <= 1024 else 8


@torch.library.custom_op(
    "hiap_kernels::gate_objective", mutates_args=("lambda1", "lambda2"),
    schema="(Tensor flat, Tensor constants, Tensor(a!) lambda1, Tensor(b!) lambda2, Tensor target, int[] layout, "
           "bool target_mode, bool ascend) -> (Tensor, Tensor, Tensor)")
def _gate_objective_op(flat, constants, lambda1, lambda2, target, layout, target_mode, ascend):
    shape = GateLayout(*layout)
    flat = flat.contiguous()
    grad = runtime.empty(flat.shape, flat.dtype, flat.device)
    terms = runtime.empty((), torch.float32, flat.device)
    diagnostics = runtime.empty(3, torch.float32, flat.device)
    _gate_objective_kernel[(1,)](
        flat, constants, lambda1, lambda2, target, grad, terms, diagnostics,
        LAYERS=shape.layers, HEADS=shape.heads, GROUPS=shape.groups, NEURON_GROUPS=shape.neuron_groups,
        HEAD_GROUP=shape.head_group, NEURON_GROUP=shape.neuron_group, MIN_HEADS=shape.min_heads,
        DIMS_MIN=shape.dims_min, NEURONS_MIN=shape.neurons_min, TARGET_MODE=target_mode, ASCEND=ascend,
        BLOCK_H=triton.next_power_of_2(shape.heads),
        BLOCK_G=triton.next_power_of_2(shape.groups), BLOCK_N=triton.next_power_of_2(shape.neuron_groups),
        num_warps=_num_warps(shape),
    )
    return terms, diagnostics, grad


@_gate_objective_op.register_fake
def _gate_objective_fake(flat, constants, lambda1, lambda2, target, layout, target_mode, ascend):
    return (flat.new_empty((), dtype=torch.float32), flat.new_empty(3, dtype=torch.float32),
            torch.empty_like(flat, memory_format=torch.contiguous_format))


class _GateObjective(torch.autograd.Function):
    """The op (which moves the multipliers in place, so it cannot carry its own autograd formula) with its backward:
    the gradient it wrote, times the incoming one."""

    @staticmethod
    def forward(ctx, flat, constants, lambda1, lambda2, target, layout, target_mode, ascend):
        gate_terms, diagnostics, gradient = _gate_objective_op(flat, constants, lambda1, lambda2, target, layout,
                                                               target_mode, ascend)
        ctx.save_for_backward(gradient)
        ctx.mark_non_differentiable(diagnostics)
        return gate_terms, diagnostics

    @staticmethod
    def backward(ctx, grad_terms, grad_diagnostics):
        (gradient,) = ctx.saved_tensors
        return gradient * grad_terms.to(gradient.dtype), None, None, None, None, None, None, None


def gate_objective(flat: torch.Tensor, constants: torch.Tensor, lambda1: torch.Tensor, lambda2: torch.Tensor,
                   target: torch.Tensor, layout: GateLayout, *, target_mode: bool, ascend: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Budget plus feasibility of a model's stacked gates and their gradient, in one launch (backward: one multiply).

    Same contract as :func:`hiap_kernels.objective.reference.gate_objective_reference`: ``flat [layout.numel]``
    logits, ``constants`` fp64 ``[11]`` (``ObjectiveConstants.tensor``), fp64 0-dim ``lambda1``, ``lambda2`` (moved
    in place when ``target_mode`` and ``ascend``) and ``target``. Returns ``gate_terms`` (fp32 0-dim, differentiable
    with respect to ``flat``) and ``diagnostics`` (fp32 ``[3]``: budget, feasibility, MAC fraction). Nothing here
    reads a value on the host, so a step stays free of synchronisations.
    """
    check_tensor("flat", flat, ndim=1, dtypes=LOGIT_DTYPES)
    runtime.require_triton_device("gate_objective", flat, "hiap_kernels.objective.gate_objective_reference")
    if not isinstance(layout, GateLayout):
        raise TypeError(f"layout must be a GateLayout, got {type(layout).__name__}")
    if min(layout) < 0 or min(layout.layers, layout.heads, layout.groups, layout.neuron_groups) == 0:
        raise ValueError(f"layout needs at least one layer, head, group and neuron group, got {layout}")
    if flat.numel() != layout.numel:
        raise ValueError(f"flat has {flat.numel()} logits but {layout} holds {layout.numel}")
    check_tensor("constants", constants, ndim=1, dtypes=(torch.float64,), device=flat.device)
    if constants.numel() != CONSTANTS:
        raise ValueError(f"constants must hold the {CONSTANTS} ObjectiveConstants, got {constants.numel()}")
    for name, scalar in (("lambda1", lambda1), ("lambda2", lambda2), ("target", target)):
        check_tensor(name, scalar, ndim=0, dtypes=(torch.float64,), device=flat.device)
    return _GateObjective.apply(flat, constants, lambda1, lambda2, target, list(layout), bool(target_mode),
                                bool(ascend))
