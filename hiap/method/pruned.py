"""Physical pruned modules left by extraction: ragged per-head attention and a narrower FFN.

A ``PrunedAttention`` keeps ``Hk`` heads, head ``h`` with its own q/k width ``qk_w[h]`` (0 = uniform attention) and v
width ``v_w[h]`` (>= 1). Its single qkv Linear produces the packed columns ``[Q_0..Q_Hk | K_0..K_Hk | V_0..V_Hk]`` and
attention writes ``[B, N, sum(v_w)]`` packed for ``proj``. The softmax keeps the original scale ``1/sqrt(Dh)``.

Every per-layer decision is taken when a module is built, never per call: the runs of equal-width heads that SDPA
takes one call each, the validated table of the Triton kernel, and which of the two a layer uses. The forward has
no host synchronisation and no data-dependent control flow, so a pruned model compiles into one graph
(``torch.compile(fullgraph=True)``) and replays from a CUDA graph. ``torch.jit.script`` takes a pruned model as it
takes a timm ViT; a scripted model runs the PyTorch paths (TorchScript cannot launch Triton kernels).
"""

# No ``from __future__ import annotations``: TorchScript reads the class annotation ``runs: List[HeadRun]`` as a type,
# which that import would turn into a string it cannot resolve.
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hiap.backend import KernelBackendMixin, default_backend
from hiap_kernels.ragged_attn.reference import build_head_table
from hiap_kernels.ragged_attn.sdpa import HeadRun, head_runs, ragged_attention_sdpa

ATTENTION_PATHS = ("sdpa", "triton")


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """nn.Linear that may be zero-sized (a layer with nothing left) without torch's no-op init warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(in_features, out_features, bias=bias)


def _without_autograd(module: nn.Module, x: torch.Tensor) -> bool:
    """True when nothing asks for gradients: the inference kernels have no backward."""
    if not torch.is_grad_enabled():
        return True
    return not x.requires_grad and not any(p.requires_grad for p in module.parameters())


def _per_key_bias(attn_mask: torch.Tensor, batch: int, tokens: int) -> torch.Tensor | None:
    """A mask of shape ``[B or 1, 1, 1, N]`` as the ragged kernel's ``key_bias [B, N]`` (float32); None otherwise."""
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1 or attn_mask.shape[-1] != tokens:
        return None
    return attn_mask[:, 0, 0, :].float().expand(batch, tokens).contiguous()


