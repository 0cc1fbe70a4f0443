"""Plain-PyTorch twin of the fused fc1 + bias + GELU inference kernel in ``kernel.py`` (no Triton import)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GELU_APPROXIMATIONS = ("none", "tanh")


def gelu_reference(pre: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU of ``pre`` with the kernels' policy for what is not finite: +inf, -inf and NaN give NaN.

    ``F.gelu`` alone answers inf differently from one device to another (NaN on a CPU, inf on a GPU for +inf) and
    turns -inf into a plausible 0 (or NaN); the fused kernels' epilogue (``common.tiles.gelu``) and this reference
    give NaN for every non-finite pre-activation, so a broken input stays visible downstream.
    """
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    # F.gelu(NaN) is NaN everywhere; only the infinities need the mask (in place where no gradient is asked for:
    # the output is a fresh tensor).
    out = F.gelu(pre, approximate=approximate)
    if out.requires_grad:
        return out.masked_fill(pre.isinf(), float("nan"))
    return out.masked_fill_(pre.isinf(), float("nan"))


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
        ``[..., F]`` in x's dtype; NaN where the pre-activation is not finite (:func:`gelu_reference`).
    """
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    return gelu_reference(F.linear(x, weight, bias), approximate)
