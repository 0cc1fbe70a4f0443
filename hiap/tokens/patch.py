"""Patch token reduction into a timm ViT, a gated HiAP model or an extracted pruned model, and take it out again.

``reduce_tokens(model, schedule)`` changes the forward of the blocks in place (the model object, its parameters and
its state_dict stay what they were; Liger-style instance patching) and ``restore_tokens(model)`` puts timm's forward
back. Blocks before the first one that removes tokens keep timm's forward untouched, so a schedule that removes
nothing leaves the model bit for bit what it was. From the first reducing block on, each block runs:

    x = x + ls1(attn(norm1(x), bias = log(size)))      proportional attention over merged tokens
    x = step(x)                                         prune / merge / ToMe of patch tokens, r fixed per block;
                                                        the prefix tokens stay in front, untouched
    x = x + ls2(mlp(norm2(x)))

The sizes travel in a small state object the blocks share; the first reducing block starts it afresh on every
forward, so nothing leaks from one batch to the next.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from hiap.backend import KernelBackendMixin, default_backend, resolve_kernels
from hiap.method.convert import inner_vit
from hiap.tokens.attention import attend, check_attention
from hiap.tokens.reduce import bipartite_soft_matching, importance_merge, redundancy_prune
from hiap.tokens.schedule import LayerStep, TokenSchedule, as_schedule
from hiap_kernels.token_merge.reference import merge_tokens_reference
from hiap_kernels.token_score.reference import token_redundancy_reference
from hiap_kernels.token_similarity.reference import nearest_tokens_reference

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


@dataclass
class _TokenState:
    """Sizes of the current tokens ``[B, N, 1]`` (float32, 1 for the prefix tokens) and the attention bias
    ``log(size)`` made from them once per change (``[B, 1, 1, N]``); both None while every token is one patch."""

    size: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def _check_model(vit: nn.Module, schedule: TokenSchedule) -> None:
    for index, block in enumerate(vit.blocks):
        missing = [part for part in _BLOCK_PARTS if not hasattr(block, part)]
        if missing:
            raise TypeError(f"token reduction: block {index} ({type(block).__name__}) is not a timm Block "
                            f"(no {', '.join(missing)})")
        check_attention(block.attn)
    if schedule.removes_nothing:
        return
    if getattr(vit, "global_pool", "token") != "token" or getattr(vit, "cls_token", None) is None:
        raise ValueError("token reduction needs a class-token model (global_pool='token'): an average over merged "
                         f"tokens would weigh them wrongly; this model pools by {getattr(vit, 'global_pool', None)!r}")


def _patches(vit: nn.Module) -> int:
    return vit.patch_embed.num_patches


def _proportional_bias(size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``log(size)`` per key (exactly 0 for the prefix tokens, whose size is 1): ``[B, 1, 1, N]`` (None while every
    size is 1)."""
    if size is None:
        return None
    return size.squeeze(-1).log()[:, None, None, :].to(dtype)


# The steps' ops: resolved with the block's attention (a HiAP module's table), or for a timm attention once per device
# from the backend in force when the block was patched.
TOKEN_OPS = {"token_redundancy": token_redundancy_reference, "merge_tokens": merge_tokens_reference,
             "nearest_tokens": nearest_tokens_reference}


@dataclass
class _BlockPlan:
    """What a patched block does; the state is shared by all blocks of a model (and stays shared in a deepcopy)."""

    step: LayerStep
    prefix: int
    first: bool
    schedule: TokenSchedule  # its importance weight and merge pool
    state: _TokenState
    backend: str = "reference"  # a timm attention's: the default when the block was patched
    kernels: dict = field(default_factory=dict)  # device -> {op name: op or None}, for a timm attention

    def kernels_on(self, device: torch.device) -> dict:
        if device not in self.kernels:
            self.kernels[device] = resolve_kernels(TOKEN_OPS, self.backend, device)
        return self.kernels[device]


def _step_ops(block: nn.Module, tokens: torch.Tensor, kind: str) -> dict:
    """The kernel arguments of a ``kind`` step (prune: ``score``; merge and ToMe: ``merge``, ``nearest``) for ``block``:
    each step's Triton op where the block's attention resolved it, else its PyTorch twin."""
    attn = block.attn
    if isinstance(attn, KernelBackendMixin):
        kernels = {name: attn.kernel(name) for name in TOKEN_OPS}
    else:
        kernels = block.hiap_token_plan.kernels_on(tokens.device)
    op = {name: kernels[name] or reference for name, reference in TOKEN_OPS.items()}
    if kind == "prune":
        return {"score": op["token_redundancy"]}
    return {"merge": op["merge_tokens"], "nearest": op["nearest_tokens"]}