class PrunedAttention(KernelBackendMixin, nn.Module):
    """Attention over ragged per-head widths. Input ``[B, N, D]``, output ``[B, N, D_out]``.

    Two paths, both exact: ``sdpa`` (one ``F.scaled_dot_product_attention`` per run of equal-width heads; the only
    one on a CPU and the one a layer of equal heads uses) and ``triton`` (the ragged kernel, one launch for the whole
    layer, on the Triton backend). ``attention_path`` holds the choice: None takes the construction-time default
    (the kernel for a layer with several head widths when the Triton backend is on), ``hiap.optimize`` sets it from
    a measurement. With no head left the layer reduces to ``proj``'s bias (zeros without one). An inference module:
    no attention dropout; with gradients enabled it runs the differentiable ``sdpa`` path.
    """

    # Its own op, then what a block reading its table runs: the fused block's GEMMs, token reduction's steps.
    kernel_names = ("ragged_attention", "fused_layernorm_linear", "fused_linear_residual", "merge_tokens",
                    "nearest_tokens", "token_redundancy")
    runs: List[HeadRun]  # declared for TorchScript, which would otherwise type the runs as plain tuples

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
        self.out_width = sum(v_widths)
        self.max_qk_width = max(qk_widths, default=0)
        self.max_v_width = max(v_widths, default=0)
        self.qkv = _linear(embed_dim, 2 * sum(qk_widths) + self.out_width, qkv_bias)
        self.proj = _linear(self.out_width, out_dim, proj_bias)
        self.runs = list(head_runs(qk_widths, v_widths))
        # The kernel's layout table, valid by construction (built from the widths): derived, so not in the state_dict.
        self.register_buffer("head_table", build_head_table(qk_widths, v_widths), persistent=False)
        self.attention_path: str | None = None
        self.resolve_kernels(default_backend())

    @property
    def ragged(self) -> bool:
        """Whether the heads have more than one width pair (SDPA then needs one call per run)."""
        return len(self.runs) > 1

    def _kernel(self, qkv: torch.Tensor):
        """The Triton op when this layer's path is ``triton`` and it can run here, else None (the SDPA path)."""
        path = self.attention_path or ("triton" if self.ragged else "sdpa")
        if path != "triton" or not _without_autograd(self, qkv):
            return None
        return self.kernel()

    @torch.jit.unused
    def _kernel_attention(self, qkv: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Attention by the ragged Triton kernel where this layer takes it (``[B, N, sum(v_w)]``), else None.

        Not part of a TorchScript model: a scripted layer runs the SDPA path, as a timm Attention does."""
        batch, tokens, _ = qkv.shape
        key_bias = None if attn_mask is None else _per_key_bias(attn_mask, batch, tokens)
        if attn_mask is not None and key_bias is None:
            return None
        ragged_attention = self._kernel(qkv)
        if ragged_attention is None:
            return None
        return ragged_attention(qkv, self.head_table, self.scale, self.max_qk_width, self.max_v_width,
                                out_width=self.out_width, key_bias=key_bias)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                ) -> torch.Tensor:
        return self.attend(x, attn_mask, is_causal)[0]

    def attend(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The forward, also returning the packed ``qkv [B, N, T]`` token reduction reads (None with no head left).

        ``attn_mask``: an additive float bias broadcastable to ``[B, 1, N, N]``. One per key (``[B, 1, 1, N]``, token
        reduction's ``log(size)``) the ragged kernel takes as its ``key_bias``; any other runs the SDPA path.
        """
        if is_causal:
            raise NotImplementedError("PrunedAttention does not take causal masks")
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            raise NotImplementedError("PrunedAttention takes an additive float attn_mask, not a boolean one")
        batch, tokens, _ = x.shape
        if self.num_heads == 0:
            bias = self.proj.bias
            if bias is None:
                return x.new_zeros([batch, tokens, self.out_dim]), None
            return bias.to(x.dtype).expand(batch, tokens, self.out_dim), None
        out, qkv = self.attention_output(x, attn_mask)
        return self.proj(out), qkv

    def attention_output(self, x: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor] = None,
                         qkv: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Attention before ``proj``: ``(out [B, N, sum(v_w)], qkv [B, N, T])``; needs at least one head. ``qkv``
        given (e.g. from a GEMM with LayerNorm fused into it) replaces ``self.qkv(x)``."""
        if qkv is None:
            if x is None:
                raise ValueError("attention_output needs x or qkv")
            qkv = self.qkv(x)
        out: Optional[torch.Tensor] = None
        if not torch.jit.is_scripting():
            out = self._kernel_attention(qkv, attn_mask)
        if out is None:
            out = ragged_attention_sdpa(qkv, self.runs, self.scale, attn_mask)
        return out, qkv

    def extra_repr(self) -> str:
        return f"qk_widths={self.qk_widths}, v_widths={self.v_widths}, scale={self.scale:.6g}"


class PrunedMlp(KernelBackendMixin, nn.Module):
    """FFN at the kept width ``F'``: ``fc2(act(fc1(x)))``; with ``F' = 0`` only ``fc2``'s bias remains.

    Paths: ``linear`` (``nn.Linear`` then GELU) or ``triton`` (fc1 + bias + GELU in one kernel, on the Triton backend,
    without gradients); ``ffn_path`` None takes the backend's, ``hiap.optimize`` sets it from a measurement.
    Input ``[..., D]``, output ``[..., D_out]``.
    """

    kernel_names = ("fused_linear_gelu", "fused_layernorm_linear", "fused_linear_residual")

    def __init__(self, in_features: int, hidden_features: int, out_features: int, act: nn.Module,
                 *, fc1_bias: bool, fc2_bias: bool):
        super().__init__()
        self.hidden_features = int(hidden_features)
        self.out_features = out_features
        self.fc1 = _linear(in_features, self.hidden_features, fc1_bias)
        self.act = act
        self.fc2 = _linear(self.hidden_features, out_features, fc2_bias)
        self.ffn_path: str | None = None
        self.resolve_kernels(default_backend())

    def _kernel(self, x: torch.Tensor):
        """The fused Triton op when this layer's path is ``triton`` and it can run here, else None (nn.Linear)."""
        if type(self.act) is not nn.GELU or (self.ffn_path or "triton") != "triton" or not _without_autograd(self, x):
            return None
        return self.kernel()

    @torch.jit.unused
    def _kernel_hidden(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``GELU(fc1(x))`` by the fused Triton kernel where this layer takes it, else None.

        Not part of a TorchScript model: a scripted layer runs ``nn.Linear`` and the activation, as a timm Mlp does."""
        fused_linear_gelu = self._kernel(x)
        if fused_linear_gelu is None:
            return None
        weight, bias = self.fc1.weight, self.fc1.bias
        if torch.is_autocast_enabled(x.device.type):
            # The kernel takes one dtype, as F.linear does once autocast has cast its operands.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        elif weight.dtype != x.dtype:
            x = x.to(weight.dtype)
        return fused_linear_gelu(x, weight, bias, approximate=self.act.approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden_features == 0:
            shape = list(x.shape[:-1]) + [self.out_features]
            bias = self.fc2.bias
            if bias is None:
                return x.new_zeros(shape)
            return bias.to(x.dtype).expand(shape)
        hidden: Optional[torch.Tensor] = None
        if not torch.jit.is_scripting():
            hidden = self._kernel_hidden(x)
        if hidden is None:
            hidden = self.act(self.fc1(x))
        return self.fc2(hidden)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_features}"


def _layer_scale(module: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """timm LayerScale's ``gamma`` in ``dtype`` (None for Identity)."""
    gamma = getattr(module, "gamma", None)
    return None if gamma is None else gamma.to(dtype)


def _plain_layer_norm(norm: nn.Module) -> bool:
    """A LayerNorm over the last dim only (what the fused GEMM prologue computes)."""
    return isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1


def fused_block_forward(block: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                        is_causal: bool = False) -> torch.Tensor:
    """A pruned timm Block's forward as fused GEMMs (bound to the block by ``hiap.optimize``).

    Each half of the block opens with its LayerNorm folded into the prologue of the GEMM that reads it
    (``fused_layernorm_linear``: norm1 -> qkv, norm2 -> fc1 with GELU in the epilogue) and ends in one
    ``fused_linear_residual`` GEMM (proj, fc2) with bias, LayerScale and the residual add in its epilogue: four
    kernels and the attention per block instead of separate norm, bias, activation, scale and add kernels. A half with
    no head or no neuron left is one add of its bias (LayerScaled).
    Inference only (eval, no gradients); attention runs on the module's own path. ``x [B, N, D] -> [B, N, D]``.
    A TorchScript model, which cannot launch Triton kernels, runs the block as timm's ``Block`` does.
    """
    if torch.jit.is_scripting():
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return _fused_block(block, x, attn_mask, is_causal)


@torch.jit.unused
def _fused_block(block: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool
                 ) -> torch.Tensor:
    """``fused_block_forward`` on the kernels each half's module resolved; a half whose module runs the PyTorch path
    (a model moved where Triton does not run) runs as timm's ``Block`` does."""
    if attn_mask is not None or is_causal:
        raise NotImplementedError("the fused block takes no attention mask")
    attn, mlp, norm1, norm2 = block.attn, block.mlp, block.norm1, block.norm2
    layernorm_linear, linear_residual = attn.kernel("fused_layernorm_linear"), attn.kernel("fused_linear_residual")
    if not attn.num_heads:
        # No head left: the half adds proj's bias, which reads nothing of its input, so its LayerNorm is skipped.
        x = x + block.ls1(attn(x))
    elif linear_residual is None:
        x = x + block.ls1(attn(norm1(x)))
    else:
        if _plain_layer_norm(norm1):
            qkv = layernorm_linear(x, norm1.weight, norm1.bias, norm1.eps, attn.qkv.weight, attn.qkv.bias)
            out, _ = attn.attention_output(None, qkv=qkv)
        else:
            out, _ = attn.attention_output(norm1(x))
        x = linear_residual(out, attn.proj.weight, attn.proj.bias, x, _layer_scale(block.ls1, x.dtype))
    if not mlp.hidden_features:  # no neuron left: fc2's bias alone, no LayerNorm to read
        return x + block.ls2(mlp(x))
    layernorm_linear, linear_residual = mlp.kernel("fused_layernorm_linear"), mlp.kernel("fused_linear_residual")
    if type(mlp.act) is not nn.GELU or linear_residual is None:
        return x + block.ls2(mlp(norm2(x)))
    if _plain_layer_norm(norm2):
        activation = "gelu_tanh" if mlp.act.approximate == "tanh" else "gelu"
        hidden = layernorm_linear(x, norm2.weight, norm2.bias, norm2.eps, mlp.fc1.weight, mlp.fc1.bias, activation)
    else:
        hidden = mlp.kernel()(norm2(x), mlp.fc1.weight, mlp.fc1.bias, approximate=mlp.act.approximate)
    return linear_residual(hidden, mlp.fc2.weight, mlp.fc2.bias, x, _layer_scale(block.ls2, x.dtype))
