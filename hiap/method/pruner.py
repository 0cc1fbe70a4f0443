"""``hiap.Pruner``: the whole HiAP search as one object that the user's own training loop drives.

    pruner = hiap.Pruner(vit, hiap.HiAPConfig(target=2 / 3), total_steps=epochs * len(loader))
    optimizer = torch.optim.AdamW(pruner.param_groups(lr=1e-4, weight_decay=0.05))
    for images, targets in loader:
        loss = pruner.loss(images, targets)
        optimizer.zero_grad(); loss.backward(); optimizer.step(); pruner.step()
    pruned = pruner.extract()

The pruner owns what makes the search HiAP: the gated model, the objective (task + distillation + budget +
feasibility), the gate logits' own optimizer and learning-rate schedule, the temperature anneal, the target ramp, the
Lagrangian controller and its landing on the budget, the structure fix, retirement of gates closed for good, its
checkpointable state and the extraction. The loop, the data, the weights' optimizer and its schedule stay the user's.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

from hiap.config import HiAPConfig
from hiap.method.budget import TOLERANCE, land_on_budget, resolved_target, settle_budget
from hiap.method.convert import HiAPViT, gate_vit, order_units_by_magnitude
from hiap.method.cost import MacBudget, StackedGates, count_macs, dense_macs
from hiap.method.extract import extract
from hiap.method.gates import minimum_count, temperature_at
from hiap.method.losses import HiAPObjective, ObjectiveTerms

__all__ = ["FIX_EVENT", "LAND_EVENT", "RETIRE_EVENT", "Pruner", "RetiredUnits", "decay_groups", "fixed_structure"]

logger = logging.getLogger("hiap")

# The events of a run's history (``Pruner.history``): the structure being fixed, the set of retired heads and neuron
# groups changing, and the landing moving gates onto the budget.
FIX_EVENT = "fix_structure"
RETIRE_EVENT = "retire"
LAND_EVENT = "land"
# Steps between two landing checks (each one device read of the logits); the last step of the search is always one.
LANDING_EVERY = 10


def fixed_structure(history: list[dict] | None) -> dict | None:
    """The event of a run's history at which its structure was fixed, or None (not yet, or ``fix_at=1``)."""
    return next((record for record in history or [] if record.get("event") == FIX_EVENT), None)


def decay_groups(named: dict[str, nn.Parameter], lr: float, weight_decay: float, name: str = "weights") -> list[dict]:
    """Optimizer groups of ``named``: matrices with weight decay, biases / norms / embeddings without (timm's rule).
    Parameters that need no gradient, or hold nothing, are left out."""
    no_decay_names = ("pos_embed", "cls_token", "reg_token")
    decay, plain = [], []
    for key, parameter in named.items():
        if not parameter.requires_grad or parameter.numel() == 0:
            continue
        (plain if parameter.ndim <= 1 or key.endswith(no_decay_names) else decay).append(parameter)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": name},
              {"params": plain, "lr": lr, "weight_decay": 0.0, "name": f"{name}_no_decay"}]
    return [g for g in groups if g["params"]]


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


