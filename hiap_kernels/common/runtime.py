"""Host-side policy every launcher follows: where Triton runs, autotune configs, input checks, tl.dot precision and
output allocation. No Triton import, so ``import hiap_kernels`` works where Triton is missing.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_active() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_available() -> bool:
    """True when ``triton`` imports."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def kernel_cache_dir() -> str | None:
    """Where Triton keeps compiled kernels (and cached autotune choices) between processes; None without Triton."""
    if not triton_available():
        return None
    try:  # Triton >= 3.4 reads TRITON_CACHE_DIR through its knobs
        from triton import knobs

        return knobs.cache.dir
    except (ImportError, AttributeError):
        pass
    try:
        from triton.runtime.cache import default_cache_dir

        return os.environ.get("TRITON_CACHE_DIR") or default_cache_dir()
    except ImportError:  # pragma: no cover - the documented default
        return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def can_run_triton(*tensors: torch.Tensor) -> bool:
    """Whether Triton kernels can run on these tensors: CUDA tensors, or CPU tensors under the interpreter."""
    if not triton_available():
        return False
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and interpreter_active()


def require_triton_device(op: str, tensor: torch.Tensor, reference: str) -> None:
    """RuntimeError naming ``reference`` unless ``tensor`` lives where the Triton kernels run."""
    if not can_run_triton(tensor):
        raise RuntimeError(
            f"{op} runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before importing triton; "
            f"got a tensor on {tensor.device} (use {reference} instead)"
        )


def pick_configs(configs: Sequence, interpreter_config):
    """The autotune config list: several on a GPU, exactly one under the interpreter (multi-config autotune fails there)."""
    return [interpreter_config] if interpreter_active() else list(configs)


def next_power_of_2_at_least_16(n: int) -> int:
    """Smallest power of two >= max(n, 16): ``tl.arange`` needs powers of two and ``tl.dot`` dimensions >= 16."""
    p = 16
    while p < n:
        p *= 2
    return p


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs follow torch's matmul precision setting, as ``F.linear`` does
    (IEEE fp32 products unless ``torch.set_float32_matmul_precision`` allowed TF32); halves are unaffected."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def check_tensor(
    name: str,
    tensor: torch.Tensor,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> None:
    """Raise a clear TypeError/ValueError when ``tensor`` has the wrong type, rank, dtype or device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if tensor.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {tensor.dtype}; supported: {', '.join(str(d) for d in dtypes)}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the other inputs are on {device}")


# ---------------------------------------------------------------------------------------------------------------------
# Allocation: every buffer a kernel writes comes from ``empty``, so tests can fill them all with NaN and catch an
# element that a kernel forgets to write.
# ---------------------------------------------------------------------------------------------------------------------

_poison_depth = 0


def unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when its last stride is 1 (the kernels read any other strides), else a contiguous copy."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def empty(shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` for kernel outputs and workspaces; NaN-filled (integers: -1) inside ``poisoned_allocations``."""
    if isinstance(shape, int):
        shape = (shape,)
    if _poison_depth:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Inside this block every buffer the kernels allocate starts as NaN (a testing aid; costs one fill per buffer)."""
    global _poison_depth
    _poison_depth += 1
    try:
        yield
    finally:
        _poison_depth -= 1
