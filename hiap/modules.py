"""Gated attention and FFN modules (reference forward + Triton forward) that wrap timm's Attention and Mlp.

Each gated module keeps the timm sub-modules it wraps (``qkv``, ``proj``, ``fc1``, ``fc2``...) under the same names,
adds its gate logits as parameters (``gate_*``), and reads the temperature and the step seed from a ``GateState``
shared by the whole model. Training mode samples gates; eval mode applies the deterministic decision of
``hiap.gates`` so the eval-mode model, its MAC count and the extracted model agree.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from hiap import config as _config
from hiap.gates import GateState, attention_decisions, ffn_decisions, gate_offset
from hiap_kernels._runtime import can_run_triton
from hiap_kernels.gated_linear_reference import (
    ffn_gate_values,
    ffn_neuron_mask,
    gated_qkv_reference,
)

_warned_fallback = False


class KernelBackendMixin:
    """Per-instance backend choice: ``kernel_backend`` None follows the global switch of ``hiap.config``."""

    kernel_backend: str | None = None

    def _triton_enabled(self, *tensors: torch.Tensor) -> bool:
        global _warned_fallback
        backend = self.kernel_backend or _config.kernels_in_use()
        if backend != "triton":
            return False
        if can_run_triton(*tensors):
            return True
        if not _warned_fallback:
            warnings.warn(
                "hiap: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU); "
                "running the PyTorch reference path instead",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned_fallback = True
        return False


def _decision_logits(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Eval-mode decisions as logits of +-1: with ``sample=False`` the kernels and the reference open gates with a > 0."""
    return keep.to(like.dtype) * 2 - 1


class GatedAttention(KernelBackendMixin, nn.Module):
    """timm ``Attention`` with head gates ``g [H]``, q/k-dim gates ``dqk [H, Dh/G]`` and v-dim gates ``dv [H, Dh/G]``.

    Masks: q columns times ``dqk``, v columns times ``g * dv`` (k unmasked). Input and output ``[B, N, D]``.
    """

    def __init__(self, attn: nn.Module, layer_index: int, state: GateState, *, init_logit: float, dim_group: int,
                 min_heads: int, min_dim_fraction: float):
        super().__init__()
        if attn.head_dim % dim_group:
            raise ValueError(f"dim_group={dim_group} does not divide the head dim {attn.head_dim}")
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = attn.num_heads * attn.head_dim
        self.scale = attn.scale
        self.dim_group = dim_group
        self.layer_index = layer_index
        self.min_heads = min_heads
        self.min_dim_fraction = min_dim_fraction
        self.gate_state = state
        self.qkv = attn.qkv
        self.attn_drop = attn.attn_drop
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        groups = attn.head_dim // dim_group
        device = attn.qkv.weight.device
        self.gate_head = nn.Parameter(torch.full((self.num_heads,), float(init_logit), device=device))
        self.gate_qk = nn.Parameter(torch.full((self.num_heads, groups), float(init_logit), device=device))
        self.gate_v = nn.Parameter(torch.full((self.num_heads, groups), float(init_logit), device=device))

    @property
    def gate_offset(self) -> int:
        return gate_offset(self.layer_index, "attention")

    def decisions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deterministic keep masks: head ``[H]``, q/k groups ``[H, G]``, v groups ``[H, G]`` (bool)."""
        return attention_decisions(
            self.gate_head.detach(), self.gate_qk.detach(), self.gate_v.detach(),
            min_heads=self.min_heads, min_dim_fraction=self.min_dim_fraction,
        )

    def keep_probabilities(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P(open) = sigmoid(a) of the head, q/k and v gates (differentiable)."""
        return torch.sigmoid(self.gate_head), torch.sigmoid(self.gate_qk), torch.sigmoid(self.gate_v)

    def _gate_arguments(self) -> dict:
        state = self.gate_state
        if self.training:
            logits = (self.gate_head, self.gate_qk, self.gate_v)
            sample = True
        else:
            keep_head, keep_qk, keep_v = self.decisions()
            logits = tuple(_decision_logits(k, self.gate_head) for k in (keep_head, keep_qk, keep_v))
            sample = False
        return dict(head_logits=logits[0], qk_logits=logits[1], v_logits=logits[2], tau=state.tau,
                    seed=state.seed, offset=self.gate_offset, hard=state.hard, sample=sample)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        gates = self._gate_arguments()
        if self._triton_enabled(x, self.qkv.weight):
            from hiap_kernels.gated_linear import gated_qkv

            q, k, v = gated_qkv(x, self.qkv.weight, self.qkv.bias, **gates)
        else:
            q, k, v = gated_qkv_reference(x, self.qkv.weight, self.qkv.bias, **gates)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, dim_group={self.dim_group}, layer={self.layer_index}"