class Pruner:
    """The HiAP search for a training loop of your own (plain PyTorch, timm's script, Lightning, DDP).

    Args:
        model: a timm ``VisionTransformer`` (a gated copy is made; the model itself is left untouched and, by default,
            is the distillation teacher), or a gated model from ``hiap.gate_vit``.
        cfg: the hyperparameters (``HiAPConfig()`` when None; a gated model brings its own).
        total_steps: how many times ``step()`` will be called (optimizer steps). The search is the first
            ``cfg.fix_at`` of them; the rest train the fixed structure.
        teacher: the distillation teacher (logits ``[B, C]`` from images); None takes ``model`` when it is not
            gated. No teacher is run when ``cfg.kd_alpha`` is 0.

    Each step reads top-down: ``loss(images, targets)`` (the gated forward, the teacher's logits and the objective)
    -> ``backward`` -> your optimizer's step over ``param_groups()`` -> ``step()``: the gates' optimizer step, then
    the schedule of the next step (temperature, ramped target, landing, fix, retirement). ``step()`` reads nothing
    back from the device except on the checks of retirement (every ``cfg.retire_every`` steps) and landing (every
    10 steps in the last ``cfg.landing`` of the search) and at the fix.

    Checkpoints: save ``pruner.model.state_dict()`` and ``pruner.state_dict()`` (and your optimizer's); load the
    model first, then the pruner. A resumed run continues bit for bit.
    """

    def __init__(self, model: nn.Module, cfg: HiAPConfig | None = None, *, total_steps: int,
                 teacher: nn.Module | None = None):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if isinstance(model, HiAPViT):
            if cfg is not None and cfg != model.cfg:
                raise ValueError("the gated model was made with another HiAPConfig; pass cfg=None to use its own")
            gated = model
        else:
            gated = gate_vit(model, cfg).train()  # a copy made to be searched: its gates sample from the start
            if gated.cfg.order_units:
                order_units_by_magnitude(gated)
            teacher = model if teacher is None else teacher
        self.model: HiAPViT = gated
        self.cfg: HiAPConfig = gated.cfg
        self.total_steps = total_steps
        self.teacher = teacher if self.cfg.kd_alpha > 0 else None
        # What the budget counts: MACs, or the latency a measured table predicts for the device.
        self.cost = budget_of(gated)
        self.target = resolved_target(self.cfg, self.cost) if self.cfg.lands_on_target else None
        # A target below the feasibility floor is refused here, before any training (ValueError naming the floor).
        self.objective = HiAPObjective(gated, cost=self.cost)
        self.retired = RetiredUnits(gated)
        self.dense_macs = dense_macs(gated)
        self.history: list[dict] = []
        self.step_count = 0
        self.last_terms: ObjectiveTerms | None = None
        self._paths_chosen = False
        self._gate_optimizer = self._build_gate_optimizer()
        self._configured_step: int | None = None
        self._configure(0)

    def _build_gate_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the gate logits: the macro gates (heads, FFN blocks) and the micro gates in two groups, each
        with its learning-rate factor (``macro_lr`` for the macro gates)."""
        gated = self.model
        groups = [{"params": gated.macro_gate_logits(), "lr": 0.0, "name": "macro_gates", "lr_scale": self.cfg.macro_lr},
                  {"params": gated.micro_gate_logits(), "lr": 0.0, "name": "micro_gates", "lr_scale": 1.0}]
        return torch.optim.AdamW(groups, weight_decay=0.0)

    # ----------------------------------------------------------------------------------------------------------------
    # The schedule
    # ----------------------------------------------------------------------------------------------------------------

    @property
    def search_steps(self) -> int:
        """Steps in which the gates learn: ``round(fix_at * total_steps)``, at least one."""
        return max(1, min(self.total_steps, round(self.cfg.fix_at * self.total_steps)))

    @property
    def landing_start(self) -> int:
        """First step of the landing (the last ``cfg.landing`` of the search); ``search_steps`` when there is none."""
        if not self.cfg.lands_on_target or self.cfg.landing <= 0:
            return self.search_steps
        return self.search_steps - max(1, round(self.cfg.landing * self.search_steps))

    def gate_speedup(self) -> float:
        """Factor on ``gate_lr`` for a short search (1 for long ones).

        Adam moves a logit by about its learning rate per step at most, and the search's cosine gives ``lr * S / 2``
        of travel over ``S`` steps. A logit must be able to go from ``init_logit`` to the decision boundary and as far
        again within the search, or a short run does not prune by training at all: 60 DeiT-S steps at 0.05 left
        every logit positive, and 2-epoch digits runs ended the search above 0.9 of the MACs.
        """
        if self.cfg.gate_lr <= 0:
            return 1.0
        needed = 4.0 * abs(self.cfg.init_logit) / self.search_steps
        return max(1.0, needed / self.cfg.gate_lr)

    def gate_lr(self, step: int) -> float:
        """The gate logits' learning rate at ``step``: a cosine from ``gate_lr`` (times ``gate_speedup``) to zero
        over the search, zero after it (and in its last step, after the landing's last check). At a constant rate,
        clusters of near-zero logits (a whole FFN block's gate among them) kept crossing zero together until the last
        step."""
        search = self.search_steps
        # The step after the landing's last check moves no gate: the structure fixed is the one it landed.
        last = search - 1 if self.landing_start < search else search
        if step >= last:
            return 0.0
        return self.cfg.gate_lr * self.gate_speedup() * 0.5 * (1.0 + math.cos(math.pi * step / search))

    def target_at(self, step: int) -> float:
        """The fraction of the dense cost the budget aims at in ``step``: from 1 down to the target linearly over the
        first ``cfg.target_ramp`` of the search, so that the gates cross the decision boundary a few at a time."""
        if self.target is None:
            return self.cfg.target
        ramp = self.cfg.target_ramp * self.search_steps
        reached = min(1.0, step / ramp) if ramp > 0 else 1.0
        return 1.0 - (1.0 - self.target) * reached

    def _configure(self, step: int) -> None:
        """What ``step`` runs with, a function of the step and the checkpointed state alone: temperature, target,
        the multipliers' ascent, the gates' learning rate, the fixed structure and the retired units."""
        search = self.search_steps
        gated = self.model
        gated.set_temperature(temperature_at(min(step, search), search, self.cfg.tau0, self.cfg.tau_min))
        self.objective.budget.set_target(self.target_at(step))
        self.objective.budget.ascending = step < search
        self.objective.budget.active = step < self.landing_start or step >= search
        for group in self._gate_optimizer.param_groups:
            group["lr"] = self.gate_lr(step) * group["lr_scale"]
        fixed = search < self.total_steps and step >= search
        if self._configured_step is None and not fixed:
            gated.set_retired(self.retired.masks())  # a resumed run leaves out what its last check left out
        gated.fix_structure(fixed)
        self._configured_step = step

    def _ensure_configured(self) -> None:
        self._place_state()
        if self._configured_step != self.step_count:
            self._configure(self.step_count)

    def _place_state(self) -> None:
        """The objective's multipliers follow the model to its device (a no-op once they are there)."""
        device = self.model.gate_step.device
        if self.objective.budget.lambda1.device != device:
            self.objective.to(device)
        if self.teacher is not None:
            self.teacher.eval()

    # ----------------------------------------------------------------------------------------------------------------
    # What the loop calls
    # ----------------------------------------------------------------------------------------------------------------

    def param_groups(self, lr: float | None = None, weight_decay: float = 0.05) -> list[dict]:
        """Optimizer groups of the network weights (not the gate logits, which the pruner steps itself): matrices
        with ``weight_decay``, biases, norms and embeddings without. ``lr`` defaults to ``cfg.lr``."""
        return decay_groups(self.model.weight_parameters(), self.cfg.lr if lr is None else lr, weight_decay)

    def loss(self, images: torch.Tensor | None, targets: torch.Tensor, *, logits: torch.Tensor | None = None,
             teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The HiAP loss of one batch (a scalar to ``backward``).

        Args:
            images: ``[B, C, H, W]``; may be None when ``logits`` (and, with distillation, ``teacher_logits``) are
                given.
            targets: ``[B]`` class indices.
            logits: ``[B, classes]`` of ``pruner.model`` when the loop ran the forward itself (e.g. through DDP).
            teacher_logits: ``[B, classes]`` of the teacher, when the loop ran it.

        The terms of the last call (task, budget, feasibility, MAC fraction; device tensors) are in ``last_terms``.
        """
        self._ensure_configured()
        if images is not None:
            self.choose_training_paths(images)
        if logits is None:
            if images is None:
                raise ValueError("Pruner.loss needs images, or the model's logits")
            logits = self.model(images)
        if teacher_logits is None and self.teacher is not None:
            if images is None:
                raise ValueError("Pruner.loss needs images, or the teacher's logits, for distillation")
            with torch.no_grad():
                teacher_logits = self.teacher(images)
        terms = self.objective(self.model, logits.float(), None if teacher_logits is None else teacher_logits.float(),
                               targets)
        self.last_terms = terms
        return terms.total

    def choose_training_paths(self, images: torch.Tensor, timer=None) -> dict[str, str]:
        """Once, before the first step: on a GPU with the Triton kernels, every gated layer times its two training
        paths on these images' activations and keeps the faster (``HiAPViT.choose_training_paths``); elsewhere the
        masks on the weights, untimed. ``loss(images, ...)`` calls it; a loop that passes only ``logits`` calls it
        itself with a first batch."""
        if self._paths_chosen:
            return {name: module.training_path or "weights" for name, module in self.model.named_gated_modules()}
        self._paths_chosen = True
        if images.device.type != "cuda" and timer is None:
            return {name: "weights" for name, _ in self.model.named_gated_modules()}
        return self.model.choose_training_paths(images, timer)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> list[dict]:
        """After your optimizer's step: step the gate logits, then set up the next step. Returns that step's events
        (``{"event": "fix_structure" | "retire" | "land", "step", ...}``, also kept in ``history`` and logged to the
        ``hiap`` logger), usually none.

        ``scaler``: the ``GradScaler`` of an fp16 loop; call ``pruner.step(scaler)`` before ``scaler.update()``.
        """
        self._ensure_configured()
        if self.step_count < self.search_steps:
            if scaler is not None:
                scaler.step(self._gate_optimizer)
            else:
                self._gate_optimizer.step()
        self._gate_optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self._configure(self.step_count)
        events = [event for event in (self._fix(), self._retire(), self._land()) if event is not None]
        for event in events:
            event["step"] = self.step_count
            self.history.append(event)
            if "message" in event:
                logger.info(event["message"])
        return events

    # ----------------------------------------------------------------------------------------------------------------
    # Checks between steps
    # ----------------------------------------------------------------------------------------------------------------

    def _fix(self) -> dict | None:
        """At the end of the search (``fix_at < 1``): the settling guard, then the structure is fixed."""
        step, search = self.step_count, self.search_steps
        if not (search < self.total_steps and step == search):
            return None
        gated = self.model
        gated.fix_structure(False)  # fixing below reads the settled decision afresh
        searched = self.cost.fraction(gated)
        settling = settle_budget(gated, TOLERANCE, cost=self.cost) or {"steps": 0, "before": searched, "after": searched}
        gated.fix_structure(True)
        moved = f"; settling moved them to {settling['after']:.4f} in {settling['steps']} logit-only steps" \
            if settling["steps"] else ""
        return {"event": FIX_EVENT, "search_steps": search, "total_steps": self.total_steps,
                "target": self.target, **settling,
                "message": f"[hiap] structure fixed after {search} of {self.total_steps} steps: decided "
                           f"{self._unit} {settling['before']:.4f} of dense{moved}; the remaining steps train the "
                           "decided network"}

    def _retire(self) -> dict | None:
        """Every ``retire_every`` steps of the search, retire what is closed for good (one device read); an event
        when that changes what is left out."""
        step = self.step_count
        if self.cfg.retire_below <= 0 or step >= self.search_steps or step % self.cfg.retire_every:
            return None
        before = {name: mask.clone() for name, mask in self.retired.masks().items()}
        counts = self.model.retire_closed(self.cfg.retire_below)
        after = self.model.retired()
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

    def _land(self) -> dict | None:
        """In the last ``cfg.landing`` of the search, every ``LANDING_EVERY`` steps and on its last step: close (or
        open) micro gates in logit order until the decided MACs are within half the tolerance of the target."""
        step, start, search = self.step_count, self.landing_start, self.search_steps
        if not start <= step < search or ((step - start) % LANDING_EVERY and step != search - 1):
            return None
        landed = land_on_budget(self.model, self.target, TOLERANCE, cost=self.cost)
        if not (landed["closed"] or landed["opened"]):
            return None
        event = {"event": LAND_EVENT, **landed}
        if step == start:
            event["message"] = (f"[hiap] step {step}: landing on the budget: decided {self._unit} "
                                f"{landed['before']:.4f} -> {landed['after']:.4f} of dense ({landed['closed']} gates "
                                f"closed, {landed['opened']} opened in logit order)")
        return event

    # ----------------------------------------------------------------------------------------------------------------
    # State, progress and the result
    # ----------------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything of the search besides the model's own state_dict: step, gate optimizer, Lagrange multipliers,
        retired units and the history of events."""
        return {"step": self.step_count, "total_steps": self.total_steps, "config": self.cfg.to_dict(),
                "gate_optimizer": self._gate_optimizer.state_dict(), "objective": self.objective.state_dict(),
                "retired": self.retired.state_dict(), "history": [dict(event) for event in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``; load the model's state first (this reads its logits to restore the fixed
        structure). ValueError when the state belongs to a run with another config or length."""
        if state.get("config") != self.cfg.to_dict():
            raise ValueError("the pruner state was saved with another HiAPConfig")
        if state.get("total_steps") != self.total_steps:
            raise ValueError(f"the pruner state was saved for {state.get('total_steps')} steps, not {self.total_steps}")
        self._gate_optimizer.load_state_dict(state["gate_optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.retired.load_state_dict(state["retired"])
        self.history = [dict(event) for event in state["history"]]
        self.step_count = int(state["step"])
        self._configured_step = None
        self._configure(self.step_count)

    @property
    def _unit(self) -> str:
        return "latency" if self.cfg.budget == "latency" else "MACs"

    @property
    def structure_fixed(self) -> bool:
        return self.model.structure_fixed

    def decided_fraction(self) -> float:
        """MACs of what extraction would keep now, as a fraction of the dense model's (one device read)."""
        return self.cost.fraction(self.model)

    @torch.no_grad()
    def log_values(self) -> dict:
        """Where the search stands, as plain numbers for a log (several device reads: call it on logging steps)."""
        gated = self.model
        keep: dict[str, list[float]] = {"head": [], "qk": [], "v": [], "ffn_block": [], "neuron": []}
        for attn, mlp in zip(gated.attention_layers(), gated.ffn_layers()):
            p_head, p_qk, p_v = attn.gates.keep_probabilities()
            p_block, p_neuron = mlp.gates.keep_probabilities()
            for key, value in (("head", p_head), ("qk", p_qk), ("v", p_v), ("ffn_block", p_block),
                               ("neuron", p_neuron)):
                keep[key].append(round(float(value.mean()), 5))
        budget = self.objective.budget
        counts = gated.retired_counts()
        return {
            "expected_fraction": float(self.cost.expected(gated, StackedGates.of(gated)).total) / self.cost.dense,
            "decided_fraction": self.decided_fraction(),
            "target": self.target,
            "budget": self.cfg.budget,
            "macs_fraction": count_macs(gated) / self.dense_macs,
            "tau": gated.temperature,
            "lambda1": float(budget.lambda1), "lambda2": float(budget.lambda2),
            "keep_probability": keep,
            "retired_heads": counts["heads"],
            "retired_neuron_groups": counts["neuron_groups"],
        }

    def finish(self) -> dict | None:
        """The settling guard for a run that never fixed its structure (``fix_at=1``): ``settle_budget``'s result, or
        None when the structure was fixed (settled then) or the budget is a penalty."""
        if fixed_structure(self.history) is not None:
            return None
        return settle_budget(self.model, TOLERANCE, cost=self.cost)

    def extract(self) -> nn.Module:
        """The physical pruned network (``hiap.extract``) of the search's decision, after ``finish()``."""
        self.finish()
        pruned = extract(self.model)
        source = self.teacher if self.teacher is not None else self.model.vit
        config = getattr(source, "pretrained_cfg", None)
        if config is not None:
            pruned.pretrained_cfg = dict(config)
        return pruned


def budget_of(gated: HiAPViT) -> MacBudget:
    """What ``gated``'s budget counts: the MAC model, or for ``budget="latency"`` the table at ``cfg.latency_table``
    (checked against the model, and against the target: a target below the table's floor is refused naming it)."""
    cfg = gated.cfg
    if cfg.budget != "latency":
        return MacBudget(gated)
    from hiap.method.latency import LatencyBudget, LatencyTable

    cost = LatencyBudget(LatencyTable.load(cfg.latency_table), gated)
    target = resolved_target(cfg, cost)
    first = gated.attention_layers()[0].gates
    floor = cost.table.floor_ms(cfg.min_heads, minimum_count(cfg.min_dim_fraction, first.head_dim // first.group)
                                * first.group)
    if not 0 < target <= 1:
        raise ValueError(f"target_ms {cfg.target_ms:g} is above the dense model's {cost.dense:.3f} ms in the table")
    if target * cost.dense < floor:
        raise ValueError(f"a latency target of {target * cost.dense:.3f} ms is below {floor:.3f} ms, the floor of "
                         f"this model in {cfg.latency_table} (its fixed parts and the feasibility minimums)")
    cost.aim_at(target)
    return cost
