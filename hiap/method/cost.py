"""Analytic MAC model of HiAP: hard counts (int) and the differentiable expectation.

Per layer with N tokens and embed dim D:
    kept q/k dim : 2*N*D + N*N     (q and k projection columns, its share of QK^T)
    kept v dim   : 2*N*D + N*N     (v projection column, its share of A@V, proj input row)
    kept neuron  : 2*N*D           (fc1 column, fc2 row)
plus the static patch embedding and classifier head. A head whose v dims are all closed is gone with its q/k dims.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.layers.attention import Attention

from hiap.method.convert import HiAPViT, inner_vit
from hiap.method.gates import attention_decisions, ffn_decisions, minimum_count
from hiap.method.pruned import PrunedAttention, PrunedMlp
from hiap.method.token_overhead import step_overhead_macs
from hiap_kernels.gates import keep_probability
from hiap_kernels.objective import GateLayout, expected_gate_macs


@dataclass(frozen=True)
class UnitCosts:
    """MACs of one kept q/k dim, v dim and FFN neuron at a given token count and embed dim."""

    qk_dim: int
    v_dim: int
    neuron: int

    @classmethod
    def at(cls, tokens: int, embed_dim: int) -> "UnitCosts":
        attention_dim = 2 * tokens * embed_dim + tokens * tokens
        return cls(qk_dim=attention_dim, v_dim=attention_dim, neuron=2 * tokens * embed_dim)


def token_count(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """Tokens per image: patches at ``img_size`` (default: the model's own) plus class/register tokens."""
    vit = inner_vit(model, "count_macs")
    patch = vit.patch_embed
    if img_size is None:
        patches = patch.num_patches
    else:
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        patches = (height // patch.patch_size[0]) * (width // patch.patch_size[1])
    return patches + vit.num_prefix_tokens


def static_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """MACs that no gate touches: the patch embedding convolution and the classifier head."""
    vit = inner_vit(model, "count_macs")
    proj = vit.patch_embed.proj
    patches = token_count(model, img_size) - vit.num_prefix_tokens
    kernel = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    macs = patches * proj.out_channels * kernel
    if isinstance(vit.head, nn.Linear):
        macs += vit.head.in_features * vit.head.out_features
    return macs


def _attention_kept_dims(attn: nn.Module) -> tuple[int, int]:
    """(kept q/k dims, kept v dims) of a dense or pruned attention layer."""
    if isinstance(attn, PrunedAttention):
        return sum(attn.qk_widths), sum(attn.v_widths)
    if type(attn) is Attention:
        width = attn.num_heads * attn.head_dim
        return width, width
    raise TypeError(f"cannot count MACs of attention module {type(attn).__name__}")


def _ffn_kept_neurons(mlp: nn.Module) -> int:
    if isinstance(mlp, PrunedMlp):
        return mlp.hidden_features
    if type(mlp) is Mlp:
        return mlp.fc1.out_features
    raise TypeError(f"cannot count MACs of MLP module {type(mlp).__name__}")


@dataclass(frozen=True)
class StackedGates:
    """Every layer's logits of one kind in one tensor, so the cost terms are a few ops whatever the depth.

    head ``[L, H]``, qk and v ``[L, H, G]``, block ``[L, 1]``, neuron ``[L, F / G']``: views of ``flat``, the one
    differentiable concatenation of the layers' logit parameters (kind by kind, layer by layer), so that one sigmoid
    gives every keep probability. With the group sizes and minimums the decision needs, and ``layout``, the shapes and
    hard minimums as the fused objective (``hiap_kernels.gate_objective``) reads them, which also splits ``flat``.
    """

    flat: torch.Tensor
    layout: GateLayout
    head: torch.Tensor
    qk: torch.Tensor
    v: torch.Tensor
    block: torch.Tensor
    neuron: torch.Tensor
    head_group: int
    neuron_group: int
    head_dim: int
    hidden_features: int
    min_heads: int
    min_dim_fraction: float
    min_neuron_fraction: float
    # sigmoid(flat), made on first use. A dict rather than functools.cached_property, whose lock torch.compile cannot
    # trace: the objective compiles into one graph.
    _computed: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, model: HiAPViT) -> "StackedGates":
        attention = [layer.gates for layer in model.attention_layers()]
        ffn = [layer.gates for layer in model.ffn_layers()]
        first, first_ffn = attention[0], ffn[0]
        kinds = ([g.head for g in attention], [g.qk for g in attention], [g.v for g in attention],
                 [g.block for g in ffn], [g.neuron for g in ffn])
        # One stack per kind, then one flat tensor: a fixed number of ops whatever the depth.
        flat = torch.cat([torch.stack(kind).reshape(-1) for kind in kinds])
        heads, groups = first.qk.shape
        neuron_groups = first_ffn.neuron.shape[0]
        layout = GateLayout(
            layers=len(attention), heads=heads, groups=groups, neuron_groups=neuron_groups, head_group=first.group,
            neuron_group=first_ffn.group, min_heads=min(first.min_heads, heads),
            dims_min=minimum_count(first.min_dim_fraction, groups),
            neurons_min=minimum_count(first_ffn.min_neuron_fraction, neuron_groups))
        return cls(
            flat, layout, *layout.split(flat), head_group=first.group, neuron_group=first_ffn.group,
            head_dim=first.head_dim, hidden_features=first_ffn.hidden_features, min_heads=first.min_heads,
            min_dim_fraction=first.min_dim_fraction, min_neuron_fraction=first_ffn.min_neuron_fraction,
        )

    @property
    def flat_probabilities(self) -> torch.Tensor:
        """``sigmoid(flat)`` (``hiap_kernels.gates.keep_probability``): every keep probability in one op, shaped as
        ``flat`` (differentiable; computed once per StackedGates)."""
        if "probabilities" not in self._computed:
            self._computed["probabilities"] = keep_probability(self.flat)
        return self._computed["probabilities"]

    def keep_probabilities(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """P(open) of head, qk, v, block and neuron gates, shaped as the stacks (views; ``dtype``: one cast first)."""
        probabilities = self.flat_probabilities if dtype is None else self.flat_probabilities.to(dtype)
        return list(self.layout.split(probabilities))

    def decided_heads(self) -> torch.Tensor:
        """Heads that extraction keeps (a v dim left) in every layer, int64 ``[L]``."""
        with torch.no_grad():
            keep_head, _, keep_v = attention_decisions(
                self.head, self.qk, self.v, min_heads=self.min_heads, min_dim_fraction=self.min_dim_fraction
            )
            return (keep_v & keep_head[..., None]).any(dim=-1).sum(dim=-1)

    def decided_per_layer(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept q/k dims, v dims and FFN neurons of every layer, int64 ``[L]`` each (what extraction keeps)."""
        # A `with` block rather than the decorator: torch.compile traces it inside the objective's graph.
        with torch.no_grad():
            keep_head, keep_qk, keep_v = attention_decisions(
                self.head, self.qk, self.v, min_heads=self.min_heads, min_dim_fraction=self.min_dim_fraction
            )
            v_kept = keep_v & keep_head[..., None]
            # A head without v columns is gone, its q/k columns with it.
            qk_kept = keep_qk & v_kept.any(dim=-1, keepdim=True)
            keep_block, keep_neuron = ffn_decisions(self.block, self.neuron,
                                                    min_neuron_fraction=self.min_neuron_fraction)
            return (qk_kept.flatten(1).sum(1) * self.head_group, v_kept.flatten(1).sum(1) * self.head_group,
                    (keep_neuron & keep_block).sum(1) * self.neuron_group)

    def decided_macs(self, units: UnitCosts, static: int) -> torch.Tensor:
        """MACs of what extraction keeps (int64 scalar on the logits' device; no host synchronisation)."""
        qk_dims, v_dims, neurons = self.decided_per_layer()
        with torch.no_grad():
            return static + qk_dims.sum() * units.qk_dim + v_dims.sum() * units.v_dim + neurons.sum() * units.neuron


def count_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one image through a timm ViT, a gated model (hard decisions) or a pruned model.

    Dense DeiT-S at 224 px gives 4.60 G. A gated model counts what ``hiap.extract`` would keep, so
    ``count_macs(gated) == count_macs(hiap.extract(gated))``. A model patched with a token schedule
    (``hiap.tokens.reduce_tokens``) counts each block's attention at the tokens it receives and its FFN at the tokens
    it keeps, plus what the reduction step computes (class-token scores, similarities).
    """
    vit = inner_vit(model, "count_macs")
    tokens = token_count(model, img_size)
    schedule = getattr(vit, "hiap_token_schedule", None)
    if isinstance(model, HiAPViT):
        gates = StackedGates.of(model)
        if not all(bool(torch.isfinite(t).all()) for t in (gates.head, gates.qk, gates.v, gates.block, gates.neuron)):
            raise ValueError("count_macs: the gate logits contain NaN or inf (a diverged run); no decision exists")
        if schedule is None:
            return int(gates.decided_macs(UnitCosts.at(tokens, vit.embed_dim), static_macs(model, img_size)))
        kept = [[int(v) for v in per_layer.tolist()] for per_layer in gates.decided_per_layer()]
        layers = list(zip(*kept))
    else:
        layers = [(*_attention_kept_dims(block.attn), _ffn_kept_neurons(block.mlp)) for block in vit.blocks]
    prefix = vit.num_prefix_tokens
    counts = [(tokens, tokens)] * len(layers) if schedule is None else schedule.token_counts(tokens - prefix, prefix)
    steps = [None] * len(layers) if schedule is None else schedule.steps
    total = static_macs(model, img_size)
    for (qk_dims, v_dims, neurons), (n_in, n_out), step in zip(layers, counts, steps):
        attention, ffn = UnitCosts.at(n_in, vit.embed_dim), UnitCosts.at(n_out, vit.embed_dim)
        total += qk_dims * attention.qk_dim + v_dims * attention.v_dim + neurons * ffn.neuron
        if step is not None and step.removes:
            total += step_overhead_macs(step.kind, n_in - prefix, step.r, qk_dims, n_in,
                                        schedule.reads_class_attention(step), schedule.merge_pool)
    return int(total)


def dense_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """MACs of the dense network a gated model came from (every gate open)."""
    vit = inner_vit(model, "count_macs")
    units = UnitCosts.at(token_count(model, img_size), vit.embed_dim)
    total = static_macs(model, img_size)
    for block in vit.blocks:
        attn, mlp = block.attn, block.mlp
        width = attn.num_heads * attn.head_dim
        total += width * (units.qk_dim + units.v_dim) + mlp.fc1.out_features * units.neuron
    return int(total)


@dataclass
class ExpectedCost:
    """Differentiable expected MACs of a gated model, split the way the losses use them.

    total: static + expected gated MACs (joint keep probabilities); macro: each macro gate's keep probability times
    the dense cost of what it controls (heads, FFN blocks); dense: dense MACs (int).
    """

    total: torch.Tensor
    macro: torch.Tensor
    static: int
    dense: int
    gap_scale: float = 1.0  # how the controller scales the gap to the target (see lagrangian_budget)


def expected_cost(model: HiAPViT, img_size: int | tuple[int, int] | None = None,
                  gates: StackedGates | None = None) -> ExpectedCost:
    """Expected MACs under the gate distributions (Proposition 1: linear in the joint keep probabilities).

    P(v dim open) = P(g) P(dv); P(q/k dim counted) = P(g) P(dqk) P(head has a v dim open), which equals the hard count
    when every logit is far from zero. Vectorised over the layers (``gates``: stacked logits, built when None).
    """
    if not isinstance(model, HiAPViT):
        raise TypeError(f"expected_macs needs a gated model from hiap.gate_vit, got {type(model).__name__}")
    gates = StackedGates.of(model) if gates is None else gates
    units = UnitCosts.at(token_count(model, img_size), model.vit.embed_dim)
    static = static_macs(model, img_size)
    # float64: 4.6e9 MACs in float32 would be off by hundreds.
    gated, macro = expected_gate_macs(*gates.keep_probabilities(torch.float64), head_group=gates.head_group,
                                      neuron_group=gates.neuron_group, unit_qk=units.qk_dim, unit_v=units.v_dim,
                                      unit_neuron=units.neuron)
    total = gated + static
    return ExpectedCost(total=total, macro=macro, static=static, dense=dense_macs(model, img_size))


def expected_macs(model: HiAPViT, img_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Differentiable expected MACs (float tensor, scalar) of a gated model; see ``expected_cost``."""
    return expected_cost(model, img_size).total


class MacBudget:
    """The MAC model as a target-mode budget reads it (``hiap.Pruner``'s default; ``hiap.method.latency.LatencyBudget``
    is the measured alternative): the cost of a layer from its kept counts, the expected and decided totals, the dense
    total the target is a fraction of."""

    unit = "MACs"
    gap_scale = 1.0

    def __init__(self, model: HiAPViT):
        self.units = UnitCosts.at(token_count(model), model.vit.embed_dim)
        self.static = static_macs(model)
        self.dense = dense_macs(model)

    def attention(self, heads: int, qk_dims: int, v_dims: int) -> float:
        """Cost of an attention layer keeping ``heads`` heads with ``qk_dims`` q/k and ``v_dims`` v dims in all."""
        return qk_dims * self.units.qk_dim + v_dims * self.units.v_dim

    def ffn(self, width: int) -> float:
        """Cost of an FFN block of ``width`` neurons."""
        return width * self.units.neuron

    def expected(self, model: HiAPViT, gates: StackedGates) -> ExpectedCost:
        """The differentiable expectation (``expected_cost``)."""
        return expected_cost(model, gates=gates)

    def decided(self, model: HiAPViT, gates: StackedGates) -> torch.Tensor:
        """What extraction keeps, on the logits' device (no host synchronisation)."""
        return gates.decided_macs(self.units, self.static)

    def fraction(self, model: HiAPViT) -> float:
        """The decided total as a fraction of the dense one (one device read)."""
        return count_macs(model) / self.dense
