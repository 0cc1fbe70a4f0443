"""Small timm models and gate-logit fillers shared by the tests."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils._python_dispatch import TorchDispatchMode

import hiap


def tiny_vit(**overrides) -> VisionTransformer:
    """A 2-block ViT on 32 px images (3 heads of width 16): fast enough for every CPU test."""
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10, mlp_ratio=4.0)
    args.update(overrides)
    return VisionTransformer(**args).eval()


def randomize_logits(model: hiap.HiAPViT, generator: torch.Generator, scale: float = 2.0) -> None:
    """Fill every gate logit with N(0, scale^2): mixed signs, so some heads, dims, neurons and blocks close."""
    with torch.no_grad():
        for logit in model.gate_logits().values():
            logit.copy_(torch.randn(logit.shape, generator=generator) * scale)


def images(model, batch: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    vit = model.vit if isinstance(model, hiap.HiAPViT) else model
    height, width = vit.patch_embed.img_size
    return torch.randn(batch, vit.patch_embed.proj.in_channels, height, width, generator=generator)


class LaunchingOps(TorchDispatchMode):
    """Counts the dispatched ops that launch work (views excluded; a custom op counts once): what a launch-bound step
    or a batch-1 forward pays for."""

    VIEWS = {"view", "t", "detach", "transpose", "permute", "unsqueeze", "squeeze", "select", "slice", "expand",
             "_unsafe_view", "unbind", "as_strided", "alias", "split", "split_with_sizes", "reshape", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in self.VIEWS
        return func(*args, **(kwargs or {}))
