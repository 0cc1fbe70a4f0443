"""The kernel-backend switch: which path HiAP modules run, the plain-PyTorch reference or the Triton kernels.

A leaf module in the manner of timm's ``layers/config.py``: a process default read from the ``HIAP_KERNELS``
environment variable, which a module reads once, when it is built; setters that also work as context managers; a
getter. One model instance can be switched to a backend at any time.

A module decides its kernel path when it is built, switched or moved (timm's ``Final`` pattern, not a lookup per
call): :func:`resolve_kernels` is the one function that turns a backend and a device into the ops to run, checking
that Triton and each op are there and that the kernels run on that device. Every HiAP module with a Triton path
inherits :class:`KernelBackendMixin` and names its ops in ``kernel_names``; ``hiap.optimize``, the fused block, token
reduction and the objective read the tables it resolves. The ops are imported when a table first names them, so this
module imports only torch and the standard library.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Iterable, Literal

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


# The backend a module takes when it is built (as timm's fused-attention default is read in a module's __init__).
_DEFAULT_BACKEND: Backend = _backend_from_env()
_warned_fallback = False


def default_backend() -> Backend:
    """The backend a HiAP module built now takes: ``HIAP_KERNELS``, or what ``use_triton_kernels()`` /
    ``use_reference_kernels()`` without a model set."""
    return _DEFAULT_BACKEND


def load_triton_op(name: str) -> Callable:
    """``hiap_kernels.<name>``; raises ImportError / AttributeError when Triton or the op is unavailable."""
    return getattr(importlib.import_module(KERNELS_PACKAGE), name)


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels run on tensors of ``device`` (CUDA, or the CPU under the interpreter); False when
    Triton cannot be imported."""
    try:
        can_run = load_triton_op("can_run_triton")
    except (ImportError, AttributeError):
        return False
    return bool(can_run(torch.empty(0, device=device)))


def resolve_kernels(names: Iterable[str], backend: Backend, device: torch.device | str) -> dict[str, Callable | None]:
    """The one kernel dispatch: each op of ``names`` that a module on ``device`` runs under ``backend``.

    ``{name: op}`` with ``hiap_kernels.<name>`` on the Triton backend where the kernels run on ``device``, and
    ``{name: None}`` (the module's PyTorch path) on the reference backend or where they do not run.

    Raises:
        ValueError: ``backend`` is not one of ``BACKENDS``.
        RuntimeError: the Triton backend is asked for and an op cannot be imported (Triton missing).
    """
    names = tuple(names)
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend != "triton" or not triton_runs_on(device):
        return dict.fromkeys(names)
    try:
        return {name: load_triton_op(name) for name in names}
    except (ImportError, AttributeError) as error:
        raise RuntimeError(f"Triton kernels are not available: {error}") from None


class KernelBackendMixin:
    """The kernel path of a module with a Triton path, decided when it is built, switched or moved.

    ``kernel_names`` names the ops of ``hiap_kernels`` the module (and a block or objective reading it) may run, the
    first, ``triton_op``, its own. ``kernel_backend`` is the backend it is on; ``kernels`` the table
    :func:`resolve_kernels` gave for it and the device of its parameters. A forward reads the table, never decides.
    """

    kernel_names: tuple[str, ...] = ()
    triton_op: str = ""
    kernel_backend = "reference"  # a Backend (no annotation: TorchScript could not read it, and infers a str)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.triton_op = cls.kernel_names[0] if cls.kernel_names else ""

    def resolve_kernels(self, backend: Backend | None = None) -> None:
        """Decide the module's kernels for ``backend`` (default: the one it is on) where its parameters are.

        Called at the end of ``__init__`` (with :func:`default_backend`), by the backend switch and after every move
        (``.to``, ``.cuda``, ``.half``).
        """
        if backend is not None:
            self.kernel_backend = backend
        first = next(self.parameters(), None)  # type: ignore[attr-defined]
        device = first.device if first is not None else torch.device("cpu")
        self.kernels = resolve_kernels(self.kernel_names, self.kernel_backend, device)
        # On the Triton backend where the kernels do not run, the first forward says so (once in the process).
        self.kernel_fallback = self.kernel_backend == "triton" and self.kernels[self.kernel_names[0]] is None

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        self.resolve_kernels()
        return module

    def kernel(self, name: str | None = None) -> Callable | None:
        """The resolved op ``name`` (default: ``triton_op``), or None for the PyTorch path."""
        if self.kernel_fallback:
            _warn_fallback()
        return self.kernels[name or self.kernel_names[0]]


