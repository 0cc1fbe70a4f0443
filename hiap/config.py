"""HiAP hyperparameters: one validated dataclass (the kernel-backend switch lives in ``hiap.backend``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

BudgetMode = Literal["penalty", "target", "latency"]


@dataclass
class HiAPConfig:
    """Every HiAP hyperparameter, with the paper's defaults for DeiT-S where it gives them.

    Gates:
        init_logit: starting logit of every gate (open: sigmoid(3) = 0.95).
        dim_group: micro-gate group size: 0 aligns to the hardware (q/k and v widths in multiples of 16, FFN widths in
            multiples of 128, smaller for small models), 1 is the paper's per-dim gates, any other divisor of the head
            dim and FFN width groups that many dims or neurons per gate.
        neuron_group: FFN neuron group size when it should differ from dim_group (0 follows dim_group).
        hard: straight-through hard gates (the paper); False uses the soft relaxation in the forward pass.
        order_units: before the search, order each head's q/k and v dims and each FFN's neurons by weight magnitude
            (the function is unchanged), so that a micro gate's group holds units of like magnitude
            (``hiap.method.convert.order_units_by_magnitude``); the baselines of ``hiap compare`` choose from the
            same order.
        tau0, tau_min: Gumbel-Sigmoid temperature annealed exponentially from tau0 to tau_min.
        seed: base seed of the gate-noise stream (combined with the step counter of the gated model).
    Budget:
        budget: "penalty" (lambda-weighted expected cost, the paper), "target" (learned Lagrangian that lands the
            extracted MACs on ``target`` x dense MACs) or "latency" (the same on the latency a measured table
            predicts: ``hiap profile`` writes one for the device the model will run on).
        target: fraction of the dense model's MACs ("target") or latency ("latency") to reach, in (0, 1].
        latency_table: path of the latency table (JSON from ``hiap profile``) a "latency" budget reads.
        target_ms: a "latency" budget in milliseconds instead of ``target`` (the table's dense latency sets the
            fraction).
        lambda_macro, lambda_micro: weights of the macro (heads, FFN blocks) and micro (dims, neurons) cost terms.
        lagrangian_lr: step size of the Lagrange multipliers' plain gradient ascent in "target" mode
            (l1 += lagrangian_lr gap, l2 += lagrangian_lr gap^2 each step of the search).
        gap_weight: starting value of the quadratic multiplier l2: a restoring force proportional to the gap from
            the first step.
        target_ramp: fraction of the search over which the target falls linearly from 1 to ``target`` (0: the target
            from the first step), so that the gates cross the decision boundary a few at a time.
        landing: fraction of the search at its end in which the controller lands the decided MACs on the target:
            every 10 steps it closes the open micro gates (q/k, v, neuron groups) with the lowest logits, or opens
            the closed ones with the highest, until the decided MACs lie within half a percent of the target, and
            the search goes on training that structure (0: no landing; settling at the fix then does it).
        fix_at: fraction of the run after which the structure is fixed (gates and multipliers stop, the decision is
            settled onto the target and the rest of the run trains the weights of the network extraction keeps);
            1 lets the gates learn to the last step, as in the paper.
        retire_below, retire_every: while the gates search, every ``retire_every`` steps the heads and neuron groups
            whose gate opens with probability under ``retire_below`` (and that the decision removes) are retired:
            held closed and left out of the forward and backward until the next check, so steps get cheaper as the
            run prunes (``HiAPViT.retire_closed``; one device read per check, so the default is a multiple of the
            CLI's logging interval). ``retire_below=0`` samples every gate to the end of the search, as in the paper.
    Feasibility (soft penalties during training, hard minimums in the decision):
        min_heads: heads kept per layer at least.
        min_dim_fraction: fraction of q/k and of v dims kept per kept head at least.
        min_neuron_fraction: fraction of neurons kept per kept FFN block at least.
        feasibility_weight: weight of the squared-ReLU feasibility penalties.
    Distillation:
        kd_alpha, kd_temperature: L = (1 - alpha) CE + alpha T^2 KL(teacher/T || student/T).
    Optimisation:
        lr: learning rate of the network weights; gate_lr: of the gate logits (their own group).
        macro_lr: factor on ``gate_lr`` for the macro gates (heads, FFN blocks). Adam moves every logit at about its
            learning rate, so at 1 one block logit closes a whole FFN as fast as one neuron group's logit closes that
            group; at a tenth a head or FFN block closes whole only once its units have been closing.
    """

    init_logit: float = 3.0
    dim_group: int = 0
    neuron_group: int = 0
    hard: bool = True
    order_units: bool = True
    tau0: float = 2.0
    tau_min: float = 0.5
    seed: int = 0
    budget: BudgetMode = "target"
    target: float = 2.0 / 3.0
    latency_table: str | None = None
    target_ms: float | None = None
    lambda_macro: float = 0.9
    lambda_micro: float = 0.45
    lagrangian_lr: float = 1.0
    gap_weight: float = 5.0
    target_ramp: float = 0.5
    landing: float = 0.2
    fix_at: float = 0.75
    retire_below: float = 0.01
    retire_every: int = 50
    min_heads: int = 1
    min_dim_fraction: float = 0.125
    min_neuron_fraction: float = 0.05
    feasibility_weight: float = 1.0
    kd_alpha: float = 0.7
    kd_temperature: float = 4.0
    lr: float = 1e-4
    gate_lr: float = 0.05
    macro_lr: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "HiAPConfig":
        """Raise ValueError naming the first out-of-range field."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"HiAPConfig: {message}")

        for name in ("init_logit", "tau0", "tau_min", "target", "lambda_macro", "lambda_micro", "lagrangian_lr",
                     "gap_weight", "target_ramp", "landing", "fix_at", "retire_below", "min_dim_fraction", "min_neuron_fraction",
                     "feasibility_weight", "kd_alpha",
                     "kd_temperature", "lr", "gate_lr", "macro_lr"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value), f"{name} must be a finite number, got {value!r}")
        for name in ("dim_group", "neuron_group"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 f"{name} must be an integer >= 0 (0 = hardware-aligned), got {value!r}")
        need(self.tau0 > 0 and self.tau_min > 0, f"temperatures must be > 0, got tau0={self.tau0}, tau_min={self.tau_min}")
        need(self.tau_min <= self.tau0, f"tau_min ({self.tau_min}) must not exceed tau0 ({self.tau0})")
        need(self.budget in ("penalty", "target", "latency"),
             f"budget must be 'penalty', 'target' or 'latency', got {self.budget!r}")
        need(self.latency_table is None or (isinstance(self.latency_table, str) and self.latency_table),
             f"latency_table must be a path, got {self.latency_table!r}")
        need(self.budget != "latency" or self.latency_table is not None,
             "a latency budget needs latency_table (write one with hiap profile)")
        need(self.target_ms is None or (isinstance(self.target_ms, (int, float)) and not isinstance(self.target_ms, bool)
                                        and math.isfinite(self.target_ms) and self.target_ms > 0),
             f"target_ms must be a number > 0, got {self.target_ms!r}")
        need(self.target_ms is None or self.budget == "latency", "target_ms needs budget='latency'")
        need(0.0 < self.target <= 1.0, f"target must lie in (0, 1], got {self.target}")
        need(0.0 < self.fix_at <= 1.0, f"fix_at must lie in (0, 1], got {self.fix_at}")
        need(0.0 <= self.retire_below <= 0.5, f"retire_below must lie in [0, 0.5], got {self.retire_below}")
        need(isinstance(self.retire_every, int) and not isinstance(self.retire_every, bool) and self.retire_every >= 1,
             f"retire_every must be an integer >= 1, got {self.retire_every!r}")
        need(0.0 <= self.target_ramp <= 1.0, f"target_ramp must lie in [0, 1], got {self.target_ramp}")
        need(0.0 <= self.landing < 1.0, f"landing must lie in [0, 1), got {self.landing}")
        need(self.target_ramp + self.landing <= 1.0,
             f"target_ramp + landing must not exceed 1 (the ramp ends before the landing starts), got "
             f"{self.target_ramp} + {self.landing}")
        for name in ("lambda_macro", "lambda_micro", "lagrangian_lr", "gap_weight", "feasibility_weight", "lr",
                     "gate_lr", "macro_lr"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(isinstance(self.min_heads, int) and self.min_heads >= 0, f"min_heads must be an integer >= 0, got {self.min_heads!r}")
        for name in ("min_dim_fraction", "min_neuron_fraction", "kd_alpha"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} must lie in [0, 1], got {getattr(self, name)}")
        need(self.kd_temperature > 0, f"kd_temperature must be > 0, got {self.kd_temperature}")
        need(isinstance(self.seed, int) and 0 <= self.seed < 2**31, f"seed must be an integer in [0, 2**31), got {self.seed!r}")
        return self

    @property
    def lands_on_target(self) -> bool:
        """Whether the budget is a target the search lands on (MACs or latency), not a penalty."""
        return self.budget in ("target", "latency")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "HiAPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"HiAPConfig: unknown fields {unknown}")
        return cls(**values)
