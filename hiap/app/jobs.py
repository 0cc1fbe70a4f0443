"""What a training phase optimises: the jobs ``fit`` runs (dense teacher, KD fine-tuning, HiAP) and HiAP's budget
settling.

A job supplies the model, its optimizer groups (each with an LR schedule), the loss and, for HiAP, what happens before
each step: the temperature, the ramped target, and the moment the structure is fixed (an event of the run).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from hiap.backend import runs_triton_kernels
from hiap.method.convert import HiAPViT
from hiap.method.cost import count_macs, expected_cost
from hiap.method.gates import temperature_at
from hiap.method.losses import HiAPObjective, distillation_loss

# How far the extracted MACs may end from a target-mode run's target (a fraction of it) before settle_budget acts.
TOLERANCE = 0.01
# The history / log event of the step at which a HiAP run fixes its structure.
FIX_EVENT = "fix_structure"
# The event of a step at which the set of retired heads and neuron groups changed (``HiAPConfig.retire_below``).
RETIRE_EVENT = "retire"

__all__ = ["DenseJob", "DistillJob", "FIX_EVENT", "HiAPJob", "RETIRE_EVENT", "RetiredUnits", "TOLERANCE", "TrainingJob",
           "fixed_structure", "settle_budget"]


def fixed_structure(history: list[dict] | None) -> dict | None:
    """The event of a run's history at which its structure was fixed, or None (not yet, or ``fix_at=1``)."""
    return next((record for record in history or [] if record.get("event") == FIX_EVENT), None)


def _decay_groups(named: dict[str, nn.Parameter], lr: float, weight_decay: float, name: str) -> list[dict]:
    """Weights with decay, and biases / norms / embeddings without (timm's convention)."""
    no_decay_names = ("pos_embed", "cls_token", "reg_token")
    decay, plain = [], []
    for key, parameter in named.items():
        if not parameter.requires_grad:
            continue
        (plain if parameter.ndim <= 1 or key.endswith(no_decay_names) else decay).append(parameter)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": name, "schedule": "cosine"},
              {"params": plain, "lr": lr, "weight_decay": 0.0, "name": f"{name}_no_decay", "schedule": "cosine"}]
    return [g for g in groups if g["params"]]


class TrainingJob:
    """What one phase optimises. ``fit`` owns the loop; a job supplies the model, the parameter groups and the loss."""

    phase: str = "train"

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None):
        self.model = model
        self.teacher = teacher
        # The student is a copy of the teacher, which an earlier phase may have frozen: train every weight anyway.
        # A pruned layer with nothing left keeps zero-sized weights that no forward uses; DDP needs every trainable
        # parameter to receive a gradient, and there is nothing to train in them, so those stay frozen.
        for parameter in model.parameters():
            parameter.requires_grad_(parameter.numel() > 0)

    def param_groups(self, weight_decay: float, total_steps: int) -> list[dict]:
        """Optimizer groups, each with ``name`` and ``schedule`` (``"cosine"``, ``"constant"`` or a function of the
        step giving the LR factor)."""
        raise NotImplementedError

    def state_modules(self) -> dict[str, nn.Module]:
        """Modules besides the model whose state the checkpoint keeps."""
        return {}

    def checkpoint_metadata(self) -> dict:
        return {}

    def before_step(self, step: int, total_steps: int) -> dict | None:
        """Called before every training step (the HiAP job anneals the gate temperature and fixes the structure
        here). A returned dict is an event of the run: logged and kept in the history (and the checkpoint)."""
        return None

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``logits [B, C]`` (float32), ``targets [B]`` -> (scalar loss, detached scalars for the log).

        The log values stay tensors on the device: the loop reads them back only on logging steps.
        """
        raise NotImplementedError

    def log_extras(self) -> dict:
        return {}


class DenseJob(TrainingJob):
    """Cross-entropy training of a dense model (the teacher)."""

    phase = "teacher"

    def __init__(self, model: nn.Module, lr: float):
        super().__init__(model)
        self.lr = lr

    def param_groups(self, weight_decay: float, total_steps: int) -> list[dict]:
        return _decay_groups(dict(self.model.named_parameters()), self.lr, weight_decay, "weights")

    def loss(self, logits, targets, teacher_logits):
        loss = nn.functional.cross_entropy(logits, targets)
        return loss, {"loss": loss.detach()}


class DistillJob(TrainingJob):
    """Knowledge distillation of a (pruned) student from the dense teacher: the baselines' recovery training."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, lr: float, alpha: float, temperature: float,
                 phase: str = "distill"):
        super().__init__(student, teacher)
        self.lr = lr
        self.alpha = alpha
        self.temperature = temperature
        self.phase = phase

    def param_groups(self, weight_decay: float, total_steps: int) -> list[dict]:
        return _decay_groups(dict(self.model.named_parameters()), self.lr, weight_decay, "weights")

    def loss(self, logits, targets, teacher_logits):
        loss = distillation_loss(logits, teacher_logits, targets, self.alpha, self.temperature)
        return loss, {"loss": loss.detach()}


