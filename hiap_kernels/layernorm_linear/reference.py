"""``act(LayerNorm(x) @ W^T + b)`` in PyTorch: a block's norm1 -> qkv, or norm2 -> fc1 -> GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hiap_kernels.linear_gelu.reference import gelu_reference

ACTIVATIONS = ("none", "gelu", "gelu_tanh")


def layernorm_linear_reference(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                               eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                               activation: str = "none") -> torch.Tensor:
    """``x [..., K]`` normalised over K (``norm_weight``, ``norm_bias`` ``[K]`` or None), then ``[F, K]`` GEMM with
    ``bias [F]`` and ``activation`` in ``ACTIVATIONS``: ``[..., F]``; a GELU gives NaN where its input is not finite
    (``gelu_reference``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    out = F.linear(F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps), weight, bias)
    if activation == "none":
        return out
    return gelu_reference(out, "tanh" if activation == "gelu_tanh" else "none")
