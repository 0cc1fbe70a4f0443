"""Physical pruned modules left by extraction: ragged per-head attention and a narrower FFN.

A ``PrunedAttention`` keeps ``Hk`` heads, head ``h`` with its own q/k width ``qk_w[h]`` (0 = uniform attention) and v
width ``v_w[h]`` (>= 1). Its single qkv Linear produces the packed columns ``[Q_0..Q_Hk | K_0..K_Hk | V_0..V_Hk]`` and
attention writes ``[B, N, sum(v_w)]`` packed for ``proj``. The softmax keeps the original scale ``1/sqrt(Dh)``.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hiap.backend import KernelBackendMixin
from hiap_kernels.ragged_attn.reference import build_head_table, padded_gather_indices, ragged_attention_padded


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """nn.Linear that may be zero-sized (a layer with nothing left) without torch's no-op init warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(in_features, out_features, bias=bias)


@torch.compiler.disable
def _run_eagerly(op, *args, **kwargs):
    # The launchers validate on the host (the head table once per table), which dynamo cannot trace; the reference
    # path is the one that compiles into a single graph.
    return op(*args, **kwargs)


class PrunedAttention(KernelBackendMixin, nn.Module):
    """Attention over ragged per-head widths. Input ``[B, N, D]``, output ``[B, N, D_out]``.

    With no head left the layer reduces to ``proj``'s bias (zeros without one). An inference module: no attention
    dropout.
    """

    triton_op = "ragged_attention"

    def __init__(self, embed_dim: int, out_dim: int, qk_widths: Sequence[int], v_widths: Sequence[int], scale: float,
                 *, qkv_bias: bool, proj_bias: bool):
        super().__init__()
        qk_widths = [int(w) for w in qk_widths]
        v_widths = [int(w) for w in v_widths]
        if len(qk_widths) != len(v_widths):
            raise ValueError(f"{len(qk_widths)} q/k widths but {len(v_widths)} v widths")
        if any(w < 0 for w in qk_widths) or any(w < 1 for w in v_widths):
            raise ValueError(f"widths must be q/k >= 0 and v >= 1, got qk={qk_widths}, v={v_widths}")
        self.qk_widths = qk_widths
        self.v_widths = v_widths
        self.scale = float(scale)
        self.num_heads = len(v_widths)
        self.out_dim = out_dim
        packed = 2 * sum(qk_widths) + sum(v_widths)
        self.qkv = _linear(embed_dim, packed, qkv_bias)
        self.proj = _linear(sum(v_widths), out_dim, proj_bias)
        q_index, k_index, v_index, out_index = padded_gather_indices(qk_widths, v_widths)
        # Derived from the widths: rebuilt on load, so kept out of the state_dict.
        self.register_buffer("q_index", q_index, persistent=False)
        self.register_buffer("k_index", k_index, persistent=False)
        self.register_buffer("v_index", v_index, persistent=False)
        self.register_buffer("out_index", out_index, persistent=False)
        self.register_buffer("head_table", build_head_table(qk_widths, v_widths), persistent=False)
        # Every head as wide as the others (a layer left whole, or pruned evenly) needs no padding: q, k and v are
        # plain views of the packed qkv, and the gathers of the padded path would be pure overhead.
        self.equal_widths = len(set(qk_widths)) == 1 and len(set(v_widths)) == 1 and qk_widths[0] > 0

    @property
    def max_qk_width(self) -> int:
        return max(self.qk_widths, default=0)

    @property
    def max_v_width(self) -> int:
        return max(self.v_widths, default=0)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("PrunedAttention does not take attention masks")
        batch, tokens, _ = x.shape
        if self.num_heads == 0:
            bias = self.proj.bias
            if bias is None:
                return x.new_zeros(batch, tokens, self.out_dim)
            return bias.to(x.dtype).expand(batch, tokens, self.out_dim)
        qkv = self.qkv(x)
        ragged_attention = self.triton_kernel(qkv)
        if ragged_attention is not None:
            out = _run_eagerly(ragged_attention, qkv, self.head_table, self.scale, self.max_qk_width, self.max_v_width)
        elif self.equal_widths:
            out = self._equal_width_attention(qkv)
        else:
            out = ragged_attention_padded(qkv, self.q_index, self.k_index, self.v_index, self.out_index, self.scale)
        return self.proj(out)

    def _equal_width_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """``[B, N, T] -> [B, N, H * v_w]`` when all heads share one q/k width and one v width."""
        batch, tokens, _ = qkv.shape
        heads, qk_width, v_width = self.num_heads, self.qk_widths[0], self.v_widths[0]
        q, k, v = torch.split(qkv, [heads * qk_width, heads * qk_width, heads * v_width], dim=-1)
        q = q.view(batch, tokens, heads, qk_width).transpose(1, 2)
        k = k.view(batch, tokens, heads, qk_width).transpose(1, 2)
        v = v.view(batch, tokens, heads, v_width).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.transpose(1, 2).reshape(batch, tokens, heads * v_width)

    def extra_repr(self) -> str:
        return f"qk_widths={self.qk_widths}, v_widths={self.v_widths}, scale={self.scale:.6g}"


class PrunedMlp(KernelBackendMixin, nn.Module):
    """FFN at the kept width ``F'``: ``fc2(act(fc1(x)))``; with ``F' = 0`` only ``fc2``'s bias remains.

    Input ``[..., D]``, output ``[..., D_out]``.
    """

    triton_op = "fused_linear_gelu"

    def __init__(self, in_features: int, hidden_features: int, out_features: int, act: nn.Module,
                 *, fc1_bias: bool, fc2_bias: bool):
        super().__init__()
        self.hidden_features = int(hidden_features)
        self.out_features = out_features
        self.fc1 = _linear(in_features, self.hidden_features, fc1_bias)
        self.act = act
        self.fc2 = _linear(self.hidden_features, out_features, fc2_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden_features == 0:
            shape = (*x.shape[:-1], self.out_features)
            if self.fc2.bias is None:
                return x.new_zeros(shape)
            return self.fc2.bias.to(x.dtype).expand(shape)
        approximate = self.act.approximate if type(self.act) is nn.GELU else None
        fused_linear_gelu = self.triton_kernel(x, self.fc1.weight) if approximate is not None else None
        if fused_linear_gelu is not None:
            weight, bias = self.fc1.weight, self.fc1.bias
            if torch.is_autocast_enabled(x.device.type):
                # The kernel takes one dtype, as F.linear does once autocast has cast its operands.
                dtype = torch.get_autocast_dtype(x.device.type)
                x, weight = x.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            elif weight.dtype != x.dtype:
                x = x.to(weight.dtype)
            hidden = _run_eagerly(fused_linear_gelu, x, weight, bias, approximate=approximate)
        else:
            hidden = self.act(self.fc1(x))
        return self.fc2(hidden)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_features}"