def _warn_fallback() -> None:
    global _warned_fallback
    if not _warned_fallback:
        warnings.warn("hiap: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU); running the PyTorch "
                      "reference path instead", RuntimeWarning, stacklevel=4)
        _warned_fallback = True


def backend_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that run through a kernel backend."""
    return [m for m in model.modules() if isinstance(m, KernelBackendMixin)]


def missing_triton_ops(kinds: list[type] | None = None) -> list[str]:
    """Names of the module classes among ``kinds`` (all known ones when None) whose Triton ops cannot be imported."""
    if kinds is None:
        kinds = _known_kinds(KernelBackendMixin)
    missing = []
    for kind in kinds:
        try:
            load_triton_op("can_run_triton")
            for name in kind.kernel_names:
                load_triton_op(name)
        except Exception:
            missing.append(kind.__name__)
    return sorted(set(missing))


def _known_kinds(base: type) -> list[type]:
    kinds = []
    for sub in base.__subclasses__():
        if sub.kernel_names:
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
        global _DEFAULT_BACKEND
        _model_argument(model, f"use_{name}_kernels")
        self._model = model
        if model is None:
            _check_backend(name)
            self._previous_default = _DEFAULT_BACKEND
            _DEFAULT_BACKEND = name
        else:
            modules = backend_modules(model)
            if not modules:
                raise ValueError(
                    f"{type(model).__name__} holds no HiAP modules; pass a model from hiap.gate_vit or hiap.extract"
                )
            _check_backend(name, modules)
            self._previous_modules = [(m, m.kernel_backend) for m in modules]
            for module in modules:
                module.resolve_kernels(name)

    def __enter__(self) -> "_BackendSwitch":
        return self

    def __exit__(self, *exc) -> None:
        global _DEFAULT_BACKEND
        if self._model is None:
            _DEFAULT_BACKEND = self._previous_default
        else:
            for module, previous in self._previous_modules:
                module.resolve_kernels(previous)


def use_triton_kernels(model: nn.Module | None = None) -> _BackendSwitch:
    """Route HiAP modules through the Triton kernels: one model instance, or (``model=None``) every HiAP module
    built from now on (``gate_vit``, ``extract``, ``load_pruned``), as ``HIAP_KERNELS=triton`` does.

    A model switched takes its kernels at once; also usable as ``with hiap.use_triton_kernels(model): ...`` to restore
    the previous backend on exit. Parameters and state_dict keys do not change. The kernels run on CUDA tensors, and
    on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``); a model moved there takes them then.
    Elsewhere (a model on a CPU without the interpreter) the modules run the PyTorch reference path, warn once, and
    :func:`kernels_in_use` reports ``"reference"`` for that model.

    Raises:
        RuntimeError: the Triton ops cannot be imported (Triton missing).
        ValueError: ``model`` holds no HiAP modules.
        TypeError: ``model`` is neither an ``nn.Module`` nor None.
    """
    return _BackendSwitch("triton", model)


def use_reference_kernels(model: nn.Module | None = None) -> _BackendSwitch:
    """Route HiAP modules through the plain-PyTorch reference path (one model, or every module built from now on);
    see use_triton_kernels."""
    return _BackendSwitch("reference", model)


def kernels_in_use(model: nn.Module | None = None) -> Backend:
    """``"triton"`` or ``"reference"``: the default of modules built now; or the path a model's HiAP modules run where
    the model is now, which is the reference path for a model switched to Triton whose weights lie where Triton
    cannot run.

    Raises:
        ValueError: the model's modules run different paths.
        TypeError: ``model`` is neither an ``nn.Module`` nor None.
    """
    _model_argument(model, "kernels_in_use")
    if model is None:
        return _DEFAULT_BACKEND
    backends = {"reference" if m.kernels[m.triton_op] is None else "triton" for m in backend_modules(model)}
    if len(backends) > 1:
        raise ValueError(f"the modules of this model use different backends: {sorted(backends)}")
    return backends.pop() if backends else _DEFAULT_BACKEND


def runs_triton_kernels(model: nn.Module, device: torch.device | str) -> bool:
    """Whether a forward of ``model`` on ``device`` launches compiled Triton kernels (CUDA; the interpreter compiles
    nothing), which the first call of each shape compiles."""
    if torch.device(device).type != "cuda":
        return False
    return any(m.kernel_backend == "triton" for m in backend_modules(model))
