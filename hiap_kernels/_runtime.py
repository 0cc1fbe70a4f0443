"""What every launcher needs: interpreter detection, one config under the interpreter, and input guards."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch


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


def can_run_triton(*tensors: torch.Tensor) -> bool:
    """Whether Triton kernels can run on these tensors: CUDA tensors, or CPU tensors under the interpreter."""
    if not triton_available():
        return False
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and interpreter_active()


def pick_configs(configs: Sequence, interpreter_config):
    """The autotune config list: several on a GPU, exactly one under the interpreter (multi-config autotune fails there)."""
    return [interpreter_config] if interpreter_active() else list(configs)


def next_power_of_2_at_least_16(n: int) -> int:
    """Smallest power of two >= max(n, 16): ``tl.arange`` needs powers of two and ``tl.dot`` dimensions >= 16."""
    p = 16
    while p < n:
        p *= 2
    return p


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    tensor: torch.Tensor,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Sequence[torch.dtype] = _FLOAT_DTYPES,
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
