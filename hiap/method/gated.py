"""Gated attention and FFN modules that wrap timm's Attention and Mlp; the gated weights per ``hiap.backend``.

Each gated module keeps the timm sub-modules it wraps (``qkv``, ``proj``, ``fc1``, ``fc2``...) under the same names and
holds its gates in ``.gates`` (an :class:`AttentionGates` / :class:`FfnGates`). A forward asks the gates for one
:class:`GateDraw` and hands it to ``hiap_kernels.gated_qkv_weight`` / ``gated_fc2_weight`` (sampling and masking in
one Triton launch, and one back) or to their PyTorch references, which draw the very same gates. Training mode
samples; eval mode applies the deterministic decision, so the eval-mode model, its MAC count and the extracted model
agree.

The masks act on the weights, not on the activations: a masked output column of a linear layer is the same as that
weight row (and bias) scaled by its mask, and a masked FFN neuron the same as fc2's input column scaled by it. So the
GEMMs stay the library's (cuBLAS on a GPU, forward and backward), the masking touches ``[3 H Dh, D]`` and ``[D, F]``
weights instead of ``[B N, 3 H Dh]`` and ``[B N, F]`` activations, and autograd gives the gates' gradients
(``dL/dm = <dL/dW', W> + dL/db' b``, exactly the output-masked formula of ``hiap_kernels.gated_qkv_reference``). With
every gate open the masks are exact ones: the model computes bit for bit what timm's does.

On the Triton backend a gated module can instead run the fused op of its family (``hiap_kernels.gated_qkv``: the
qkv GEMM with the gates sampled and applied in its epilogue, writing q, k, v as SDPA reads them; ``gated_fc1``: fc1 +
bias + GELU + neuron mask in one kernel). Which of the two a layer runs (``training_path``) is measured, not assumed:
``HiAPViT.choose_training_paths`` (``hiap.Pruner`` calls it before its first step on a GPU) times each path's forward
and backward on the layer's own input and keeps the faster (``"weights"`` where the fused op cannot run, and until
chosen). Both draw the same gates.

Two states leave units out of the GEMMs altogether, by gathering the kept rows and columns of the weights: a fixed
structure (``use_decision``: the decision, no sampling) and retirement (``retire``: heads and neuron groups closed for
good are left out of the sampled weights while the other gates keep sampling).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hiap.backend import KernelBackendMixin, default_backend
from hiap.method.gates import AttentionGates, FfnGates, GateSchedule, gate_offset
from hiap_kernels.gated_weight.reference import (
    check_gather_indices,
    gated_fc2_weight_reference,
    gated_qkv_weight_reference,
    gather_weight_reference,
    inverse_index,
)


def _rename_legacy_gate_keys(names: dict[str, str]):
    """A load_state_dict pre-hook that maps the logit names of files written before ``.gates`` existed."""

    def hook(module, state_dict, prefix, *args):
        for old, new in names.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    return hook


# Paths of a sampling training forward: the masks on the weights with the library's GEMMs, or the family's fused op.
TRAINING_PATHS = ("weights", "fused")


def _median_ms(run, device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time (ms) of ``run()`` on ``device``, synchronised around each call (a GPU's queue drained)."""
    import statistics
    import time

    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda device=None: None)
    times = []
    for index in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class _TrainingPathChoice:
    """``choose_training_path`` for a gated module whose two paths are ``_weights_path(x)`` and ``_fused_path(x)``
    (each the module's whole forward while sampling; both return the output)."""

    fused_op: str = ""
    training_path: str | None = None

    def fused_kernel(self):
        """The family's fused op where the module runs it (the Triton backend, CUDA or the interpreter), else None."""
        return self.kernel(self.fused_op)

    def choose_training_path(self, x: torch.Tensor, timer=None) -> str:
        """Time a forward and backward of each path on a copy of ``x`` and keep the faster in ``training_path``.

        ``timer(run) -> ms`` measures a callable (default: the median of five synchronised calls after two warm-up
        calls, the first of which compiles the kernels). The backward goes to the input, the weights and the gate
        logits through ``torch.autograd.grad``, so no ``.grad`` is touched. Returns the path kept; ``"weights"``
        without timing where the fused op cannot run.
        """
        if self.fused_kernel() is None:
            self.training_path = "weights"
            return self.training_path
        timer = timer or (lambda run: _median_ms(run, x.device))
        probe = x.detach().clone().requires_grad_(True)
        inputs = [probe] + [p for p in self.parameters() if p.requires_grad]

        def timed(path):
            def run():
                with torch.enable_grad():
                    out = path(probe)
                    torch.autograd.grad(out.float().sum(), inputs, allow_unused=True)
            return timer(run)

        times = {"weights": timed(self._weights_path), "fused": timed(self._fused_path)}
        self.training_path = min(TRAINING_PATHS, key=lambda path: (times[path], path != "weights"))
        self.training_path_times = times
        return self.training_path

    def _sampling_path(self, x: torch.Tensor):
        """The path of a sampling forward: the fused op where ``choose_training_path`` chose it (and it can run on
        its device), the masks on the weights otherwise. Read, never changed, here: a compiled forward keeps its graph."""
        if self.training_path == "fused" and self.fused_kernel() is not None:
            return self._fused_path
        return self._weights_path


