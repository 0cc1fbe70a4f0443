"""``residual + gamma * (x @ W^T + b)``: attention's proj and the FFN's fc2 with the block's residual add (and
LayerScale, when the model has it) in PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_residual_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              residual: torch.Tensor, layer_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K]``, ``weight [D, K]``, ``bias [D]`` or None, ``residual [..., D]``, ``layer_scale [D]`` or None
    -> ``[..., D]``."""
    out = F.linear(x, weight, bias)
    if layer_scale is not None:
        out = out * layer_scale
    return residual + out
