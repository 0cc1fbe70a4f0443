"""Baselines from other libraries at the same MAC budget: Torch-Pruning (``pip install 'hiap-kernels[peers]'``).

Torch-Pruning's documented timm ViT recipe (``examples/transformers/prune_timm_vit.py``): ``MetaPruner`` with group
l1 magnitude importance, one pruning ratio for every layer, head dims pruned inside each head (``num_heads`` given,
heads kept), and, as in its ``--bottleneck`` variant, only the inner widths (q/k/v head dims and FFN neurons; the
embedding width stays, as it does for every method compared here). The ratio is searched so that ``count_macs`` of the
result lies closest to the budget.

Torch-Pruning picks the units; the network is then built by ``hiap.extract`` from those choices written as gates on a
per-dim gated copy (every dim its own gate), so it keeps the dense softmax scale ``1/sqrt(Dh)`` (the recipe's
replacement attention forward calls SDPA with the scale of the pruned head dim) and gets the same KD budget, MAC count
and file format as the other methods.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from hiap.app.runtime import InputError
from hiap.method.convert import HiAPViT
from hiap.method.cost import count_macs, dense_macs

PEERS = ("torch-pruning",)


def require_torch_pruning():
    """The ``torch_pruning`` module, or an InputError saying how to install it."""
    try:
        import torch_pruning
    except ImportError:
        raise InputError("the torch-pruning baseline needs Torch-Pruning: pip install 'hiap-kernels[peers]'") from None
    return torch_pruning


def _kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Index in ``original [R, K]`` of each row of ``pruned [R', K]`` (Torch-Pruning slices rows, so rows match)."""
    matches = (pruned[:, None, :] == original[None, :, :]).all(dim=-1)
    if not bool((matches.sum(dim=1) >= 1).all()):
        raise RuntimeError("Torch-Pruning changed weights it should only have sliced")
    return matches.float().argmax(dim=1)


def torch_pruning_choice(dense: nn.Module, ratio: float, round_to: int) -> list[dict[str, torch.Tensor]]:
    """Per block, the q/k, v head dims (bool ``[H, Dh]``) and FFN neurons (bool ``[F]``) Torch-Pruning keeps at
    ``ratio``, with widths rounded to ``round_to``."""
    tp = require_torch_pruning()
    model = copy.deepcopy(dense).cpu().float().eval().requires_grad_(True)
    num_heads = {block.attn.qkv: block.attn.num_heads for block in model.blocks}
    ignored = [model.head] + [block.mlp.fc2 for block in model.blocks]
    channels, (height, width) = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    # Torch-Pruning traces the model with autograd, so gradients stay on here whatever the caller set.
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")  # its notice about cls_token / pos_embed, which the ignored fc2 keeps whole
        pruner = tp.pruner.MetaPruner(
            model, torch.zeros(1, channels, height, width), importance=tp.importance.GroupMagnitudeImportance(p=1),
            global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
            prune_num_heads=False, prune_head_dims=True, round_to=round_to)
        pruner.step()
    if model.embed_dim != dense.embed_dim or model.blocks[0].norm1.weight.numel() != dense.embed_dim:
        raise RuntimeError("Torch-Pruning pruned the embedding width; the comparison keeps it")
    layers = []
    model.requires_grad_(False)
    for before, after in zip(dense.blocks, model.blocks):
        heads, head_dim = before.attn.num_heads, before.attn.head_dim
        width = heads * head_dim
        rows = _kept_rows(before.attn.qkv.weight.float().cpu(), after.attn.qkv.weight)
        kept = torch.zeros(3 * width, dtype=torch.bool)
        kept[rows] = True
        q, k, v = kept[:width].view(heads, head_dim), kept[width:2 * width].view(heads, head_dim), \
            kept[2 * width:].view(heads, head_dim)
        neurons = torch.zeros(before.mlp.fc1.out_features, dtype=torch.bool)
        neurons[_kept_rows(before.mlp.fc1.weight.float().cpu(), after.mlp.fc1.weight)] = True
        layers.append({"qk": q & k, "v": v, "neuron": neurons})
    return layers


@torch.no_grad()
def apply_torch_pruning(gated: HiAPViT, dense: nn.Module, target: float, round_to: int) -> dict:
    """Write Torch-Pruning's choice at the ratio closest to ``target`` x dense MACs into ``gated``'s per-dim gates.

    ``gated`` must have one gate per dim and per neuron (``dim_group=1``, ``neuron_group=1``) and no hard minimums.
    Returns ``{"pruning_ratio", "fraction"}``.
    """
    layers_gates = list(zip(gated.attention_layers(), gated.ffn_layers()))
    if layers_gates[0][0].gates.group != 1 or layers_gates[0][1].gates.group != 1:
        raise ValueError("apply_torch_pruning needs a gated copy with one gate per dim and per neuron")
    goal = target * dense_macs(gated)

    def macs_at(ratio: float) -> int:
        for (attn, mlp), layer in zip(layers_gates, torch_pruning_choice(dense, ratio, round_to)):
            attn.gates.assign(head=True, qk=layer["qk"], v=layer["v"])
            mlp.gates.assign(block=True, neuron=layer["neuron"])
        return count_macs(gated)

    # MACs fall as the ratio grows (in steps, from the rounding): bisect for the ratio closest to the goal.
    low, high = 0.0, 0.95
    best = min(((abs(macs_at(r) - goal), r) for r in (low, high)))
    for _ in range(14):
        middle = (low + high) / 2
        macs = macs_at(middle)
        best = min(best, (abs(macs - goal), middle))
        low, high = (middle, high) if macs > goal else (low, middle)
    macs_at(best[1])
    return {"pruning_ratio": best[1], "fraction": count_macs(gated) / dense_macs(gated)}
