"""Latency as HiAP's cost: a table of measured times of a ViT's parts on one device, and the latency of a gated
model read from it, decided (what extraction keeps) and expected (differentiable, for the search).

The table (``hiap.method.profile.profile_latency`` measures it) holds, fitted, one attention layer's time for every
number of heads and pair of q/k and v head widths on the layout's alignment steps, one FFN's for every width on its
steps, and the fixed parts' (patch embedding, norms, residual adds, head). A pruned layer is predicted from its number
of heads and its mean q/k and v widths (trilinear interpolation in the table) and its FFN width (linear
interpolation); a model is the fixed parts plus its layers. The paper's Proposition 1 (cost linear in the keep
probabilities) does not hold for time, so the search's expected latency is the same interpolation at the expected
widths: expected heads, expected q/k and v dims per expected head, expected FFN width, per layer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from hiap.method.architecture import describe_vit
from hiap.method.pruned import PrunedAttention, PrunedMlp

if TYPE_CHECKING:
    from hiap.method.cost import ExpectedCost

__all__ = ["TABLE_FORMAT", "LatencyBudget", "LatencyTable"]

TABLE_FORMAT = "hiap-latency-table"
TABLE_VERSION = 1


def _axis_interpolation(axis: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower grid index and fraction toward the next point of each ``x`` on the sorted ``axis`` (clamped to its
    ends: no extrapolation)."""
    upper = torch.searchsorted(axis, x.detach().contiguous(), right=True).clamp(1, axis.numel() - 1)
    lower = upper - 1
    fraction = ((x - axis[lower]) / (axis[upper] - axis[lower])).clamp(0.0, 1.0)
    return lower, fraction