def _reduced_block_forward(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                           is_causal: bool = False) -> torch.Tensor:
    """The forward of a patched block (bound to it as a method, so a deepcopy of the model stays self-contained)."""
    if attn_mask is not None or is_causal:
        raise NotImplementedError("a token-reduced block takes no attention mask")
    plan: _BlockPlan = block.hiap_token_plan
    step, prefix = plan.step, plan.prefix
    if plan.first:
        plan.state.size = plan.state.bias = None
    size = plan.state.size
    stats = attend(block.attn, block.norm1(x), plan.state.bias, keys=step.removes > 0,
                   cls=plan.schedule.reads_class_attention(step))
    x = x + block.drop_path1(block.ls1(stats.out))
    if step.removes:
        # The steps take the whole residual stream and keep the prefix tokens in front (hiap.tokens.reduce).
        if size is None and step.kind != "prune":
            size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
        if step.kind == "prune":
            # Pruning moves no mass: while no token was merged every size is 1 and attention needs no bias.
            ones = size is None
            x, size = redundancy_prune(x, x.new_ones(1, 1, 1) if ones else size, stats.keys, stats.cls, step.r,
                                       plan.schedule.importance_weight, prefix=prefix,
                                       **_step_ops(block, x, step.kind))
            size = None if ones else size
        elif step.kind == "merge":
            x, size = importance_merge(x, size, stats.keys, stats.cls, step.r, prefix=prefix,
                                       pool=plan.schedule.merge_pool,
                                       **_step_ops(block, x, step.kind))
        else:
            x, size = bipartite_soft_matching(x, size, stats.keys, step.r, prefix=prefix,
                                              **_step_ops(block, x, step.kind))
        plan.state.size = size
        plan.state.bias = _proportional_bias(size, x.dtype)  # the blocks after this one all read it
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def schedule_for(model: nn.Module, schedule: TokenSchedule | Sequence[LayerStep] | str) -> TokenSchedule:
    """``schedule`` as a ``TokenSchedule`` checked against ``model`` (blocks, tokens, class token), nothing patched.

    Raises ValueError or TypeError as ``reduce_tokens`` does."""
    vit = inner_vit(model, "token reduction")
    schedule = as_schedule(schedule, len(vit.blocks), _patches(vit), vit.num_prefix_tokens)
    _check_model(vit, schedule)
    return schedule


def reduce_tokens(model: nn.Module, schedule: TokenSchedule | Sequence[LayerStep] | str) -> nn.Module:
    """Patch ``model`` to remove tokens per ``schedule`` (a ``TokenSchedule``, its steps or its text form, see
    ``hiap.tokens.schedule``); returns the same model. Patching again replaces the previous schedule.

    Input images ``[B, C, H, W]`` at the model's own size; the logits are ``[B, classes]`` as before.

    Raises:
        ValueError: a schedule that removes more tokens than a block has, has the wrong length, or a model that
            pools by averaging (removing tokens needs a class token).
        TypeError: a model or attention module token reduction does not support.
    """
    vit = inner_vit(model, "token reduction")
    blocks = list(vit.blocks)
    prefix = vit.num_prefix_tokens
    schedule = schedule_for(model, schedule)
    restore_tokens(model)
    state = _TokenState()
    reduced_before = False
    for step, block in zip(schedule.steps, blocks):
        if reduced_before or step.removes:
            block.hiap_token_plan = _BlockPlan(step, prefix, not reduced_before, schedule, state, default_backend())
            if not isinstance(block.attn, KernelBackendMixin):
                block.hiap_token_plan.kernels_on(next(block.parameters()).device)  # decided here, not in a forward
            block.forward = types.MethodType(_reduced_block_forward, block)
        reduced_before = reduced_before or step.removes > 0
    vit.hiap_token_schedule = schedule
    return model


def restore_tokens(model: nn.Module) -> nn.Module:
    """Undo ``reduce_tokens``: every block runs timm's forward again. A model never patched is returned as it is."""
    vit = inner_vit(model, "token reduction")
    for block in vit.blocks:
        if "forward" in block.__dict__:
            del block.forward
        block.__dict__.pop("hiap_token_plan", None)
    vit.__dict__.pop("hiap_token_schedule", None)
    return model


def token_schedule(model: nn.Module) -> TokenSchedule | None:
    """The schedule a model is patched with, or None."""
    return getattr(inner_vit(model, "token reduction"), "hiap_token_schedule", None)


def token_counts(model: nn.Module, patches: int | None = None) -> list[tuple[int, int]]:
    """``(tokens in, tokens out)`` of every block (the same in and out without a schedule)."""
    vit = inner_vit(model, "token reduction")
    patches = _patches(vit) if patches is None else patches
    prefix = vit.num_prefix_tokens
    schedule = token_schedule(model)
    if schedule is None:
        return [(patches + prefix, patches + prefix)] * len(vit.blocks)
    return schedule.token_counts(patches, prefix)


__all__ = ["reduce_tokens", "restore_tokens", "schedule_for", "token_counts", "token_schedule"]
