"""The kernel-backend switch: which path HiAP modules run, the plain-PyTorch reference or the Triton kernels.

A leaf module in the manner of timm's ``layers/config.py``: a process-wide default read from the ``HIAP_KERNELS``
environment variable, setters that also work as context managers, a getter; on top of that one model instance can be
pinned to a backend. Every HiAP module that has a Triton path inherits :class:`KernelBackendMixin` and names its op
(a public function of ``hiap_kernels``) in ``triton_op``; the op is imported when first needed, so this module
imports only torch and the standard library.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Literal

import torch
import torch.nn as nn

Backend = Literal["reference", "triton"]
BACKENDS = ("reference", "triton")
ENV_VAR = "HIAP_KERNELS"
KERNELS_PACKAGE = "hiap_kernels"


def _backend_from_env() -> Backend:
    value = os.environ.get(ENV_VAR, "reference").strip().lower()
    if value not in BACKENDS:
        warnings.warn(f"{ENV_VAR}={value!r} is not one of {BACKENDS}; using 'reference'", stacklevel=2)
        return "reference"
    return value  # type: ignore[return-value]


_GLOBAL_BACKEND: Backend = _backend_from_env()
# Triton ops by name, filled on first use so that a forward pass (also one traced by torch.compile) only looks up.
_LOADED_OPS: dict[str, Callable] = {}
_warned_fallback = False


def load_triton_op(name: str) -> Callable:
    """``hiap_kernels.<name>``; raises ImportError / AttributeError when Triton or the op is unavailable."""
    op = _LOADED_OPS.get(name)
    if op is None:
        op = getattr(importlib.import_module(KERNELS_PACKAGE), name)
        _LOADED_OPS[name] = op
    return op


def _triton_can_run(*tensors: torch.Tensor) -> bool:
    return load_triton_op("can_run_triton")(*tensors)


class KernelBackendMixin:
    """Per-instance backend choice for a module with a Triton path.

    ``triton_op`` names the module's op in ``hiap_kernels``; ``kernel_backend`` None follows the global switch.
    """

    triton_op: str = ""
    kernel_backend: Backend | None = None

    def triton_kernel(self, *tensors: torch.Tensor, op: str | None = None) -> Callable | None:
        """The Triton op to run on ``tensors`` (``triton_op``, or the op named ``op``), or None for the reference path.

        When the Triton backend is selected but cannot run on these tensors (CPU tensors without the interpreter),
        warns once per process and returns None.
        """
        global _warned_fallback
        if (self.kernel_backend or _GLOBAL_BACKEND) != "triton":
            return None
        if _triton_can_run(*tensors):
            return load_triton_op(op or self.triton_op)
        if not _warned_fallback:
            warnings.warn(
                "hiap: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU); "
                "running the PyTorch reference path instead",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned_fallback = True
        return None


def backend_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that run through a kernel backend."""
    return [m for m in model.modules() if isinstance(m, KernelBackendMixin)]


def missing_triton_ops(kinds: list[type] | None = None) -> list[str]:
    """Names of the module classes among ``kinds`` (all known ones when None) whose Triton op cannot be imported."""
    if kinds is None:
        kinds = _known_kinds(KernelBackendMixin)
    missing = []
    for kind in kinds:
        try:
            load_triton_op(kind.triton_op)
            load_triton_op("can_run_triton")
        except Exception:
            missing.append(kind.__name__)
    return sorted(set(missing))


def _known_kinds(base: type) -> list[type]:
    kinds = []
    for sub in base.__subclasses__():
        if sub.triton_op:
            kinds.append(sub)
        kinds.extend(_known_kinds(sub))
    return kinds


def _check_backend(name: str, modules: list[nn.Module] | None = None) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    if name != "triton":
        return
    missing = missing_triton_ops(None if modules is None else list({type(m) for m in modules}))
    if missing:
        raise RuntimeError(f"Triton kernels are not available for: {missing}")


def _model_argument(model, who: str) -> None:
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module (from hiap.gate_vit or hiap.extract) or None, got "
                        f"{type(model).__name__}")


class _BackendSwitch:
    """Applied at construction; as a context manager, restores what was in force before on exit."""

    def __init__(self, name: Backend, model: nn.Module | None):
        global _GLOBAL_BACKEND
        _model_argument(model, f"use_{name}_kernels")
        self._model = model
        if model is None:
            _check_backend(name)
            self._previous_global = _GLOBAL_BACKEND
            _GLOBAL_BACKEND = name
        else:
            modules = backend_modules(model)
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
    exit. Parameters and state_dict keys do not change. The kernels run on CUDA tensors, and on CPU tensors under the
    Triton interpreter (``TRITON_INTERPRET=1``); elsewhere (a model on a CPU without it) the modules run the PyTorch
    reference path, warn once, and :func:`kernels_in_use` reports ``"reference"`` for that model.

    Raises:
        RuntimeError: the Triton ops cannot be imported (Triton missing).
        ValueError: ``model`` holds no HiAP modules.
        TypeError: ``model`` is neither an ``nn.Module`` nor None.
    """
    return _BackendSwitch("triton", model)


def use_reference_kernels(model: nn.Module | None = None) -> _BackendSwitch:
    """Route HiAP modules through the plain-PyTorch reference path (globally or for one model); see use_triton_kernels."""
    return _BackendSwitch("reference", model)


def _runs_triton_here(module: nn.Module) -> bool:
    """Whether ``module``'s Triton op can run where its weights are (CUDA, or the CPU under the interpreter)."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        return True
    try:
        return _triton_can_run(tensor)
    except Exception:  # Triton or the op cannot be imported
        return False


def kernels_in_use(model: nn.Module | None = None) -> Backend:
    """``"triton"`` or ``"reference"``: the global backend; or the path a model's HiAP modules run where the model
    is now, which is the reference path for a model switched to Triton whose weights lie where Triton cannot run.

    Raises:
        ValueError: the model's modules run different paths.
        TypeError: ``model`` is neither an ``nn.Module`` nor None.
    """
    _model_argument(model, "kernels_in_use")
    if model is None:
        return _GLOBAL_BACKEND
    backends = {"triton" if (m.kernel_backend or _GLOBAL_BACKEND) == "triton" and _runs_triton_here(m)
                else "reference" for m in backend_modules(model)}
    if len(backends) > 1:
        raise ValueError(f"the modules of this model use different backends: {sorted(backends)}")
    return backends.pop() if backends else _GLOBAL_BACKEND


def runs_triton_kernels(model: nn.Module, device: torch.device | str) -> bool:
    """Whether a forward of ``model`` on ``device`` launches compiled Triton kernels (CUDA; the interpreter compiles
    nothing), which the first call of each shape compiles."""
    if torch.device(device).type != "cuda":
        return False
    return any((m.kernel_backend or _GLOBAL_BACKEND) == "triton" for m in backend_modules(model))
