"""Baselines at a given MAC budget, expressed as fixed gate logits on a gated copy of the dense model.

Both set every gate to a clearly open or clearly closed logit, so ``hiap.extract`` builds their pruned network with the
same code (and ``hiap.count_macs`` counts it the same way) as HiAP's; the pipeline then gives them the same KD
training budget HiAP had.

* ``uniform``: every layer keeps the same fraction of q/k dims and v dims in every head and the same fraction of FFN
  neurons (all heads and FFN blocks stay); inside a layer the units with the largest weight l1 norms are kept.
* ``l1``: l1-structured FFN pruning: neurons ranked across all layers by the l1 norm of their fc1 row; attention is
  left whole, the lowest-ranked neurons go until the budget is met.
"""

from __future__ import annotations

import torch

from hiap.app.runtime import InputError
from hiap.method.convert import HiAPViT
from hiap.method.cost import count_macs, dense_macs

BASELINES = ("uniform", "l1")


def _grouped(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Sum scores ``[..., n]`` over consecutive micro-gate groups -> ``[..., n // group]``."""
    return scores.reshape(*scores.shape[:-1], -1, group).sum(-1)


@torch.no_grad()
def unit_scores(gated: HiAPViT) -> list[dict[str, torch.Tensor]]:
    """Per layer, the l1 weight norm of every gated unit (summed over a micro-gate group).

    Returns one dict per layer: ``qk [H, G]`` (q row + k row of the qkv weight), ``v [H, G]`` (v row of qkv + proj
    column), ``neuron [F / group]`` (fc1 row).
    """
    layers = []
    for attn, mlp in zip(gated.attention_layers(), gated.ffn_layers()):
        heads, head_dim, width = attn.num_heads, attn.head_dim, attn.attn_dim
        rows = attn.qkv.weight.detach().abs().sum(dim=1)  # [3 * width]
        q, k, v = rows[:width], rows[width:2 * width], rows[2 * width:]
        proj_cols = attn.proj.weight.detach().abs().sum(dim=0)  # [width]
        qk = _grouped((q + k).view(heads, head_dim), attn.gates.group)
        v_score = _grouped((v + proj_cols).view(heads, head_dim), attn.gates.group)
        neuron = _grouped(mlp.fc1.weight.detach().abs().sum(dim=1), mlp.gates.group)
        layers.append({"qk": qk, "v": v_score, "neuron": neuron})
    return layers


def _top_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` highest scores along the last dim."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter(-1, order[..., :count], True)


@torch.no_grad()
def _set_uniform(gated: HiAPViT, scores: list[dict], dims_kept: int, neurons_kept: int) -> None:
    for attn, mlp, layer in zip(gated.attention_layers(), gated.ffn_layers(), scores):
        attn.gates.assign(head=True, qk=_top_mask(layer["qk"], dims_kept), v=_top_mask(layer["v"], dims_kept))
        mlp.gates.assign(block=True, neuron=_top_mask(layer["neuron"], neurons_kept))


def _closest_count(macs_at, low: int, high: int, target: float) -> int:
    """The count in [low, high] whose (non-decreasing) ``macs_at(count)`` lies closest to ``target``."""
    lo, hi = low, high
    while lo < hi:  # first count with macs >= target
        mid = (lo + hi) // 2
        if macs_at(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    candidates = {max(low, lo - 1), lo}
    return min(candidates, key=lambda c: (abs(macs_at(c) - target), c))


@torch.no_grad()
def apply_uniform(gated: HiAPViT, target: float) -> dict:
    """Set ``gated``'s logits to the uniform-ratio pruning closest to ``target`` x dense MACs.

    For each number of kept dims per head, the neuron count (the same in every layer) closest to the budget is found;
    of those pairs, the one whose dim and neuron fractions are most alike is kept, so the ratio is uniform across the
    kinds of unit as well as across layers. Returns ``{"dims_kept", "neurons_kept", "fraction"}``.
    """
    scores = unit_scores(gated)
    goal = target * dense_macs(gated)
    groups = scores[0]["qk"].shape[1]
    neuron_groups = scores[0]["neuron"].numel()
    best = None
    for dims_kept in range(1, groups + 1):
        def macs_at(neurons_kept: int, dims_kept=dims_kept) -> int:
            _set_uniform(gated, scores, dims_kept, neurons_kept)
            return count_macs(gated)

        neurons_kept = _closest_count(macs_at, 0, neuron_groups, goal)
        error = abs(macs_at(neurons_kept) - goal) / goal
        mismatch = abs(dims_kept / groups - neurons_kept / neuron_groups)
        key = (error > 0.005, mismatch, error)
        if best is None or key < best[0]:
            best = (key, dims_kept, neurons_kept)
    _, dims_kept, neurons_kept = best
    _set_uniform(gated, scores, dims_kept, neurons_kept)
    return {"dims_kept": dims_kept / groups, "neurons_kept": neurons_kept / neuron_groups,
            "fraction": count_macs(gated) / dense_macs(gated)}


@torch.no_grad()
def apply_l1_structured(gated: HiAPViT, target: float) -> dict:
    """Set ``gated``'s logits to l1-structured FFN pruning closest to ``target`` x dense MACs (attention kept whole).

    Raises InputError when removing every FFN neuron still leaves more than the budget.
    """
    scores = unit_scores(gated)
    goal = target * dense_macs(gated)
    flat = torch.cat([layer["neuron"] for layer in scores])
    order = torch.argsort(flat, descending=True, stable=True)
    sizes = [layer["neuron"].numel() for layer in scores]

    def macs_at(kept: int) -> int:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[order[:kept]] = True
        for attn, mlp, layer_mask in zip(gated.attention_layers(), gated.ffn_layers(), torch.split(mask, sizes)):
            attn.gates.assign(head=True, qk=True, v=True)
            # A layer left without neurons loses its whole block: the hard minimum would otherwise put some back.
            mlp.gates.assign(block=bool(layer_mask.any()), neuron=layer_mask)
        return count_macs(gated)

    floor = macs_at(0)
    if floor > goal * 1.02:
        raise InputError(f"l1-structured FFN pruning cannot reach a MAC budget of {target:.3f}: "
                         f"removing every FFN neuron leaves {floor / dense_macs(gated):.3f} of the dense MACs")
    kept = _closest_count(macs_at, 0, flat.numel(), goal)
    macs_at(kept)
    return {"neurons_kept": kept / flat.numel(), "fraction": count_macs(gated) / dense_macs(gated)}


def apply_baseline(method: str, gated: HiAPViT, target: float) -> dict:
    """Set ``gated``'s logits for baseline ``method`` (``uniform`` or ``l1``) at ``target``; returns its settings."""
    if method == "uniform":
        return apply_uniform(gated, target)
    if method == "l1":
        return apply_l1_structured(gated, target)
    raise InputError(f"unknown baseline {method!r}; choose from {BASELINES}")
