"""HiAP objective: task + distillation, the MAC budget (penalty or target), and the feasibility penalties.

    L = (1 - alpha) CE + alpha T^2 KL(teacher/T || student/T) + budget + feasibility
    penalty mode: budget = lambda_macro * L_macro + lambda_micro * L_micro  (both / dense MACs)
    target mode:  budget = l1 (s - t) + l2 (s - t)^2,  s = E[MACs] / dense MACs, (l1, l2) maximised (CoFi-style)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hiap.config import HiAPConfig
from hiap.method.convert import HiAPViT
from hiap.method.cost import (
    ExpectedCost,
    MacBudget,
    StackedGates,
    UnitCosts,
    dense_macs,
    expected_cost,
    static_macs,
    token_count,
)
from hiap.method.gates import minimum_count
from hiap_kernels.objective import ObjectiveConstants, feasibility_shortfall, lagrangian_budget


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                      alpha: float = 0.7, temperature: float = 4.0) -> torch.Tensor:
    """``(1 - alpha) CE(student, targets) + alpha T^2 KL(softmax(teacher/T) || softmax(student/T))``.

    Args:
        student_logits, teacher_logits: ``[B, C]`` (teacher None gives plain cross-entropy).
        targets: ``[B]`` class indices.
    """
    ce = F.cross_entropy(student_logits, targets)
    if teacher_logits is None or alpha == 0:
        return ce
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * temperature**2 * kl


def feasibility_loss(model: HiAPViT, gates: StackedGates | None = None) -> torch.Tensor:
    """Squared-ReLU penalties that keep every layer above the hard minimums (per layer, summed; vectorised).

    relu(min_heads - E[heads])^2 + sum_h P(g_h) [relu(f_min - mean P(dqk_h))^2 + relu(f_min - mean P(dv_h))^2]
    + P(b) relu(f_neuron - mean P(c))^2
    """
    cfg = model.cfg
    gates = StackedGates.of(model) if gates is None else gates
    return feasibility_shortfall(*gates.keep_probabilities(), min_heads=cfg.min_heads,
                                 min_dim_fraction=cfg.min_dim_fraction, min_neuron_fraction=cfg.min_neuron_fraction)


def budget_cost(model: HiAPViT, gates: StackedGates | None = None, cost: MacBudget | None = None) -> ExpectedCost:
    """The cost the budget term sees: in target mode, the decided MACs with the expected MACs' gradient (``cost``:
    what is counted, MACs by default or a ``hiap.method.latency.LatencyBudget``).

    The plain expectation sum_i cost_i sigmoid(a_i) can meet the target with every logit at a small positive value,
    while the decision a > 0 keeps them all: on the default digits run the expected fraction sat at the 0.667 target
    while the decided one was still 0.80 after 25 epochs. Measuring the Lagrangian's gap on the decided MACs (forward,
    computed on the device: no host synchronisation) with the expectation's gradient (backward, straight-through)
    drives the multipliers until the extracted network meets the target. Penalty mode keeps the paper's expectation.
    """
    gates = StackedGates.of(model) if gates is None else gates
    counted = MacBudget(model) if cost is None else cost
    expected = counted.expected(model, gates)
    if not model.cfg.lands_on_target:
        return expected
    decided = counted.decided(model, gates)
    total = expected.total - expected.total.detach() + decided.to(expected.total.dtype)
    return ExpectedCost(total=total, macro=expected.macro, static=expected.static, dense=expected.dense,
                        gap_scale=expected.gap_scale)


def smallest_reachable_macs(model: HiAPViT) -> int:
    """MACs left when every layer sits at its hard minimums (the lowest budget the decision allows)."""
    cfg = model.cfg
    units = UnitCosts.at(token_count(model), model.vit.embed_dim)
    total = static_macs(model)
    for attn in model.attention_layers():
        group = attn.gates.group
        dims = minimum_count(cfg.min_dim_fraction, attn.head_dim // group) * group
        total += min(cfg.min_heads, attn.num_heads) * dims * (units.qk_dim + units.v_dim)
    return total


class BudgetLoss(nn.Module):
    """The MAC-budget term. In target mode it owns the two Lagrange multipliers and their dual ascent.

    Each training forward (grad enabled, ``ascending``) first moves the multipliers by a plain gradient-ascent step on
    the measured gap, ``l1 += lagrangian_lr * gap`` and ``l2 += lagrangian_lr * gap^2``, on the device, then returns
    ``l1 gap + l2 gap^2``. Plain steps are proportional to the gap, so the multipliers slow down as it closes and turn
    the step it changes sign; Adam's normalised steps kept l1 growing for about ten steps after the decided MACs had
    crossed the target, and short digits runs overshot it by 20-35 %. ``l2`` starts at ``cfg.gap_weight``: a restoring
    force proportional to the gap from the first step, which turns the gates back as soon as they pass the target.
    """

    def __init__(self, cfg: HiAPConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("lambda1", torch.zeros((), dtype=torch.float64))
        self.register_buffer("lambda2", torch.full((), float(cfg.gap_weight), dtype=torch.float64))
        # The target of this step (HiAPJob lowers it from 1 to cfg.target over the start of the search, see
        # set_target); a device buffer, so a new value each step costs no host round trip. It derives from the step,
        # so it is not saved.
        self.register_buffer("current_target", torch.tensor(float(cfg.target), dtype=torch.float64), persistent=False)
        # The run's owner stops the ascent when it fixes the structure.
        self.ascending = True
        # And switches the whole term off while its landing holds the decided MACs on the target (the gates then
        # learn from the task alone; see ``hiap.Pruner``).
        self.active = True
        self.register_buffer("_off", torch.zeros(2, dtype=torch.float64), persistent=False)

    def set_target(self, target: float) -> None:
        """The MAC fraction the gap of the next steps is measured against (``cfg.target`` unless set)."""
        self.current_target.fill_(float(target))

    def forward(self, cost: ExpectedCost) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        lambda1, lambda2 = self.multipliers()
        budget, fraction, macro, micro = lagrangian_budget(
            cost.total, cost.macro, static=cost.static, dense=float(cost.dense), target_mode=cfg.lands_on_target,
            target=self.current_target, lambda1=lambda1, lambda2=lambda2, lagrangian_lr=cfg.lagrangian_lr,
            lambda_macro=cfg.lambda_macro, lambda_micro=cfg.lambda_micro, ascend=self.ascends(),
            gap_scale=cost.gap_scale)
        return {"budget": budget, "expected_fraction": fraction, "macro": macro, "micro": micro}

    def multipliers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lambda1, lambda2)`` as the term reads them: zeros (views of a buffer) while switched off."""
        if self.active:
            return self.lambda1, self.lambda2
        return self._off[0], self._off[1]

    def ascends(self) -> bool:
        """Whether this call moves the multipliers: a training forward with gradients, before the structure is fixed
        and while the term is on."""
        return self.ascending and self.active and self.training and torch.is_grad_enabled()


