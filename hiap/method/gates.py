"""The one home of the gates: per-layer gate objects, the model's gate schedule, the draw record, the decision.

* :class:`GateSchedule` holds what every gate of a model reads at forward time: the temperature, the step seed and the
  hard/soft choice. A gated model owns one; :meth:`HiAPViT.set_temperature` and its forward are the only writers.
* :class:`AttentionGates` and :class:`FfnGates` own one layer's logits (``nn.Parameter``), its deterministic decision,
  its keep probabilities and its counter window in the Philox stream. Each forward asks them for one :class:`GateDraw`,
  the record that the reference path and the Triton kernels both consume: the same record gives the same gates.
* The gate distribution itself (Philox noise, Gumbel-Sigmoid with the straight-through estimator, the keep
  probability, the values and masks of a layer) lives in ``hiap_kernels.gates`` so the kernels and the reference share
  it bit for bit; this module decides which stream a layer uses and what is kept.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn as nn

from hiap_kernels.gated_weight.reference import qkv_row_scale
from hiap_kernels.gates import MAX_SEED, ffn_neuron_mask, gate_values, keep_probability

__all__ = [
    "FFN_ALIGNMENT",
    "HEAD_ALIGNMENT",
    "CLOSED_LOGIT",
    "OPEN_LOGIT",
    "AttentionGates",
    "FfnGates",
    "GateDraw",
    "GateSchedule",
    "LayerGates",
    "aligned_group",
    "attention_decisions",
    "ffn_decisions",
    "gate_offset",
    "minimum_count",
    "resolve_groups",
    "retirement_logit",
    "step_seed",
    "temperature_at",
    "top_k_mask",
]

# Each gated module owns a window of this many Philox counters; one layer has far fewer gates than this.
GATES_PER_MODULE = 2**20
# Logits that fix a gate open or closed for good (sigmoid(8) = 0.9997), used by baselines and tests.
OPEN_LOGIT, CLOSED_LOGIT = 8.0, -8.0


# Hardware alignment of the extracted widths (``dim_group=0``). Measured on an H100 in bf16 (DeiT-S extracted at about
# 2/3 of the MACs, batch 256): odd per-head widths send cuBLAS to slow kernels and the pruned model runs at 0.65x dense;
# the same layout with q/k and v widths rounded to 16 and FFN widths to 64 runs at 0.98x eager / 1.20x compiled, to
# 32 and 128 at 1.02x / 1.26x; on a 2-core CPU (fp32, equal MACs at 2/3) 128-wide FFN groups are within noise of 64.
# Heads stay at 16: 32 would leave a 64-wide head two gates and no kept width below half. So: q/k, v in 16s (four
# gates per 64-wide head), FFN in 128s (twelve gates for DeiT-S's 1536); a small model gets smaller groups so every
# head keeps at least MIN_GROUPS_PER_HEAD gates and every FFN at least MIN_GROUPS_PER_FFN.
HEAD_ALIGNMENT, FFN_ALIGNMENT = 16, 128
MIN_GROUPS_PER_HEAD, MIN_GROUPS_PER_FFN = 4, 12


def aligned_group(width: int, alignment: int, min_groups: int) -> int:
    """The largest power of two up to ``alignment`` that divides ``width`` into at least ``min_groups`` groups."""
    group = alignment
    while group > 1 and (width % group or width // group < min_groups):
        group //= 2
    return group


def resolve_groups(dim_group: int, neuron_group: int, head_dim: int, ffn_width: int) -> tuple[int, int]:
    """``(head-dim group, neuron group)`` for ``HiAPConfig.dim_group`` / ``neuron_group`` (0 = hardware-aligned)."""
    head = dim_group or aligned_group(head_dim, HEAD_ALIGNMENT, MIN_GROUPS_PER_HEAD)
    neuron = neuron_group or dim_group or aligned_group(ffn_width, FFN_ALIGNMENT, MIN_GROUPS_PER_FFN)
    return head, neuron


def retirement_logit(below: float) -> float:
    """The logit under which a gate's keep probability ``sigmoid(a)`` is below ``below`` (in (0, 1/2])."""
    if not 0.0 < below <= 0.5:
        raise ValueError(f"retire_below must lie in (0, 0.5], got {below!r}")
    return math.log(below) - math.log1p(-below)


def gate_offset(layer_index: int, kind: str) -> int:
    """First Philox counter of a module's gates: attention of layer l at 2l * 2^20, its FFN at (2l + 1) * 2^20."""
    slot = 2 * layer_index + (0 if kind == "attention" else 1)
    offset = slot * GATES_PER_MODULE
    if offset + GATES_PER_MODULE > MAX_SEED:
        raise ValueError(f"layer index {layer_index} is too large for the gate counter space")
    return offset


