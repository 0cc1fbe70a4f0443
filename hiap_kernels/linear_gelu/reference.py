"""Plain-PyTorch twin of the fused fc1 + bias + GELU inference kernel in ``kernel.py`` (no Triton import)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GELU_APPROXIMATIONS = ("none", "tanh")


def linear_gelu_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none"
) -> torch.Tensor:
    """``GELU(x @ weight^T + bias)``, the first half of a pruned FFN block at its kept width.

    Args:
        x: ``[..., D]``.
        weight: ``[F, D]`` (fc1 weight rows of the kept neurons).
        bias: ``[F]`` or None.
        approximate: ``"none"`` (erf GELU, timm's default) or ``"tanh"``.

    Returns:
        ``[..., F]`` in x's dtype.
    """
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)