class GatedAttention(_TrainingPathChoice, KernelBackendMixin, nn.Module):
    """timm ``Attention`` with head gates ``g [H]``, q/k-dim gates ``dqk [H, Dh/G]`` and v-dim gates ``dv [H, Dh/G]``.

    Masks: q columns times ``dqk``, v columns times ``g * dv`` (k unmasked). Input and output ``[B, N, D]``.
    """

    # Its own ops, then what reads its table: the objective over the model's gates and token reduction's steps.
    kernel_names = ("gated_qkv_weight", "gated_qkv", "gather_weight", "gate_objective", "merge_tokens",
                    "nearest_tokens", "token_redundancy")
    fused_op = "gated_qkv"

    def __init__(self, attn: nn.Module, layer_index: int, schedule: GateSchedule | None = None, *,
                 init_logit: float, dim_group: int, min_heads: int, min_dim_fraction: float):
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = attn.num_heads * attn.head_dim
        self.scale = attn.scale
        self.layer_index = layer_index
        self.qkv = attn.qkv
        self.attn_drop = attn.attn_drop
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.gates = AttentionGates(
            attn.num_heads, attn.head_dim, group=dim_group, init_logit=init_logit,
            offset=gate_offset(layer_index, "attention"), min_heads=min_heads, min_dim_fraction=min_dim_fraction,
            schedule=schedule, device=attn.qkv.weight.device,
        )
        self._register_load_state_dict_pre_hook(
            _rename_legacy_gate_keys({"gate_head": "gates.head", "gate_qk": "gates.qk", "gate_v": "gates.v"}),
            with_module=True,
        )
        # While the model's structure is fixed (``use_decision``): the live heads' rows of the qkv weight [3 H' Dh]
        # (int64), the decision's scale of those rows (float32) and the heads' columns of proj's input [H' Dh], with
        # each row's / column's place among them (-1 where removed) for the gradient's way back.
        self.register_buffer("decided_rows", None, persistent=False)
        self.register_buffer("decided_row_scale", None, persistent=False)
        self.register_buffer("decided_columns", None, persistent=False)
        self.register_buffer("decided_rows_inverse", None, persistent=False)
        self.register_buffer("decided_columns_inverse", None, persistent=False)
        # While some heads are retired (``retire``): the other heads' qkv rows and proj columns, with their inverses.
        self.register_buffer("live_rows", None, persistent=False)
        self.register_buffer("live_columns", None, persistent=False)
        self.register_buffer("live_rows_inverse", None, persistent=False)
        self.register_buffer("live_columns_inverse", None, persistent=False)
        self.register_buffer("retired_heads", None, persistent=False)
        self.retired_mask: torch.Tensor | None = None  # the same on the host (bool [H]), for counts without a read
        self.resolve_kernels(default_backend())

    @torch.no_grad()
    def use_decision(self, fixed: bool) -> None:
        """While ``fixed``, run only the heads the decision keeps (read once, here), masked inside as decided: a
        removed head costs nothing in qkv, SDPA or proj, forward or backward. The decision must not change meanwhile."""
        if not fixed:
            self.decided_rows = self.decided_row_scale = self.decided_columns = None
            self.decided_rows_inverse = self.decided_columns_inverse = None
            return
        scale = self.gates.qkv_row_scale(tuple(keep.float() for keep in self.gates.decisions()))  # [3 H Dh]
        live = scale[2 * self.attn_dim :].view(self.num_heads, self.head_dim).ne(0).any(dim=1)  # v columns left
        rows, columns, rows_inverse, columns_inverse = self._head_index(live)
        self._check_index(rows, rows_inverse, columns, columns_inverse)
        self.decided_rows, self.decided_columns = rows, columns
        self.decided_row_scale = scale[rows]
        self.decided_rows_inverse, self.decided_columns_inverse = rows_inverse, columns_inverse

    def _check_index(self, rows: torch.Tensor, rows_inverse: torch.Tensor, columns: torch.Tensor,
                     columns_inverse: torch.Tensor) -> None:
        """The gather op's index check, once, as the index is built (the op remembers it: its steps read nothing)."""
        check_gather_indices(rows, rows_inverse, 3 * self.attn_dim, dim=0)
        check_gather_indices(columns, columns_inverse, self.attn_dim, dim=1)

    @torch.no_grad()
    def retire(self, heads: torch.Tensor | None) -> None:
        """Stop computing the heads marked in bool ``heads [H]`` (None or none marked: compute all) while the gates
        sample: a retired head is closed, its qkv rows, SDPA head and proj columns are left out of the forward and
        backward, and its logits get no gradient from the task loss. Eval-mode forwards and a fixed structure
        (``use_decision``) ignore it. ``HiAPViT.retire_closed`` picks the heads. A host mask costs no device read."""
        if heads is not None and (heads.shape != (self.num_heads,) or heads.dtype != torch.bool):
            raise ValueError(f"retired heads must be a bool tensor of shape ({self.num_heads},), got "
                             f"{heads.dtype} {tuple(heads.shape)}")
        heads = None if heads is None else heads.cpu()
        if heads is None or not bool(heads.any()):
            self.retired_mask = self.retired_heads = self.live_rows = self.live_columns = None
            self.live_rows_inverse = self.live_columns_inverse = None
            return
        device = self.gates.head.device
        # Built on the host, then copied over: the index sizes are host numbers anyway.
        self.retired_mask = heads.clone()
        self.retired_heads = heads.to(device)
        index = self._head_index(~heads)
        self.live_rows, self.live_columns, self.live_rows_inverse, self.live_columns_inverse = (
            tensor.to(device) for tensor in index)
        self._check_index(self.live_rows, self.live_rows_inverse, self.live_columns, self.live_columns_inverse)

    def _head_index(self, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For bool ``live [H]``: the live heads' rows of the qkv weight ``[3 H' Dh]``, their columns of proj's input
        ``[H' Dh]`` (int64, in head order) and each one's inverse index."""
        heads = live.nonzero().squeeze(1)
        columns = (heads[:, None] * self.head_dim + torch.arange(self.head_dim, device=heads.device)).reshape(-1)
        rows = torch.cat([part * self.attn_dim + columns for part in range(3)])
        return rows, columns, inverse_index(rows, 3 * self.attn_dim), inverse_index(columns, self.attn_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.decided_rows is not None:
            return self._gathered_forward(x, self.qkv.weight, self.qkv.bias, self.decided_rows,
                                          self.decided_rows_inverse, self.decided_row_scale, self.decided_columns,
                                          self.decided_columns_inverse, attn_mask, is_causal)
        if self.live_rows is None and attn_mask is None and not is_causal and self.training \
                and not self.gates.schedule.decided:
            return self._sampling_path(x)(x)
        return self._weights_path(x, attn_mask, is_causal)

    def _weights_path(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      is_causal: bool = False) -> torch.Tensor:
        """The masks on the qkv weight and bias (one launch of ``gated_qkv_weight`` on the Triton backend, its
        reference chain otherwise), then the library's GEMM, SDPA and proj."""
        draw = self.gates.draw()
        gated_weight = self.kernel() or gated_qkv_weight_reference
        weight, bias = gated_weight(self.qkv.weight, self.qkv.bias, *draw.logits, **draw.options())
        if self.live_rows is not None and draw.sample:
            # Retired heads left out: the live heads' rows of the sampled weight (the gates of every head are drawn,
            # so each live gate takes the same Philox counter as without retirement).
            return self._gathered_forward(x, weight, bias, self.live_rows, self.live_rows_inverse, None,
                                          self.live_columns, self.live_columns_inverse, attn_mask, is_causal)
        return self.proj_drop(self.proj(self._attention(x, weight, bias, attn_mask, is_causal)[0]))

    def _fused_path(self, x: torch.Tensor) -> torch.Tensor:
        """``gated_qkv``: the qkv GEMM with the gates sampled and applied in its epilogue, q, k, v written as SDPA
        reads them; then SDPA and proj."""
        draw = self.gates.draw()
        q, k, v = self.fused_kernel()(x, self.qkv.weight, self.qkv.bias, *draw.logits, **draw.options())
        batch, tokens, _ = x.shape
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                             scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)))

    def _gathered_forward(self, x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                          rows: torch.Tensor, rows_inverse: torch.Tensor, row_scale: torch.Tensor | None,
                          columns: torch.Tensor, columns_inverse: torch.Tensor, attn_mask: torch.Tensor | None,
                          is_causal: bool) -> torch.Tensor:
        """Some heads only (the decided or the unretired ones): their ``rows`` of the qkv weight ``[3 H Dh, D]``
        (times ``row_scale`` where given), SDPA over them, proj over their ``columns`` (an attention without heads is
        proj's bias). Token reduction's ``attend`` keeps the masked path, whose q and k it reads at every head."""
        heads = columns.numel() // self.head_dim
        # The kept rows / columns (scaled as decided): one launch each way on the Triton backend.
        gather = self.kernel("gather_weight") or gather_weight_reference
        weight, bias = gather(qkv_weight, qkv_bias, rows, rows_inverse, row_scale, dim=0)
        proj_weight, _ = gather(self.proj.weight, None, columns, columns_inverse, None, dim=1)
        if heads == 0:
            # [B, N, 0]: proj gives its bias. Both weights still take part (zero gradients), as DDP expects.
            out = F.linear(x, weight, bias)
        else:
            out = self._attention(x, weight, bias, attn_mask, is_causal, heads)[0]
        return self.proj_drop(F.linear(out, proj_weight, self.proj.bias))

    def _attention(self, x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                   attn_mask: torch.Tensor | None, is_causal: bool, heads: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention of ``heads`` full heads (all by default) with the qkv weight given, before proj: ``(out
        [B, N, heads * Dh], q, k [B, heads, N, Dh])``."""
        batch, tokens, _ = x.shape
        heads = self.num_heads if heads is None else heads
        qkv = F.linear(x, qkv_weight, qkv_bias)
        # [B, N, 3 * H * Dh] -> q, k, v [B, H, N, Dh] as views, the layout timm hands to SDPA
        q, k, v = qkv.reshape(batch, tokens, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale,
        )
        return out.transpose(1, 2).reshape(batch, tokens, heads * self.head_dim), q, k

    def attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward, also returning what token reduction reads: ``(out [B, N, D], q, k [B, H, N, Dh], live_qk
        [H, Dh], live_heads [H])``, the last two bool: the q/k columns and heads a pruned copy would have (open gates;
        a head without v columns is gone), so that reduction compares the keys the extracted model compares."""
        draw = self.gates.draw()
        values = self.gates.values(draw)
        if self.retired_heads is not None and draw.sample:  # retired heads closed, as the forward leaves them out
            values = (values[0].masked_fill(self.retired_heads, 0.0), *values[1:])
        scale = self.gates.qkv_row_scale(values).to(self.qkv.weight.dtype)  # [3 * H * Dh]
        bias = None if self.qkv.bias is None else self.qkv.bias * scale
        out, q, k = self._attention(x, self.qkv.weight * scale[:, None], bias, attn_mask, is_causal)
        out = self.proj_drop(self.proj(out))
        live_heads = scale[2 * self.attn_dim :].view(self.num_heads, self.head_dim).ne(0).any(dim=1)
        live_qk = scale[: self.attn_dim].view(self.num_heads, self.head_dim).ne(0) & live_heads[:, None]
        return out, q, k, live_qk, live_heads

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, layer={self.layer_index}"


class GatedMlp(_TrainingPathChoice, KernelBackendMixin, nn.Module):
    """timm ``Mlp`` with an FFN block gate ``b [1]`` and neuron gates ``c [F/G]``; mask ``b * c`` after the GELU.

    Input and output ``[..., D]``.
    """

    kernel_names = ("gated_fc2_weight", "gated_fc1", "gather_weight")
    fused_op = "gated_fc1"

    def __init__(self, mlp: nn.Module, layer_index: int, schedule: GateSchedule | None = None, *,
                 init_logit: float, dim_group: int, min_neuron_fraction: float):
        super().__init__()
        if type(mlp.act) is not nn.GELU:
            raise TypeError(f"GatedMlp needs nn.GELU as the activation, got {type(mlp.act).__name__}")
        self.hidden_features = mlp.fc1.out_features
        self.layer_index = layer_index
        self.fc1 = mlp.fc1
        self.act = mlp.act
        self.drop1 = mlp.drop1
        self.fc2 = mlp.fc2
        self.drop2 = mlp.drop2
        self.gates = FfnGates(
            self.hidden_features, group=dim_group, init_logit=init_logit, offset=gate_offset(layer_index, "ffn"),
            min_neuron_fraction=min_neuron_fraction, schedule=schedule, device=mlp.fc1.weight.device,
        )
        self._register_load_state_dict_pre_hook(
            _rename_legacy_gate_keys({"gate_block": "gates.block", "gate_neuron": "gates.neuron"}), with_module=True
        )
        # The kept neurons [F'] (int64) while the model's structure is fixed (``use_decision``), else None; and each
        # neuron's place among them (-1 where removed).
        self.register_buffer("decided_neurons", None, persistent=False)
        self.register_buffer("decided_neurons_inverse", None, persistent=False)
        # While some neuron groups are retired (``retire``): the other neurons [F''] and their inverse.
        self.register_buffer("live_neurons", None, persistent=False)
        self.register_buffer("live_neurons_inverse", None, persistent=False)
        self.retired_mask: torch.Tensor | None = None  # the retired groups on the host (bool [F / G]), or None
        self.resolve_kernels(default_backend())

    @torch.no_grad()
    def use_decision(self, fixed: bool) -> None:
        """While ``fixed``, run only the neurons the decision keeps (read once, here): a removed block or neuron then
        costs nothing, forward or backward. The gates' decision must not change while fixed."""
        self.decided_neurons = self.gates.kept_neurons().nonzero().squeeze(1) if fixed else None
        self.decided_neurons_inverse = inverse_index(self.decided_neurons, self.hidden_features) if fixed else None
        if fixed:  # the gather op's index check, once, here (the op remembers it: its steps read nothing)
            check_gather_indices(self.decided_neurons, self.decided_neurons_inverse, self.hidden_features)

    @torch.no_grad()
    def retire(self, groups: torch.Tensor | None) -> None:
        """Stop computing the neuron groups marked in bool ``groups [F / G]`` (None or none marked: compute all)
        while the gates sample: a retired group is closed, its fc1 rows and fc2 columns are left out of the forward
        and backward, and its logits get no gradient from the task loss. Eval-mode forwards and a fixed structure
        ignore it. ``HiAPViT.retire_closed`` picks the groups. A host mask costs no device read."""
        expected = (self.hidden_features // self.gates.group,)
        if groups is not None and (groups.shape != expected or groups.dtype != torch.bool):
            raise ValueError(f"retired neuron groups must be a bool tensor of shape {expected}, got "
                             f"{groups.dtype} {tuple(groups.shape)}")
        groups = None if groups is None else groups.cpu()
        if groups is None or not bool(groups.any()):
            self.retired_mask = self.live_neurons = self.live_neurons_inverse = None
            return
        device = self.gates.neuron.device
        self.retired_mask = groups.clone()
        live = (~groups).repeat_interleave(self.gates.group).nonzero().squeeze(1)
        self.live_neurons = live.to(device)
        self.live_neurons_inverse = inverse_index(live, self.hidden_features).to(device)
        check_gather_indices(self.live_neurons, self.live_neurons_inverse, self.hidden_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decided_neurons is not None:
            return self._gathered_forward(x, self.fc2.weight, self.decided_neurons, self.decided_neurons_inverse)
        if self.live_neurons is None and self.training and not self.gates.schedule.decided:
            return self._sampling_path(x)(x)
        return self._weights_path(x)

    def _weights_path(self, x: torch.Tensor) -> torch.Tensor:
        """fc1 and GELU as timm runs them, then fc2 with the neuron mask on its weight's columns (one launch of
        ``gated_fc2_weight`` on the Triton backend, the reference otherwise)."""
        draw = self.gates.draw()
        gated_weight = self.kernel() or gated_fc2_weight_reference
        weight = gated_weight(self.fc2.weight, *draw.logits, **draw.options())
        if self.live_neurons is not None and draw.sample:
            # Retired groups left out: the live neurons' columns of the sampled weight (every gate is drawn, so each
            # live gate takes the same Philox counter as without retirement).
            return self._gathered_forward(x, weight, self.live_neurons, self.live_neurons_inverse)
        hidden = self.drop1(self.act(self.fc1(x)))
        return self.drop2(F.linear(hidden, weight, self.fc2.bias))

    def _fused_path(self, x: torch.Tensor) -> torch.Tensor:
        """``gated_fc1``: fc1 + bias + GELU + the sampled neuron mask in one kernel, then fc2 as timm runs it."""
        draw = self.gates.draw()
        hidden = self.fused_kernel()(x, self.fc1.weight, self.fc1.bias, *draw.logits, **draw.options(),
                                      approximate=self.act.approximate)
        return self.drop2(self.fc2(self.drop1(hidden)))

    def _gathered_forward(self, x: torch.Tensor, fc2_weight: torch.Tensor, kept: torch.Tensor,
                          inverse: torch.Tensor) -> torch.Tensor:
        """Some neurons only (the decided or the unretired ones): the ``kept`` rows of fc1 and columns of
        ``fc2_weight [D, F]`` (their gradients land in those rows and columns; an FFN without neurons is fc2's
        bias)."""
        gather = self.kernel("gather_weight") or gather_weight_reference
        fc1_weight, fc1_bias = gather(self.fc1.weight, self.fc1.bias, kept, inverse, None, dim=0)
        fc2_weight, _ = gather(fc2_weight, None, kept, inverse, None, dim=1)
        hidden = self.drop1(self.act(F.linear(x, fc1_weight, fc1_bias)))
        return self.drop2(F.linear(hidden, fc2_weight, self.fc2.bias))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_features}, layer={self.layer_index}"