@dataclass
class ObjectiveTerms:
    total: torch.Tensor
    task: torch.Tensor
    budget: torch.Tensor
    feasibility: torch.Tensor
    expected_fraction: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in self.__dict__.items()}


class HiAPObjective(nn.Module):
    """The whole HiAP loss for one batch; ``forward(model, student_logits, teacher_logits, targets) -> ObjectiveTerms``.

    Once ``model.fix_structure()`` has fixed the structure, a training-mode call is the task loss alone (budget,
    feasibility and expected fraction reported as 0; the logits get zero gradients): the gate terms depend only on
    logits that no longer move.

    Raises ValueError at construction when the target is below what the hard minimums leave.
    """

    def __init__(self, model: HiAPViT, cfg: HiAPConfig | None = None, cost: MacBudget | None = None):
        super().__init__()
        self.cfg = cfg or model.cfg
        if self.cfg.budget == "latency" and cost is None:
            raise ValueError("a latency budget needs its table: build the objective with cost=LatencyBudget(table)")
        # What the budget counts (MACs unless a measured latency table is given); the fused kernel counts MACs.
        self.cost = MacBudget(model) if cost is None else cost
        if self.cfg.budget == "target":
            floor = smallest_reachable_macs(model) / expected_cost(model).dense
            if self.cfg.target < floor:
                raise ValueError(
                    f"target {self.cfg.target:.4f} of dense MACs is below {floor:.4f}, the least the feasibility "
                    "minimums (min_heads, min_dim_fraction) and the static layers leave"
                )
        self.budget = BudgetLoss(self.cfg)
        # What the fused Triton objective reads besides the logits: built once, so a step copies nothing to the device.
        gates = StackedGates.of(model)
        self.gate_layout = gates.layout
        units = UnitCosts.at(token_count(model), model.vit.embed_dim)
        constants = ObjectiveConstants(
            unit_qk=units.qk_dim, unit_v=units.v_dim, unit_neuron=units.neuron, static=static_macs(model),
            dense=dense_macs(model), lambda_macro=self.cfg.lambda_macro, lambda_micro=self.cfg.lambda_micro,
            lagrangian_lr=self.cfg.lagrangian_lr, feasibility_weight=self.cfg.feasibility_weight,
            min_dim_fraction=model.cfg.min_dim_fraction, min_neuron_fraction=model.cfg.min_neuron_fraction)
        self.register_buffer("gate_constants", constants.tensor(gates.flat.device), persistent=False)

    def forward(self, model: HiAPViT, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor) -> ObjectiveTerms:
        task = distillation_loss(student_logits, teacher_logits, targets, self.cfg.kd_alpha, self.cfg.kd_temperature)
        if model.structure_fixed and self.training:
            # The logits no longer move once the structure is fixed, so the gate terms are constants: the loss is the
            # task alone, and a step skips the cost model (~220 ops at depth 12 on the reference path, one launch on
            # the Triton path). The logits stay in the graph with zero gradients, as DDP expects of every parameter.
            zero = task.new_zeros(()).detach()
            in_graph = (StackedGates.of(model).flat * 0).sum().to(task.dtype)
            return ObjectiveTerms(total=task + in_graph, task=task.detach(), budget=zero, feasibility=zero,
                                  expected_fraction=zero)
        gates = StackedGates.of(model)  # every layer's logits stacked once: the terms below do not grow with depth
        fused = model.attention_layers()[0].kernel("gate_objective")
        # budget_cost measures the decided MACs when the model's config is in target mode; the fused op follows this
        # objective's config, so a mismatch of the two (a cfg passed apart) takes the reference terms.
        if fused is not None and model.cfg.budget == self.cfg.budget and isinstance(self.cost, MacBudget):
            # One launch for the cost model, the decision, the multipliers' ascent and feasibility, and their gradient.
            lambda1, lambda2 = self.budget.multipliers()
            gate_terms, diagnostics = fused(
                gates.flat, self.gate_constants, lambda1, lambda2, self.budget.current_target,
                self.gate_layout, target_mode=self.cfg.budget == "target", ascend=self.budget.ascends())
            budget, feasibility, fraction = diagnostics.unbind()
            return ObjectiveTerms(total=task + gate_terms, task=task.detach(), budget=budget, feasibility=feasibility,
                                  expected_fraction=fraction)
        budget_terms = self.budget(budget_cost(model, gates, self.cost))
        feasibility = self.cfg.feasibility_weight * feasibility_loss(model, gates)
        total = task + budget_terms["budget"] + feasibility
        return ObjectiveTerms(total=total, task=task.detach(), budget=budget_terms["budget"].detach(),
                              feasibility=feasibility.detach(), expected_fraction=budget_terms["expected_fraction"])