def step_seed(base_seed: int, step: int) -> int:
    """Seed of training step ``step``: a splitmix64 hash of (base seed, step), reduced to [0, 2^31 - 1).

    Deterministic, so a resumed run and every DDP rank draw the same gates for the same step.
    """
    z = (base_seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z % MAX_SEED


def temperature_at(step: int, total_steps: int, tau0: float = 2.0, tau_min: float = 0.5) -> float:
    """``tau(t) = max(tau_min, tau0 * (tau_min / tau0) ** (t / T))``: exponential anneal from tau0 to tau_min."""
    for name, value in (("step", step), ("total_steps", total_steps), ("tau0", tau0), ("tau_min", tau_min)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"temperature_at: {name} must be a number, got {type(value).__name__}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return max(tau_min, tau0 * (tau_min / tau0) ** progress)


def top_k_mask(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries along the last dim (ties broken by index; ``k`` may be 0).

    ``k`` is an int or a tensor broadcastable to ``logits.shape[:-1]``. Each entry's rank is the inverse of the stable
    descending order (the argsort of a permutation inverts it): three ops, as the training objective runs it every step.
    """
    rank = torch.argsort(torch.argsort(logits, dim=-1, descending=True, stable=True), dim=-1)
    if isinstance(k, torch.Tensor):
        return rank < (k.to(logits.device)[..., None] if k.dim() > 0 else k.to(logits.device))
    return rank < k


def minimum_count(fraction: float, total: int) -> int:
    """``ceil(fraction * total)``, guarded against float noise (0.125 * 64 must give 8, not 9)."""
    return min(total, math.ceil(fraction * total - 1e-9))


@torch.no_grad()
def attention_decisions(head: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, *, min_heads: int,
                        min_dim_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one deterministic keep decision of attention (eval mode, MAC counts and extraction all use it).

    ``z = 1[a > 0]``, then the hard feasibility minimums: the ``min_heads`` highest head logits are kept, and in
    every head the top ``ceil(min_dim_fraction * groups)`` q/k groups and v groups. Branch-free: where enough gates
    are open the top-k are among them already. Any leading dims (one layer, or every layer stacked).

    Args:
        head: ``[..., H]``; qk, v: ``[..., H, G]`` logits.

    Returns:
        bool keep_head ``[..., H]``, keep_qk ``[..., H, G]``, keep_v ``[..., H, G]``.
    """
    num_heads, groups = qk.shape[-2:]
    keep_head = (head > 0) | top_k_mask(head, min(min_heads, num_heads))
    dims_min = minimum_count(min_dim_fraction, groups)
    return keep_head, (qk > 0) | top_k_mask(qk, dims_min), (v > 0) | top_k_mask(v, dims_min)


@torch.no_grad()
def ffn_decisions(block: torch.Tensor, neuron: torch.Tensor, *, min_neuron_fraction: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The one deterministic keep decision of an FFN: block ``[..., 1]`` and neuron groups ``[..., F / G]`` (bool).

    A kept block keeps at least ``ceil(min_neuron_fraction * groups)`` neuron groups; blocks themselves have no
    minimum (a whole FFN may go).
    """
    minimum = minimum_count(min_neuron_fraction, neuron.shape[-1])
    return block > 0, (neuron > 0) | top_k_mask(neuron, minimum)


class GateSchedule(nn.Module):
    """Temperature, step seed and hard/soft choice shared by every gate of one model (its owner writes them).

    ``tau`` (float32) and ``seed`` (int64) are 0-dim buffers on the model's device that the samplers read there: a new
    temperature or seed each step is a new value, so nothing waits for the host and a compiled model compiles once.
    They derive from the step (``temperature_at``, ``step_seed``), so they are not saved in the state_dict.
    """

    def __init__(self, tau: float = 2.0, seed: int = 0, hard: bool = True):
        super().__init__()
        self.hard = hard
        # True once training has fixed the structure: training-mode forwards then apply the decision (no sampling,
        # no gradient to the logits), i.e. they train the network extraction will keep.
        self.decided = False
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float32), persistent=False)
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64), persistent=False)
        self.set_temperature(tau)
        self.set_seed(seed)

    def set_temperature(self, tau: float) -> None:
        """Checked on the host (a Python number), written on the device without a round trip."""
        tau = float(tau)
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"temperature must be a finite number > 0, got {tau}")
        self.tau.fill_(tau)
        self._host_tau = tau

    def set_seed(self, seed: int) -> None:
        if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {seed!r}")
        self.seed.fill_(seed)

    @property
    def temperature(self) -> float:
        """The last temperature set, as a Python float (no device read)."""
        return self._host_tau

    def extra_repr(self) -> str:
        return f"tau={self._host_tau:.4g}, hard={self.hard}" + (", decided" if self.decided else "")


class GateDraw(NamedTuple):
    """How one layer's gates are drawn for one forward: what the reference and the Triton op both receive.

    ``logits`` are the layer's live logits when sampling (training), or +-1 stand-ins for the decision in eval mode
    (``sample`` False: both paths then open exactly the gates with a > 0).
    """

    logits: tuple[torch.Tensor, ...]
    tau: torch.Tensor
    seed: torch.Tensor
    offset: int
    hard: bool
    sample: bool

    def options(self) -> dict:
        """The keyword arguments of the gated ops: ``tau, seed, offset, hard, sample``."""
        return {"tau": self.tau, "seed": self.seed, "offset": self.offset, "hard": self.hard, "sample": self.sample}


def _as_logits(keep: torch.Tensor | bool, like: torch.Tensor) -> torch.Tensor:
    keep = torch.as_tensor(keep, device=like.device).expand_as(like)
    return torch.where(keep, torch.full_like(like, OPEN_LOGIT), torch.full_like(like, CLOSED_LOGIT))


class LayerGates(nn.Module):
    """One layer's gates. Subclasses register their logits in ``KINDS`` order (the order of their Philox counters)."""

    KINDS: tuple[str, ...] = ()
    MACRO: tuple[str, ...] = ()

    def __init__(self, offset: int, schedule: GateSchedule | None):
        super().__init__()
        self.offset = offset
        if schedule is None:  # a layer on its own owns its schedule (so it moves with the layer)
            self.own_schedule = schedule = GateSchedule()
        # Shared with the other layers and owned by the model: referenced, not registered, so it is neither moved
        # nor saved twice.
        self.__dict__["schedule"] = schedule

    def logits(self) -> dict[str, nn.Parameter]:
        """The logits by kind, in counter order."""
        return {kind: getattr(self, kind) for kind in self.KINDS}

    def micro_logits(self) -> list[nn.Parameter]:
        """The micro-gate logits (head dims, neurons): the ones budget settling may move."""
        return [getattr(self, kind) for kind in self.KINDS if kind not in self.MACRO]

    @torch.no_grad()
    def assign(self, **keep: torch.Tensor | bool) -> None:
        """Fix gates open or closed: ``assign(head=True, qk=mask)`` sets OPEN_LOGIT where True, CLOSED_LOGIT elsewhere."""
        unknown = sorted(set(keep) - set(self.KINDS))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no gates {unknown}; kinds: {self.KINDS}")
        for kind, value in keep.items():
            logit = getattr(self, kind)
            logit.copy_(_as_logits(value, logit))

    def decisions(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def keep_probabilities(self) -> tuple[torch.Tensor, ...]:
        """P(open) = sigmoid(a) of each kind, in ``KINDS`` order, shaped as the logits (differentiable)."""
        return tuple(keep_probability(getattr(self, kind)) for kind in self.KINDS)

    def values(self, draw: GateDraw) -> tuple[torch.Tensor, ...]:
        """Gate values ``z`` of each kind for ``draw``, shaped as its logits, with straight-through gradients to the
        logits when sampling (``hiap_kernels.gates.gate_values``: the PyTorch sampler, or the decision ``1[a > 0]``).

        The kinds are sampled as one flat vector, so gate ``i`` of the layer uses Philox counter ``offset + i``
        exactly as the fused kernels do: the values equal the gates the Triton ops draw from the same record.
        """
        flat = torch.cat([logit.reshape(-1) for logit in draw.logits])
        z = gate_values(flat, tau=draw.tau, seed=draw.seed, offset=draw.offset, hard=draw.hard, sample=draw.sample)
        shapes = [logit.shape for logit in draw.logits]
        return tuple(part.view(shape) for part, shape in zip(z.split([s.numel() for s in shapes]), shapes))

    def draw(self) -> GateDraw:
        """The draw of this forward: sampled from the logits in training mode, the decision in eval mode or once the
        structure is fixed (``schedule.decided``)."""
        schedule = self.schedule
        if self.training and not schedule.decided:
            logits, sample = tuple(self.logits().values()), True
        else:
            anchor = getattr(self, self.KINDS[0])
            logits = tuple(keep.to(anchor.dtype) * 2 - 1 for keep in self.decisions())
            sample = False
        return GateDraw(logits, schedule.tau, schedule.seed, self.offset, schedule.hard, sample)


class AttentionGates(LayerGates):
    """Head gates ``head [H]``, q/k-dim gates ``qk [H, Dh/G]`` and v-dim gates ``v [H, Dh/G]`` of one attention layer.

    Effective column masks: ``m_q = qk``, ``m_v = head * v`` (each micro gate covering ``G = group`` columns).
    """

    KINDS = ("head", "qk", "v")
    MACRO = ("head",)

    def __init__(self, num_heads: int, head_dim: int, *, group: int, init_logit: float, offset: int,
                 min_heads: int, min_dim_fraction: float, schedule: GateSchedule | None = None,
                 device: torch.device | None = None):
        super().__init__(offset, schedule)
        if head_dim % group:
            raise ValueError(f"dim_group={group} does not divide the head dim {head_dim}")
        self.num_heads, self.head_dim, self.group = num_heads, head_dim, group
        self.min_heads, self.min_dim_fraction = min_heads, min_dim_fraction
        groups = head_dim // group
        self.head = nn.Parameter(torch.full((num_heads,), float(init_logit), device=device))
        self.qk = nn.Parameter(torch.full((num_heads, groups), float(init_logit), device=device))
        self.v = nn.Parameter(torch.full((num_heads, groups), float(init_logit), device=device))

    def decisions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This layer's keep decision (``attention_decisions``): bool ``[H]``, ``[H, G]``, ``[H, G]``."""
        return attention_decisions(self.head, self.qk, self.v, min_heads=self.min_heads,
                                   min_dim_fraction=self.min_dim_fraction)

    @torch.no_grad()
    def kept_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What extraction keeps, per head column: bool ``m_q [H, Dh]`` and ``m_v [H, Dh]``.

        A head whose v columns are all closed is gone, and its q/k columns with it.
        """
        keep_head, keep_qk, keep_v = self.decisions()
        m_v = (keep_v & keep_head[:, None]).repeat_interleave(self.group, dim=1)
        alive = m_v.any(dim=1)
        m_q = keep_qk.repeat_interleave(self.group, dim=1) & alive[:, None]
        return m_q, m_v

    @torch.no_grad()
    def retirable(self, below: float) -> torch.Tensor:
        """Heads closed for good: bool ``[H]``, where the head gate, or every v group, opens with probability under
        ``below`` and the decision removes the head (so the eval model, the MAC count and extraction never see a
        retired head, whatever the minimums keep)."""
        keep_head, _, keep_v = self.decisions()
        limit = retirement_logit(below)
        closed = (self.head < limit) | (self.v < limit).all(dim=1)
        return closed & ~(keep_head & keep_v.any(dim=1))

    def qkv_row_scale(self, values: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Per row of timm's fused qkv weight ``[3 * H * Dh]``: ``m_q = dqk`` on q rows, 1 on k rows, ``m_v = g * dv``
        on v rows. Scaling the weight rows (and bias) by it equals masking the projection's output columns."""
        return qkv_row_scale(*values, self.head_dim)

    def kept_widths(self) -> tuple[list[int], list[int]]:
        """Per original head, the kept q/k width and v width (0 and 0 for a removed head)."""
        m_q, m_v = self.kept_columns()
        return m_q.sum(dim=1).tolist(), m_v.sum(dim=1).tolist()

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, group={self.group}, offset={self.offset}"


class FfnGates(LayerGates):
    """FFN block gate ``block [1]`` and neuron gates ``neuron [F/G]`` of one layer; mask ``block * neuron``."""

    KINDS = ("block", "neuron")
    MACRO = ("block",)

    def __init__(self, hidden_features: int, *, group: int, init_logit: float, offset: int,
                 min_neuron_fraction: float, schedule: GateSchedule | None = None,
                 device: torch.device | None = None):
        super().__init__(offset, schedule)
        if hidden_features % group:
            raise ValueError(f"neuron group {group} (dim_group / neuron_group) does not divide the FFN width {hidden_features}")
        self.hidden_features, self.group = hidden_features, group
        self.min_neuron_fraction = min_neuron_fraction
        self.block = nn.Parameter(torch.full((1,), float(init_logit), device=device))
        self.neuron = nn.Parameter(torch.full((hidden_features // group,), float(init_logit), device=device))

    def decisions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keep decision (``ffn_decisions``): bool block ``[1]`` and neuron groups ``[F / G]``."""
        return ffn_decisions(self.block, self.neuron, min_neuron_fraction=self.min_neuron_fraction)

    def neuron_scale(self, values: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Per hidden neuron ``[F]``: ``m = b * c``. Scaling fc2's input columns by it equals masking the neurons."""
        return ffn_neuron_mask(*values, self.hidden_features)

    @torch.no_grad()
    def kept_neurons(self) -> torch.Tensor:
        """What extraction keeps: bool ``[F]`` over the hidden neurons."""
        keep_block, keep_neuron = self.decisions()
        return keep_neuron.repeat_interleave(self.group) & keep_block

    @torch.no_grad()
    def retirable(self, below: float) -> torch.Tensor:
        """Neuron groups closed for good: bool ``[F / G]``, where the block gate or the group's gate opens with
        probability under ``below`` and the decision removes the group."""
        keep_block, keep_neuron = self.decisions()
        limit = retirement_logit(below)
        closed = (self.block < limit) | (self.neuron < limit)
        return closed & ~(keep_neuron & keep_block)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_features}, group={self.group}, offset={self.offset}"
