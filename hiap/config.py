"""HiAP hyperparameters (one validated dataclass) and the kernel-backend switch.

The switch follows timm's ``layers/config.py``: a process-wide default read from the ``HIAP_KERNELS`` environment
variable, a setter, a getter and context managers; on top of that a model instance can be pinned to a backend.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

BudgetMode = Literal["penalty", "target"]
Backend = Literal["reference", "triton"]
BACKENDS = ("reference", "triton")


@dataclass
class HiAPConfig:
    """Every HiAP hyperparameter, with the defaults of DESIGN.md / the paper (DeiT-S).

    Gates:
        init_logit: starting logit of every gate (open: sigmoid(3) = 0.95).
        dim_group: micro-gate group size for head dims and FFN neurons (1, or 8/16 for tensor-core aligned widths).
        hard: straight-through hard gates (the paper); False uses the soft relaxation in the forward pass.
        tau0, tau_min: Gumbel-Sigmoid temperature annealed exponentially from tau0 to tau_min.
        seed: base seed of the gate-noise stream (combined with the step counter of the gated model).
    Budget:
        budget: "penalty" (lambda-weighted expected cost, the paper) or "target" (learned Lagrangian that lands the
            extracted MACs on ``target`` x dense MACs).
        target: MAC fraction of the dense model to reach in "target" mode, in (0, 1].
        lambda_macro, lambda_micro: weights of the macro (heads, FFN blocks) and micro (dims, neurons) cost terms.
        lagrangian_lr: learning rate of the two Lagrange multipliers in "target" mode (gradient ascent).
    Feasibility (soft penalties during training, hard minimums in the decision):
        min_heads: heads kept per layer at least.
        min_dim_fraction: fraction of q/k and of v dims kept per kept head at least.
        min_neuron_fraction: fraction of neurons kept per kept FFN block at least.
        feasibility_weight: weight of the squared-ReLU feasibility penalties.
    Distillation:
        kd_alpha, kd_temperature: L = (1 - alpha) CE + alpha T^2 KL(teacher/T || student/T).
    Optimisation:
        lr: learning rate of the network weights; gate_lr: of the gate logits (their own group).
    """

    init_logit: float = 3.0
    dim_group: int = 1
    hard: bool = True
    tau0: float = 2.0
    tau_min: float = 0.5
    seed: int = 0
    budget: BudgetMode = "target"
    target: float = 2.0 / 3.0
    lambda_macro: float = 0.9
    lambda_micro: float = 0.45
    lagrangian_lr: float = 0.05
    min_heads: int = 1
    min_dim_fraction: float = 0.125
    min_neuron_fraction: float = 0.05
    feasibility_weight: float = 1.0
    kd_alpha: float = 0.7
    kd_temperature: float = 4.0
    lr: float = 1e-4
    gate_lr: float = 0.05

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "HiAPConfig":
        """Raise ValueError naming the first out-of-range field."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"HiAPConfig: {message}")

        for name in ("init_logit", "tau0", "tau_min", "target", "lambda_macro", "lambda_micro", "lagrangian_lr",
                     "min_dim_fraction", "min_neuron_fraction", "feasibility_weight", "kd_alpha",
                     "kd_temperature", "lr", "gate_lr"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value), f"{name} must be a finite number, got {value!r}")
        need(isinstance(self.dim_group, int) and self.dim_group >= 1, f"dim_group must be an integer >= 1, got {self.dim_group!r}")
        need(self.tau0 > 0 and self.tau_min > 0, f"temperatures must be > 0, got tau0={self.tau0}, tau_min={self.tau_min}")
        need(self.tau_min <= self.tau0, f"tau_min ({self.tau_min}) must not exceed tau0 ({self.tau0})")
        need(self.budget in ("penalty", "target"), f"budget must be 'penalty' or 'target', got {self.budget!r}")
        need(0.0 < self.target <= 1.0, f"target must lie in (0, 1], got {self.target}")
        for name in ("lambda_macro", "lambda_micro", "lagrangian_lr", "feasibility_weight", "lr", "gate_lr"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(isinstance(self.min_heads, int) and self.min_heads >= 0, f"min_heads must be an integer >= 0, got {self.min_heads!r}")
        for name in ("min_dim_fraction", "min_neuron_fraction", "kd_alpha"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} must lie in [0, 1], got {getattr(self, name)}")
        need(self.kd_temperature > 0, f"kd_temperature must be > 0, got {self.kd_temperature}")
        need(isinstance(self.seed, int) and 0 <= self.seed < 2**31, f"seed must be an integer in [0, 2**31), got {self.seed!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "HiAPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"HiAPConfig: unknown fields {unknown}")
        return cls(**values)


# --------------------------------------------------------------------------------------------------------------------
# Kernel backend switch
# --------------------------------------------------------------------------------------------------------------------

def _backend_from_env() -> Backend:
    value = os.environ.get("HIAP_KERNELS", "reference").strip().lower()
    if value not in BACKENDS:
        warnings.warn(f"HIAP_KERNELS={value!r} is not one of {BACKENDS}; using 'reference'", stacklevel=2)
        return "reference"
    return value  # type: ignore[return-value]


_GLOBAL_BACKEND: Backend = _backend_from_env()


def _backend_modules(model: nn.Module) -> list[nn.Module]:
    """The HiAP modules of ``model`` that run through a kernel backend."""
    from hiap.modules import KernelBackendMixin

    return [m for m in model.modules() if isinstance(m, KernelBackendMixin)]


def _check_backend(name: str, modules: list[nn.Module] | None = None) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    if name != "triton":
        return
    from hiap.modules import triton_support

    missing = triton_support(modules)
    if missing:
        raise RuntimeError(f"Triton kernels are not available for: {missing}")


class _BackendSwitch:
    """Applied at construction; as a context manager, restores what was in force before on exit."""

    def __init__(self, name: Backend, model: nn.Module | None):
        global _GLOBAL_BACKEND
        self._model = model
        if model is None:
            _check_backend(name)
            self._previous_global = _GLOBAL_BACKEND
            _GLOBAL_BACKEND = name
        else:
            modules = _backend_modules(model)
            if not modules:
                raise ValueError(
                    f"{type(model).__name__} holds no HiAP modules; pass a model from hiap.gate_vit or hiap.extract"
                )
            _check_backend(name, modules)
            self._previous_modules = [(m, m.kernel_backend) for m in modules]
            for module in modules:
                module.kernel_backend = name

    def __enter__(self) -> "_BackendSwitch":
        return self

    def __exit__(self, *exc) -> None:
        global _GLOBAL_BACKEND
        if self._model is None:
            _GLOBAL_BACKEND = self._previous_global
        else:
            for module, previous in self._previous_modules:
                module.kernel_backend = previous


def use_triton_kernels(model: nn.Module | None = None) -> _BackendSwitch:
    """Route HiAP modules through the Triton kernels: all models (``model=None``) or one model instance.

    Takes effect at once; also usable as ``with hiap.use_triton_kernels(): ...`` to restore the previous backend on
    exit. Parameters and state_dict keys do not change. Raises RuntimeError when the kernels are not available.
    """
    return _BackendSwitch("triton", model)


def use_reference_kernels(model: nn.Module | None = None) -> _BackendSwitch:
    """Route HiAP modules through the plain-PyTorch reference path (globally or for one model); see use_triton_kernels."""
    return _BackendSwitch("reference", model)


def kernels_in_use(model: nn.Module | None = None) -> Backend:
    """``"triton"`` or ``"reference"``: the global backend, or the one a model's HiAP modules follow."""
    if model is None:
        return _GLOBAL_BACKEND
    backends = {m.kernel_backend or _GLOBAL_BACKEND for m in _backend_modules(model)}
    if len(backends) > 1:
        raise ValueError(f"the modules of this model use different backends: {sorted(backends)}")
    return backends.pop() if backends else _GLOBAL_BACKEND