def settle_budget(gated: HiAPViT, tolerance: float = TOLERANCE, step_size: float = 0.01, max_steps: int = 5000,
                  patience: int = 500) -> dict:
    """Move the decided MACs of a target-mode run within ``tolerance`` of the target; a no-op when they are.

    The search lands near the target, but the decision is coarse where it matters most: on the digits ViT one FFN
    block is a tenth of the MACs, and the blocks whose gates sit near zero decide between, e.g., 0.60 and 0.70 for a
    target of 0.667. This deterministic rounding step moves only the micro logits (q/k dims, v dims, neurons) along
    the expected-cost gradient, scaled so the fastest moves ``step_size`` per step, in the direction that closes the
    gap, until the decided MACs are within half the tolerance, or within the tolerance once they have crossed the
    target (single units can be too coarse for the half). The units that move the most are those closest to zero in
    the costliest positions, i.e. the least decided ones; the weights are left as trained. Where no step reaches the
    tolerance (it gives up after ``patience`` steps without getting closer), the logits closest to the target are
    kept. It is a pure function of the logits, so every DDP rank, a resumed run and ``hiap extract`` reach the same
    result.

    Returns ``{"steps", "before", "after"}`` (MAC fractions of dense), or None outside target mode.
    """
    cfg = gated.cfg
    if cfg.budget != "target":
        return None
    dense = expected_cost(gated).dense
    before = count_macs(gated) / dense
    fraction, steps = before, 0

    def error(value: float) -> float:
        return abs(value / cfg.target - 1)

    if error(fraction) <= tolerance:
        return {"steps": 0, "before": before, "after": fraction}
    micro = gated.micro_gate_logits()
    best = (error(fraction), [logit.detach().clone() for logit in micro], fraction, steps)
    first_side = fraction > cfg.target
    while error(fraction) > tolerance / 2 and steps < max_steps and steps - best[3] < patience:
        if (fraction > cfg.target) != first_side and error(fraction) <= tolerance:
            break
        grads = torch.autograd.grad(expected_cost(gated).total, micro)
        scale = max(float(g.abs().max()) for g in grads)
        if scale == 0.0:
            break
        direction = 1.0 if fraction > cfg.target else -1.0
        with torch.no_grad():
            for logit, grad in zip(micro, grads):
                logit.sub_(direction * step_size * grad.to(logit.dtype) / scale)
        steps += 1
        fraction = count_macs(gated) / dense
        if error(fraction) < best[0]:
            best = (error(fraction), [logit.detach().clone() for logit in micro], fraction, steps)
    if error(fraction) > tolerance and best[0] < error(fraction):
        with torch.no_grad():
            for logit, kept in zip(micro, best[1]):
                logit.copy_(kept)
        fraction, steps = best[2], best[3]
    return {"steps": steps, "before": before, "after": fraction}


class RetiredUnits(nn.Module):
    """What ``HiAPViT.retire_closed`` last left out, as checkpointed state: one bool buffer per gated module (heads
    ``[H]`` or neuron groups ``[F / G]``), so a resumed run leaves out the same units until the next check."""

    def __init__(self, gated: HiAPViT):
        super().__init__()
        self._buffers_by_module = {}
        for name, mask in gated.retired().items():
            buffer = name.replace(".", "_")
            self.register_buffer(buffer, mask.clone())
            self._buffers_by_module[name] = buffer

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, buffer) for name, buffer in self._buffers_by_module.items()}

    def store(self, masks: dict[str, torch.Tensor]) -> None:
        for name, buffer in self._buffers_by_module.items():
            getattr(self, buffer).copy_(masks[name])