class GatedMlp(KernelBackendMixin, nn.Module):
    """timm ``Mlp`` with an FFN block gate ``b [1]`` and neuron gates ``c [F/G]``; mask ``b * c`` after the activation.

    Input and output ``[..., D]``.
    """

    def __init__(self, mlp: nn.Module, layer_index: int, state: GateState, *, init_logit: float, dim_group: int,
                 min_neuron_fraction: float):
        super().__init__()
        hidden = mlp.fc1.out_features
        if hidden % dim_group:
            raise ValueError(f"dim_group={dim_group} does not divide the FFN width {hidden}")
        self.hidden_features = hidden
        self.dim_group = dim_group
        self.layer_index = layer_index
        self.min_neuron_fraction = min_neuron_fraction
        self.gate_state = state
        self.fc1 = mlp.fc1
        self.act = mlp.act
        self.drop1 = mlp.drop1
        self.fc2 = mlp.fc2
        self.drop2 = mlp.drop2
        device = mlp.fc1.weight.device
        self.gate_block = nn.Parameter(torch.full((1,), float(init_logit), device=device))
        self.gate_neuron = nn.Parameter(torch.full((hidden // dim_group,), float(init_logit), device=device))

    @property
    def gate_offset(self) -> int:
        return gate_offset(self.layer_index, "ffn")

    def decisions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic keep masks: block ``[1]`` and neuron groups ``[F / G]`` (bool)."""
        return ffn_decisions(self.gate_block.detach(), self.gate_neuron.detach(),
                             min_neuron_fraction=self.min_neuron_fraction)

    def keep_probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P(open) of the block gate and the neuron gates (differentiable)."""
        return torch.sigmoid(self.gate_block), torch.sigmoid(self.gate_neuron)

    def _gate_arguments(self) -> dict:
        state = self.gate_state
        if self.training:
            block, neuron, sample = self.gate_block, self.gate_neuron, True
        else:
            keep_block, keep_neuron = self.decisions()
            block = _decision_logits(keep_block, self.gate_block)
            neuron = _decision_logits(keep_neuron, self.gate_neuron)
            sample = False
        return dict(block_logit=block, neuron_logits=neuron, tau=state.tau, seed=state.seed,
                    offset=self.gate_offset, hard=state.hard, sample=sample)

    def _gelu_flavour(self) -> str | None:
        return self.act.approximate if type(self.act) is nn.GELU else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self._gate_arguments()
        approximate = self._gelu_flavour()
        if approximate is not None and self._triton_enabled(x, self.fc1.weight):
            from hiap_kernels.gated_linear import gated_fc1

            hidden = gated_fc1(x, self.fc1.weight, self.fc1.bias, approximate=approximate, **gates)
        else:
            z_block, z_neuron = ffn_gate_values(
                gates["block_logit"], gates["neuron_logits"], tau=gates["tau"], seed=gates["seed"],
                offset=gates["offset"], hard=gates["hard"], sample=gates["sample"],
            )
            hidden = self.act(self.fc1(x))
            hidden = hidden * ffn_neuron_mask(z_block, z_neuron, self.hidden_features).to(hidden.dtype)
        hidden = self.drop1(hidden)
        return self.drop2(self.fc2(hidden))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_features}, dim_group={self.dim_group}, layer={self.layer_index}"


def _import_ok(module_name: str) -> bool:
    try:
        __import__(module_name)
    except Exception:
        return False
    return True


def triton_support(modules: list[nn.Module] | None = None) -> list[str]:
    """Names of the module kinds among ``modules`` (all kinds when None) whose Triton kernels cannot be imported."""
    from hiap.pruned import PrunedAttention, PrunedMlp

    needs = {
        GatedAttention: "hiap_kernels.gated_linear",
        GatedMlp: "hiap_kernels.gated_linear",
        PrunedAttention: "hiap_kernels.ragged_attention",
        PrunedMlp: "hiap_kernels.inference_ffn",
    }
    kinds = set(needs) if modules is None else {type(m) for m in modules}
    return sorted(kind.__name__ for kind in kinds if kind in needs and not _import_ok(needs[kind]))
