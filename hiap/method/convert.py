"""``gate_vit``: a gated copy of a timm VisionTransformer, wrapped so it carries its config and gate schedule."""

from __future__ import annotations

import copy
import weakref
from typing import Iterator

import torch
import torch.nn as nn

from hiap.config import HiAPConfig
from hiap.method.architecture import describe_vit
from hiap.method.gated import GatedAttention, GatedMlp
from hiap.method.gates import GateSchedule, LayerGates, resolve_groups, step_seed


class HiAPViT(nn.Module):
    """A timm ``VisionTransformer`` (``.vit``) whose blocks use ``GatedAttention`` / ``GatedMlp``.

    ``forward(images [B, C, H, W]) -> logits [B, num_classes]``. Each training-mode forward draws the gates with the
    seed of the current step (``step_seed(cfg.seed, gate_step)``) and advances ``gate_step``, a buffer saved in the
    state_dict, so a resumed run (and every DDP rank) samples the same gates for the same step.
    """

    def __init__(self, vit: nn.Module, cfg: HiAPConfig, architecture: dict, schedule: GateSchedule):
        super().__init__()
        self.vit = vit
        self.cfg = cfg
        self.architecture = architecture
        # The one GateSchedule every gate of this model reads (set_temperature and forward write it); a submodule, so
        # its tau and seed buffers move with the model.
        self.schedule = schedule
        self.register_buffer("gate_step", torch.zeros((), dtype=torch.int64))

    def named_gated_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """The gated attention and FFN modules by name (``blocks.3.attn``, ``blocks.3.mlp`` ...)."""
        for name, module in self.vit.named_modules():
            if isinstance(module, (GatedAttention, GatedMlp)):
                yield name, module

    def gated_modules(self) -> Iterator[nn.Module]:
        for _, module in self.named_gated_modules():
            yield module

    def attention_layers(self) -> list[GatedAttention]:
        return [block.attn for block in self.vit.blocks]

    def ffn_layers(self) -> list[GatedMlp]:
        return [block.mlp for block in self.vit.blocks]

    def gate_layers(self) -> list[LayerGates]:
        """Every layer's gates, block by block (attention, then FFN)."""
        return [module.gates for module in self.gated_modules()]

    @property
    def temperature(self) -> float:
        return self.schedule.temperature

    def set_temperature(self, tau: float) -> None:
        """Set the Gumbel-Sigmoid temperature used by every gate from the next forward on."""
        self.schedule.set_temperature(tau)

    @property
    def structure_fixed(self) -> bool:
        """True when training-mode forwards apply the decision instead of sampling (``fix_structure``)."""
        return self.schedule.decided

    def fix_structure(self, fixed: bool = True) -> None:
        """From the next forward on, train the decided network (``fixed``) or sample the gates again.

        Fixing reads the decision once (one device read): removed heads, FFN blocks and neurons are then skipped,
        forward and backward. Change no logit while fixed; fix again after loading other logits. A no-op when nothing
        changes, so a training loop may call it every step.
        """
        fixed = bool(fixed)
        if fixed == self.schedule.decided:
            return
        self.schedule.decided = fixed
        for module in self.gated_modules():
            module.use_decision(fixed)

    @torch.no_grad()
    def retire_closed(self, below: float) -> dict[str, int]:
        """Retire the heads and neuron groups closed for good: those whose gate (a head's, or all of its v groups';
        a neuron group's, or its FFN block's) opens with probability ``sigmoid(a)`` under ``below`` and that the
        decision removes. Until the next call, training-mode forwards hold them closed and skip their rows and columns
        forward and backward, so a step gets cheaper as the run prunes; the draw of every other gate is unchanged.

        The straight-through gradient such a gate loses is the one of a sample that is closed with probability over
        ``1 - below``; the budget terms still see its logit, which may climb back over the limit and be brought back
        by a later call. One device read per layer: call it on logging steps, not on every step. Returns the counts
        ``{"heads", "heads_total", "neuron_groups", "neuron_groups_total"}``.
        """
        masks = {name: module.gates.retirable(below) for name, module in self.named_gated_modules()}
        # One device read for the whole model: the masks travel to the host together.
        host = torch.cat([mask.reshape(-1) for mask in masks.values()]).cpu().split([m.numel() for m in masks.values()])
        self.set_retired(dict(zip(masks, host)))
        return self.retired_counts()

    def retired(self) -> dict[str, torch.Tensor]:
        """What ``retire_closed`` left out, by module name: bool ``[H]`` heads / ``[F / G]`` neuron groups (host)."""
        out = {}
        for name, module in self.named_gated_modules():
            units = module.gates.head if isinstance(module, GatedAttention) else module.gates.neuron
            mask = module.retired_mask
            out[name] = torch.zeros(len(units), dtype=torch.bool) if mask is None else mask.clone()
        return out

    def set_retired(self, masks: dict[str, torch.Tensor]) -> None:
        """Apply ``retired()``'s masks (a checkpoint's, or ``retire_closed``'s); modules not named keep all units."""
        unknown = sorted(set(masks) - {name for name, _ in self.named_gated_modules()})
        if unknown:
            raise ValueError(f"no gated modules named {unknown}")
        for name, module in self.named_gated_modules():
            module.retire(masks.get(name))

    def retired_counts(self) -> dict[str, int]:
        """How many heads and neuron groups are retired, and of how many (no device read)."""
        counts = dict.fromkeys(("heads", "heads_total", "neuron_groups", "neuron_groups_total"), 0)
        masks = self.retired()
        for name, module in self.named_gated_modules():
            kind = "heads" if isinstance(module, GatedAttention) else "neuron_groups"
            counts[kind] += int(masks[name].sum())
            counts[f"{kind}_total"] += masks[name].numel()
        return counts

    def choose_training_paths(self, images: torch.Tensor, timer=None) -> dict[str, str]:
        """Time, for every gated layer, its two training paths (the masks on the weights, the fused gated GEMM) on
        the input it gets from ``images [B, C, H, W]`` and keep the faster (``training_path``); returns the choice by
        layer name. A layer whose fused op cannot run here (the PyTorch backend, a CPU) keeps the weights untimed.
        ``timer(run) -> ms`` replaces the synchronised median of a few calls (tests inject timings). Eager only: call
        it before compiling the model. The gate-step counter does not move."""
        captured: dict[str, torch.Tensor] = {}
        hooks = [module.register_forward_pre_hook(
                     lambda module, args, name=name: captured.setdefault(name, args[0].detach())
                 ) for name, module in self.named_gated_modules()]
        try:
            with torch.no_grad():
                self.vit(images)  # the layers' inputs (the model's own forward would advance the gate step)
        finally:
            for hook in hooks:
                hook.remove()
        return {name: module.choose_training_path(captured[name], timer)
                for name, module in self.named_gated_modules() if name in captured}

    def gate_logits(self) -> dict[str, nn.Parameter]:
        """The gate logits by name (``blocks.3.attn.gates.head`` ...), for an optimizer group of their own."""
        return {
            f"{name[len('vit.'):]}.{kind}": logit
            for name, gates in self.named_modules() if isinstance(gates, LayerGates)
            for kind, logit in gates.logits().items()
        }

    def macro_gate_logits(self) -> list[nn.Parameter]:
        """The macro-gate logits of every layer (heads, FFN blocks)."""
        micro = {id(logit) for logit in self.micro_gate_logits()}
        return [logit for logit in self.gate_logits().values() if id(logit) not in micro]

    def micro_gate_logits(self) -> list[nn.Parameter]:
        """The micro-gate logits of every layer (head dims, neurons)."""
        return [logit for gates in self.gate_layers() for logit in gates.micro_logits()]

    def weight_parameters(self) -> dict[str, nn.Parameter]:
        """Every trainable parameter that is not a gate logit."""
        gates = {id(p) for p in self.gate_logits().values()}
        return {name: p for name, p in self.named_parameters() if id(p) not in gates}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            step = self._host_step()
            self.schedule.set_seed(step_seed(self.cfg.seed, step))
            self.gate_step.fill_(step + 1)
            self._step_seen = (weakref.ref(self.gate_step), self.gate_step._version, step + 1)
        return self.vit(images)

    def _host_step(self) -> int:
        """``gate_step`` as a Python int without waiting for the device: a host copy of the value is kept and the
        buffer is read back only when something else changed it (load_state_dict, ``.to()``, an in-place edit)."""
        seen = getattr(self, "_step_seen", None)
        if seen is not None and seen[0]() is self.gate_step and seen[1] == self.gate_step._version:
            return seen[2]
        return int(self.gate_step)

    def extra_repr(self) -> str:
        return f"budget={self.cfg.budget}, target={self.cfg.target:.4g}"