class HiAPJob(TrainingJob):
    """One single-stage HiAP run: weights and gate logits together under KD, the MAC budget and the feasibility
    penalties, with the Gumbel-Sigmoid temperature annealed from tau0 to tau_min.

    The run has two parts. The search (the first ``cfg.fix_at`` of the steps) trains weights, gate logits and the
    Lagrange multipliers together; the gates' learning rate falls to zero along a cosine over it and the temperature
    anneals over it. Then, when ``fix_at < 1``, the structure is fixed: the decision is settled onto the target
    (``settle_budget``, a no-op when the search landed within ``TOLERANCE``; how far it moved is an event of the run)
    and the remaining steps train the weights of the network extraction keeps, with the gates applied as decided.
    """

    phase = "hiap"

    def __init__(self, gated: HiAPViT, teacher: nn.Module, objective: HiAPObjective):
        super().__init__(gated, teacher)
        self.gated = gated
        self.objective = objective
        self.cfg = gated.cfg
        self.dense_macs = expected_cost(gated).dense
        self.retired = RetiredUnits(gated)
        # The retired units are applied to the model on the first step (from a checkpoint, when resumed).
        self._retired_applied = False
        self._retired_counts = gated.retired_counts()

    def search_steps(self, total_steps: int) -> int:
        """Steps in which the gates learn: ``round(fix_at * total_steps)``, at least one."""
        return max(1, min(total_steps, round(self.cfg.fix_at * total_steps)))

    def gate_speedup(self, search_steps: int) -> float:
        """Factor on ``gate_lr`` for a short search (1 for long ones).

        Adam moves a logit by about its learning rate per step at most, and the search's cosine gives ``lr * S / 2``
        of travel over ``S`` steps. A logit must be able to go from ``init_logit`` to the decision boundary and as far
        again within the search, or a short run does not prune by training at all: 60 DeiT-S steps at 0.05 left
        every logit positive, and 2-epoch digits runs ended the search above 0.9 of the MACs.
        """
        if self.cfg.gate_lr <= 0:
            return 1.0
        needed = 4.0 * abs(self.cfg.init_logit) / search_steps
        return max(1.0, needed / self.cfg.gate_lr)

    def param_groups(self, weight_decay: float, total_steps: int) -> list[dict]:
        search = self.search_steps(total_steps)
        speedup = self.gate_speedup(search)

        def over_search(step: int) -> float:  # cosine from 1 to 0 over the search, 0 after it
            return 0.5 * (1.0 + math.cos(math.pi * step / search)) if step < search else 0.0

        groups = _decay_groups(self.gated.weight_parameters(), self.cfg.lr, weight_decay, "weights")
        # The logits' rate falls to zero over the search: at a constant rate, clusters of near-zero logits (a whole
        # FFN block's gate among them) kept crossing zero together until the last step.
        groups.append({"params": list(self.gated.gate_logits().values()), "lr": self.cfg.gate_lr * speedup,
                       "weight_decay": 0.0, "name": "gates", "schedule": over_search})
        return groups

    def state_modules(self) -> dict[str, nn.Module]:
        return {"objective": self.objective, "retired": self.retired}

    def checkpoint_metadata(self) -> dict:
        return {"architecture": self.gated.architecture, "hiap_config": self.cfg.to_dict()}

    def before_step(self, step: int, total_steps: int) -> dict | None:
        search = self.search_steps(total_steps)
        self.gated.set_temperature(temperature_at(min(step, search), search, self.cfg.tau0, self.cfg.tau_min))
        ramp = self.cfg.target_ramp * search
        reached = min(1.0, step / ramp) if ramp > 0 else 1.0
        self.objective.budget.set_target(1.0 - (1.0 - self.cfg.target) * reached)
        self.objective.budget.ascending = step < search
        if not (search < total_steps and step == search):
            # Set on every step (a no-op unless it changes), so a run resumed after the fix trains the decided
            # network as well.
            self.gated.fix_structure(search < total_steps and step >= search)
            return self._retire(step, search)
        self.gated.fix_structure(False)  # fixing below reads the settled decision afresh
        searched = count_macs(self.gated) / self.dense_macs
        settling = settle_budget(self.gated, TOLERANCE) or {"steps": 0, "before": searched, "after": searched}
        self.gated.fix_structure(True)
        moved = f"; settling moved them to {settling['after']:.4f} in {settling['steps']} logit-only steps" \
            if settling["steps"] else ""
        device = next(iter(self.gated.gate_logits().values())).device
        compiles = " (its first step compiles the gather kernels)" if runs_triton_kernels(self.gated, device) else ""
        return {"event": FIX_EVENT, "search_steps": search, "total_steps": total_steps,
                "target": self.cfg.target if self.cfg.budget == "target" else None, **settling,
                "message": f"[hiap] structure fixed after {search} of {total_steps} steps: decided MACs "
                           f"{settling['before']:.4f} of dense{moved}; the remaining steps train the decided network"
                           f"{compiles}"}

    def _retire(self, step: int, search: int) -> dict | None:
        """Every ``retire_every`` steps of the search, retire what is closed for good (one device read per layer);
        an event when that changes what is left out."""
        if self.cfg.retire_below <= 0 or step >= search:
            return None
        if step % self.cfg.retire_every:
            if not self._retired_applied:  # the first step of this process: what the last check left out
                self.gated.set_retired(self.retired.masks())
                self._retired_applied = True
                self._retired_counts = self.gated.retired_counts()
            return None
        before = {name: mask.clone() for name, mask in self.retired.masks().items()}
        counts = self.gated.retire_closed(self.cfg.retire_below)
        self._retired_applied = True
        self._retired_counts = counts
        after = self.gated.retired()
        if all(torch.equal(before[name], after[name].to(before[name].device)) for name in before):
            return None
        self.retired.store(after)
        event = {"event": RETIRE_EVENT, **counts}
        if not any(bool(mask.any()) for mask in before.values()):  # said once; the step log carries the counts
            event["message"] = (f"[hiap] step {step}: {counts['heads']} of {counts['heads_total']} heads and "
                                f"{counts['neuron_groups']} of {counts['neuron_groups_total']} neuron groups are "
                                f"closed for good (keep probability < {self.cfg.retire_below:g}) and left out of the "
                                "steps from now on")
        return event

    def loss(self, logits, targets, teacher_logits):
        terms = self.objective(self.gated, logits, teacher_logits, targets)
        metrics = {"loss": terms.total.detach(), "task": terms.task, "budget": terms.budget,
                   "feasibility": terms.feasibility}
        return terms.total, metrics

    @torch.no_grad()
    def log_extras(self) -> dict:
        keep: dict[str, list[float]] = {"head": [], "qk": [], "v": [], "ffn_block": [], "neuron": []}
        for attn, mlp in zip(self.gated.attention_layers(), self.gated.ffn_layers()):
            p_head, p_qk, p_v = attn.gates.keep_probabilities()
            p_block, p_neuron = mlp.gates.keep_probabilities()
            keep["head"].append(round(float(p_head.mean()), 5))
            keep["qk"].append(round(float(p_qk.mean()), 5))
            keep["v"].append(round(float(p_v.mean()), 5))
            keep["ffn_block"].append(round(float(p_block.mean()), 5))
            keep["neuron"].append(round(float(p_neuron.mean()), 5))
        budget = self.objective.budget
        return {
            "expected_fraction": float(expected_cost(self.gated).total) / self.dense_macs,
            "decided_fraction": count_macs(self.gated) / self.dense_macs,
            "target": self.cfg.target if self.cfg.budget == "target" else None,
            "tau": self.gated.temperature,
            "lambda1": float(budget.lambda1), "lambda2": float(budget.lambda2),
            "keep_probability": keep,
            "retired_heads": self._retired_counts["heads"],
            "retired_neuron_groups": self._retired_counts["neuron_groups"],
        }