@dataclass
class LatencyTable:
    """Measured times (ms) of a ViT's parts on one device; see the module docstring. JSON-serialisable."""

    model: str
    architecture: dict
    device: str
    device_name: str
    dtype: str
    batch: int
    threads: int
    compiled: bool
    torch_version: str
    tokens: int
    embed_dim: int
    num_heads: int
    head_dim: int
    ffn_width: int
    depth: int
    heads: list[int]
    qk_widths: list[int]
    v_widths: list[int]
    attention_ms: list[list[list[float]]]  # [heads][q/k width][v width]; the row of 0 heads is all zeros
    ffn_widths: list[int]
    ffn_ms: list[float]
    fixed_ms: float
    dense_ms: float
    rounds: int
    seconds: float = 0.0
    spread: dict = field(default_factory=dict)

    # --------------------------------------------------------------------------------------------------------------
    # Reading the table
    # --------------------------------------------------------------------------------------------------------------

    def _grids(self, device: torch.device | None = None):
        cached = getattr(self, "_cached_grids", None)
        if cached is None or cached[0] != device:
            f64 = dict(dtype=torch.float64, device=device)
            cached = (device, torch.tensor(self.heads, **f64), torch.tensor(self.qk_widths, **f64),
                      torch.tensor(self.v_widths, **f64), torch.tensor(self.attention_ms, **f64),
                      torch.tensor(self.ffn_widths, **f64), torch.tensor(self.ffn_ms, **f64))
            object.__setattr__(self, "_cached_grids", cached)
        return cached[1:]

    def attention(self, heads: torch.Tensor, qk_width: torch.Tensor, v_width: torch.Tensor) -> torch.Tensor:
        """ms of attention layers with ``heads`` heads (may be fractional: expected) of mean q/k width ``qk_width``
        and mean v width ``v_width``, elementwise over any shape; differentiable in all three (fp64)."""
        hs, qs, vs, table, _, _ = self._grids(heads.device)
        heads, qk_width, v_width = (t.to(torch.float64) for t in (heads, qk_width, v_width))
        (h0, th), (q0, tq), (v0, tv) = (_axis_interpolation(hs, heads), _axis_interpolation(qs, qk_width),
                                         _axis_interpolation(vs, v_width))
        total = torch.zeros_like(th)
        for dh, wh in ((0, 1 - th), (1, th)):
            for dq, wq in ((0, 1 - tq), (1, tq)):
                for dv, wv in ((0, 1 - tv), (1, tv)):
                    total = total + wh * wq * wv * table[h0 + dh, q0 + dq, v0 + dv]
        return total

    def ffn(self, width: torch.Tensor) -> torch.Tensor:
        """ms of FFN blocks of (expected) ``width`` neurons, elementwise; differentiable (fp64)."""
        _, _, _, _, widths, times = self._grids(width.device)
        lower, fraction = _axis_interpolation(widths, width.to(torch.float64))
        return times[lower] * (1 - fraction) + times[lower + 1] * fraction

    def layer_ms(self, heads: int, qk_dims: int, v_dims: int, ffn_width: int) -> float:
        """ms of one pruned block's attention (``heads`` kept, ``qk_dims`` and ``v_dims`` over them) and FFN."""
        count = torch.tensor(float(heads), dtype=torch.float64)
        mean = max(heads, 1)
        attention = self.attention(count, torch.tensor(qk_dims / mean, dtype=torch.float64),
                                   torch.tensor(v_dims / mean, dtype=torch.float64))
        return float(attention) + float(self.ffn(torch.tensor(float(ffn_width), dtype=torch.float64)))

    @property
    def dense_predicted_ms(self) -> float:
        """The dense model as the table predicts it: the fixed parts and ``depth`` full blocks."""
        return self.fixed_ms + self.depth * self.layer_ms(self.num_heads, self.num_heads * self.head_dim,
                                                          self.num_heads * self.head_dim, self.ffn_width)

    def uniform_width(self, latency_fraction: float) -> float:
        """The fraction of every width (heads all kept, q/k, v and FFN widths cut alike) whose layout the table
        predicts at ``latency_fraction`` of the dense model (bisection; 0 where even no width costs more)."""
        def fraction(keep: float) -> float:
            dims = keep * self.num_heads * self.head_dim
            layer = self.layer_ms(self.num_heads, round(dims), round(dims), round(keep * self.ffn_width))
            return (self.fixed_ms + self.depth * layer) / self.dense_predicted_ms

        low, high = 0.0, 1.0
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if fraction(middle) < latency_fraction else (low, middle)
        return (low + high) / 2

    def floor_ms(self, min_heads: int, min_dims: int) -> float:
        """The least a model the decision allows can cost: ``min_heads`` heads of ``min_dims`` q/k and v dims per
        layer and no FFN."""
        heads = min(min_heads, self.num_heads)
        return self.fixed_ms + self.depth * self.layer_ms(heads, heads * min_dims, heads * min_dims, 0)

    def predict(self, model: nn.Module) -> float:
        """ms of a pruned model (``hiap.extract``), or of the dense timm model it came from, as the table predicts."""
        vit = getattr(model, "vit", model)
        total = self.fixed_ms
        for block in vit.blocks:
            attn, mlp = block.attn, block.mlp
            if isinstance(attn, PrunedAttention):
                heads, qk, v = attn.num_heads, sum(attn.qk_widths), sum(attn.v_widths)
            else:
                heads, qk, v = attn.num_heads, attn.num_heads * attn.head_dim, attn.num_heads * attn.head_dim
            width = mlp.hidden_features if isinstance(mlp, PrunedMlp) else mlp.fc1.out_features
            total += self.layer_ms(heads, qk, v, width)
        return total

    def check_model(self, vit: nn.Module) -> None:
        """ValueError when ``vit`` is not the architecture the table was measured on (widths, depth, tokens)."""
        from hiap.method.cost import token_count

        found = describe_vit(vit)
        expected = self.architecture
        keys = ("embed_dim", "depth", "num_heads", "head_dim", "mlp_ratio", "img_size", "patch_size", "in_chans",
                "class_token", "reg_tokens")
        for key in keys:
            if key in expected and found.get(key) != expected.get(key):
                raise ValueError(f"the latency table was measured on a model with {key}={expected.get(key)}, this one "
                                 f"has {found.get(key)}; profile this model (hiap profile)")
        if token_count(vit) != self.tokens:
            raise ValueError(f"the latency table was measured at {self.tokens} tokens, this model has "
                             f"{token_count(vit)}; profile this model (hiap profile)")

    # --------------------------------------------------------------------------------------------------------------
    # File
    # --------------------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (atomically)."""
        from hiap.files import atomic_path

        path = Path(path)
        record = {"format": TABLE_FORMAT, "version": TABLE_VERSION, **asdict(self)}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps(record, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        """Read a table written by ``save``; ValueError (one line) when it is missing, not a table or malformed."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"latency table {path} does not exist (write one with hiap profile)")
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"latency table {path} is not readable JSON ({type(error).__name__})") from None
        if not isinstance(record, dict) or record.get("format") != TABLE_FORMAT:
            raise ValueError(f"{path} is not a latency table written by hiap profile")
        if record.get("version") != TABLE_VERSION:
            raise ValueError(f"latency table {path} has version {record.get('version')}, expected {TABLE_VERSION}")
        fields = {name for name in cls.__dataclass_fields__}
        try:
            table = cls(**{k: v for k, v in record.items() if k in fields})
            table._validate()
        except (TypeError, ValueError) as error:
            raise ValueError(f"latency table {path} is malformed: {error}") from None
        return table

    def _validate(self) -> None:
        shape = (len(self.heads), len(self.qk_widths), len(self.v_widths))
        grid = torch.tensor(self.attention_ms, dtype=torch.float64)
        if tuple(grid.shape) != shape:
            raise ValueError(f"attention_ms has shape {tuple(grid.shape)}, the axes give {shape}")
        if len(self.ffn_ms) != len(self.ffn_widths):
            raise ValueError("ffn_ms and ffn_widths differ in length")
        for name in ("heads", "qk_widths", "v_widths", "ffn_widths"):
            axis = getattr(self, name)
            if len(axis) < 2 or any(b <= a for a, b in zip(axis, axis[1:])):
                raise ValueError(f"{name} must be increasing with at least two points")
        values = [*grid.flatten().tolist(), *self.ffn_ms, self.fixed_ms, self.dense_ms]
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError("times must be finite and >= 0")


class LatencyBudget:
    """A measured latency table as a target-mode budget reads it (the interface of ``hiap.method.cost.MacBudget``):
    milliseconds instead of MACs. The expected latency interpolates the table at each layer's expected widths, the
    decided one at the kept widths; the target is a fraction of the dense model as the table predicts it."""

    unit = "ms"

    def __init__(self, table: LatencyTable, model: nn.Module | None = None):
        if model is not None:
            table.check_model(getattr(model, "vit", model))
        self.table = table
        self.static = table.fixed_ms
        self.dense = table.dense_predicted_ms
        self.gap_scale = 1.0

    def aim_at(self, target: float) -> None:
        """Scale the controller's gap for a search to ``target`` (a fraction of the dense latency).

        The controller's steps are sized for MAC fractions. Where fixed parts and per-head costs keep the latency up,
        it falls slower than the widths (on a small model on a CPU, 0.4 of the latency for 0.78 of the widths), and a
        gap measured in latency would leave the search lagging its falling target until the landing had to cut the
        rest at once. So the gap is scaled by ``(1 - k) / (1 - target)``, ``k`` the uniform cut of every width the
        table predicts at the target: a step of latency counts as the step of width it takes (between 1/4 and 4).
        """
        if target >= 1:
            self.gap_scale = 1.0
            return
        self.gap_scale = min(4.0, max(0.25, (1 - self.table.uniform_width(target)) / (1 - target)))

    def attention(self, heads: int, qk_dims: int, v_dims: int) -> float:
        mean = max(heads, 1)
        count = torch.tensor(float(heads), dtype=torch.float64)
        return float(self.table.attention(count, torch.tensor(qk_dims / mean, dtype=torch.float64),
                                          torch.tensor(v_dims / mean, dtype=torch.float64)))

    def ffn(self, width: int) -> float:
        return float(self.table.ffn(torch.tensor(float(width), dtype=torch.float64)))

    def _total(self, heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        mean = heads.clamp(min=1e-6)
        return (self.static + self.table.attention(heads, qk / mean, v / mean).sum()
                + self.table.ffn(width).sum())

    def expected(self, model: nn.Module, gates) -> "ExpectedCost":
        """Expected latency (fp64, differentiable): per layer the table at the expected number of live heads, the
        expected q/k and v dims per expected head and the expected FFN width."""
        from hiap.method.cost import ExpectedCost

        p_head, p_qk, p_v, p_block, p_neuron = gates.keep_probabilities(torch.float64)
        alive = p_head * (1.0 - torch.prod(1.0 - p_v, dim=-1))  # [L, H]
        heads = alive.sum(dim=-1)
        qk = (alive * p_qk.sum(dim=-1)).sum(dim=-1) * gates.head_group
        v = (p_head * p_v.sum(dim=-1)).sum(dim=-1) * gates.head_group
        width = p_block[:, 0] * p_neuron.sum(dim=-1) * gates.neuron_group
        total = self._total(heads, qk, v, width)
        return ExpectedCost(total=total, macro=total * 0, static=self.static, dense=self.dense,
                            gap_scale=self.gap_scale)

    def decided(self, model: nn.Module, gates) -> torch.Tensor:
        """The latency of what extraction keeps, as the table predicts it (fp64, on the logits' device)."""
        with torch.no_grad():
            qk, v, width = gates.decided_per_layer()
            return self._total(gates.decided_heads().double(), qk.double(), v.double(), width.double())

    def fraction(self, model: nn.Module) -> float:
        from hiap.method.cost import StackedGates

        return float(self.decided(model, StackedGates.of(model))) / self.dense