def inner_vit(model: nn.Module, caller: str) -> nn.Module:
    """The timm ``VisionTransformer`` a dense, gated (its ``.vit``) or pruned model runs; a TypeError naming ``caller``
    for any other module (one without ``blocks`` and ``patch_embed``)."""
    vit = model.vit if isinstance(model, HiAPViT) else model
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
        raise TypeError(f"{caller} needs a timm VisionTransformer, a gated or a pruned model, got "
                        f"{type(model).__name__}")
    return vit


def gate_vit(model: nn.Module, cfg: HiAPConfig | None = None) -> HiAPViT:
    """A gated copy of a timm ``VisionTransformer``; the input model is left untouched.

    Every attention layer gets head gates ``[H]`` and q/k- and v-dim gates ``[H, Dh / G]``; every FFN a block gate
    ``[1]`` and neuron gates ``[F / G']``, all starting at ``cfg.init_logit``; the group sizes ``G, G'`` come from
    ``cfg.dim_group`` / ``cfg.neuron_group`` (0: aligned to the hardware, see ``resolve_groups``). In eval mode with every gate
    open the gated model computes exactly what the timm model does.

    Raises:
        UnsupportedModelError: the model is not a timm VisionTransformer made of standard Attention / Mlp layers.
        ValueError: a group size does not divide the head dim or the FFN width, or ``cfg.min_heads`` is more than
            the heads of a layer.
        TypeError: ``model`` is not an ``nn.Module`` or ``cfg`` not a ``HiAPConfig``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gate_vit: model must be a timm VisionTransformer (an nn.Module), got {type(model).__name__}")
    if cfg is not None and not isinstance(cfg, HiAPConfig):
        raise TypeError(f"gate_vit: cfg must be a hiap.HiAPConfig or None, got {type(cfg).__name__}")
    cfg = HiAPConfig() if cfg is None else cfg.validate()
    if isinstance(model, HiAPViT):
        raise ValueError("the model is gated already")
    architecture = describe_vit(model)
    if cfg.min_heads > architecture["num_heads"]:
        raise ValueError(f"min_heads={cfg.min_heads} is more than the {architecture['num_heads']} heads of each "
                         "attention layer of the model")
    vit = copy.deepcopy(model)
    schedule = GateSchedule(tau=cfg.tau0, seed=step_seed(cfg.seed, 0), hard=cfg.hard)
    for index, block in enumerate(vit.blocks):
        head_group, neuron_group = resolve_groups(
            cfg.dim_group, cfg.neuron_group, block.attn.head_dim, block.mlp.fc1.out_features
        )
        block.attn = GatedAttention(
            block.attn, index, schedule, init_logit=cfg.init_logit, dim_group=head_group,
            min_heads=cfg.min_heads, min_dim_fraction=cfg.min_dim_fraction,
        )
        block.mlp = GatedMlp(
            block.mlp, index, schedule, init_logit=cfg.init_logit, dim_group=neuron_group,
            min_neuron_fraction=cfg.min_neuron_fraction,
        )
    gated = HiAPViT(vit, cfg, architecture, schedule)
    gated.train(model.training)
    return gated


@torch.no_grad()
def order_units_by_magnitude(model: HiAPViT) -> HiAPViT:
    """Reorder, in place, each head's q/k dims and v dims and each FFN's neurons by the l1 norm of their weights,
    largest first, so that every micro gate's group holds units of like magnitude; returns ``model``.

    The function is unchanged up to float rounding: a head's q and k dims move together (their dot product is a sum
    over dims), its v dims move with the matching input columns of ``proj``, and a neuron's fc1 row and bias move with
    its fc2 column. A q/k dim scores ``|q row| + |k row|``, a v dim ``|v row| + |proj column|``, a neuron ``|fc1 row| +
    |fc2 column|``. With groups of contiguous units, a gate that would otherwise tie a strong dim to weak neighbours
    now covers the weak ones together, as a magnitude pruner would pick them one by one. Call it before training: the
    gate logits and any state that refers to unit positions are not permuted.
    """
    if not isinstance(model, HiAPViT):
        raise TypeError(f"order_units_by_magnitude needs a gated model from hiap.gate_vit, got {type(model).__name__}")
    for attn, mlp in zip(model.attention_layers(), model.ffn_layers()):
        heads, head_dim, width = attn.num_heads, attn.head_dim, attn.attn_dim
        weight = attn.qkv.weight
        q, k, v = weight[:width], weight[width:2 * width], weight[2 * width:]
        qk_score = (q.abs().sum(dim=1) + k.abs().sum(dim=1)).view(heads, head_dim)
        v_score = (v.abs().sum(dim=1) + attn.proj.weight.abs().sum(dim=0)).view(heads, head_dim)
        first = (torch.arange(heads, device=weight.device) * head_dim)[:, None]
        qk_order = (first + torch.argsort(qk_score, dim=1, descending=True, stable=True)).reshape(-1)
        v_order = (first + torch.argsort(v_score, dim=1, descending=True, stable=True)).reshape(-1)
        rows = torch.cat([qk_order, qk_order + width, v_order + 2 * width])
        attn.qkv.weight.copy_(weight[rows])
        if attn.qkv.bias is not None:
            attn.qkv.bias.copy_(attn.qkv.bias[rows])
        attn.proj.weight.copy_(attn.proj.weight[:, v_order])
        score = mlp.fc1.weight.abs().sum(dim=1) + mlp.fc2.weight.abs().sum(dim=0)
        order = torch.argsort(score, descending=True, stable=True)
        mlp.fc1.weight.copy_(mlp.fc1.weight[order])
        if mlp.fc1.bias is not None:
            mlp.fc1.bias.copy_(mlp.fc1.bias[order])
        mlp.fc2.weight.copy_(mlp.fc2.weight[:, order])
    return model
