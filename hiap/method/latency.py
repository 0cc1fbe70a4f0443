"""Latency as HiAP's cost: a table of measured times of a ViT's parts on one device, and the latency of a gated
model read from it, decided (what extraction keeps) and expected (differentiable, for the search).

``profile_latency`` times, on the device it is given, one attention layer for every number of heads and every pair of
q/k and v head widths on the layout's alignment steps (the heads of a timed layer all equal), one FFN for every
width on its steps, the model with nothing left in its blocks (patch embedding, norms, residual adds, head: the
fixed parts) and the dense model. The medians are smoothed before they are stored (per head count a plane in the
q/k and v widths, the FFN a line in its width, least squares with slopes of at least 0, then a running maximum): a
noisy table dips and has plateaus that the search would take for free width. A pruned layer is then predicted from its number of heads and its mean q/k and v
widths (trilinear interpolation in the table) and its FFN width (linear interpolation); a model is the fixed parts
plus its layers. The paper's Proposition 1 (cost linear in the keep probabilities) does not hold for time, so the
search's expected latency is the same interpolation at the expected widths: expected heads, expected q/k and v dims
per expected head, expected FFN width, per layer.

On a CPU the timings are wall-clock medians over interleaved rounds (every part once per round, in a rotating order,
so a drifting machine affects all alike); on CUDA each part is timed with CUDA events.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from tqdm import tqdm

from hiap.method.architecture import describe_vit
from hiap.method.gates import resolve_groups
from hiap.method.pruned import PrunedAttention, PrunedMlp

if TYPE_CHECKING:
    from hiap.method.cost import ExpectedCost

__all__ = ["TABLE_FORMAT", "LatencyBudget", "LatencyTable", "device_name", "profile_latency"]

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
        it falls slower than the widths (on a small model on a CPU, 0.36 of the latency for 0.8 of the widths), and a
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


# ----------------------------------------------------------------------------------------------------------------------
# Profiling
# ----------------------------------------------------------------------------------------------------------------------

def _empty_blocks(vit: nn.Module) -> nn.Module:
    """A copy of ``vit`` whose blocks keep nothing: attention and FFN reduced to their output biases."""
    empty = copy.deepcopy(vit)
    for block in empty.blocks:
        attn, mlp = block.attn, block.mlp
        embed = attn.qkv.in_features
        block.attn = PrunedAttention(embed, attn.proj.out_features, [], [], attn.scale,
                                     qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None)
        block.mlp = PrunedMlp(embed, 0, mlp.fc2.out_features, copy.deepcopy(mlp.act), fc1_bias=mlp.fc1.bias is not None,
                              fc2_bias=mlp.fc2.bias is not None)
    return empty


class _Timer:
    """Times one call: CUDA events on a GPU, the wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, run) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        run()
        return (time.perf_counter() - begin) * 1e3


@torch.inference_mode()
def _nonnegative_least_squares(features: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Least-squares ``times ~ intercept + features @ slopes`` with every slope at least 0 (a negative one is noise:
    it is dropped and the rest fitted again); the fitted times."""
    keep = list(range(features.shape[1]))
    while True:
        design = torch.cat([torch.ones_like(times)[:, None], features[:, keep]], dim=1)
        coefficients = torch.linalg.lstsq(design, times[:, None]).solution[:, 0]
        negative = [k for k, c in zip(keep, coefficients[1:].tolist()) if c < 0]
        if not negative:
            return design @ coefficients
        keep = [k for k in keep if k not in negative]


def _fitted_attention(grid: torch.Tensor, qk_widths: list[int], v_widths: list[int]) -> torch.Tensor:
    """The measured attention times ``[heads + 1, q/k widths, v widths]`` smoothed: per head count a plane in the q/k
    and v widths (the q/k width 0 row, uniform attention, a line in v), then a running maximum along every axis.

    Time grows about linearly with the widths of the GEMMs and of SDPA, while a single median is noisy; a table read
    as measured has dips and plateaus that the search takes for free width (and steers into), a fitted one does not.
    """
    fitted = grid.clone()
    qk = torch.tensor(qk_widths, dtype=torch.float64)
    v = torch.tensor(v_widths, dtype=torch.float64)
    q_grid, v_grid = torch.meshgrid(qk[1:], v, indexing="ij")
    plane = torch.stack([q_grid.flatten(), v_grid.flatten()], dim=1)
    for count in range(1, grid.shape[0]):
        fitted[count, 1:] = _nonnegative_least_squares(plane, grid[count, 1:].flatten()).reshape(q_grid.shape)
        if len(v_widths) > 1:
            fitted[count, 0] = _nonnegative_least_squares(v[:, None], grid[count, 0])
    for axis in range(3):  # more heads or wider ones never cost less
        fitted = torch.cummax(fitted, dim=axis).values
    return fitted


def _fitted_line(widths: list[int], times: torch.Tensor) -> torch.Tensor:
    """FFN times by width smoothed as ``_fitted_attention`` does: a line over the widths above 0 (width 0, no FFN,
    as measured), then a running maximum."""
    fitted = times.clone()
    if len(widths) > 2:
        fitted[1:] = _nonnegative_least_squares(torch.tensor(widths[1:], dtype=torch.float64)[:, None], times[1:])
    return torch.cummax(fitted, dim=0).values


def profile_latency(model: nn.Module, *, name: str = "model", batch_size: int = 1, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, threads: int | None = None, compile: bool = False,
                    rounds: int = 7, warmup: int = 2, head_step: int | None = None, ffn_step: int | None = None,
                    show_progress: bool = True) -> LatencyTable:
    """Time ``model``'s parts on ``device`` (see the module docstring) and return the table.

    Args:
        model: a dense timm ``VisionTransformer`` (its weights are not used: parts get random ones).
        batch_size, dtype, threads (CPU intra-op threads; None keeps torch's), compile (``torch.compile`` every part:
            minutes on a CPU): what the table is for, as the deployment runs it.
        rounds, warmup: timed and discarded rounds; each round times every part once.
        head_step, ffn_step: the width steps of the grid (default: the layout's alignment, ``dim_group=0``).
    """
    from hiap.method.cost import token_count

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(rounds, int) or rounds < 1 or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds!r} and {warmup!r}")
    device = torch.device(device)
    architecture = describe_vit(model)
    if threads is not None:
        torch.set_num_threads(threads)
    vit = model
    block = vit.blocks[0]
    heads, head_dim = block.attn.num_heads, block.attn.head_dim
    embed, ffn_width = block.attn.qkv.in_features, block.mlp.fc1.out_features
    tokens = token_count(vit)
    default_head, default_ffn = resolve_groups(0, 0, head_dim, ffn_width)
    head_step, ffn_step = head_step or default_head, ffn_step or default_ffn
    qk_widths = list(range(0, head_dim + 1, head_step))
    v_widths = list(range(head_step, head_dim + 1, head_step))
    ffn_widths = list(range(0, ffn_width + 1, ffn_step))
    qkv_bias, proj_bias = block.attn.qkv.bias is not None, block.attn.proj.bias is not None

    def prepare(module: nn.Module) -> nn.Module:
        module = module.to(device=device, dtype=dtype).eval()
        return torch.compile(module) if compile else module

    parts: dict[tuple, tuple[nn.Module, torch.Tensor]] = {}
    x = torch.randn(batch_size, tokens, embed, device=device, dtype=dtype)
    for count in range(1, heads + 1):
        for q in qk_widths:
            for v in v_widths:
                layer = PrunedAttention(embed, embed, [q] * count, [v] * count, head_dim ** -0.5, qkv_bias=qkv_bias,
                                        proj_bias=proj_bias)
                parts[("attention", count, q, v)] = (prepare(layer), x)
    for width in ffn_widths:
        mlp = PrunedMlp(embed, width, embed, copy.deepcopy(block.mlp.act), fc1_bias=block.mlp.fc1.bias is not None,
                        fc2_bias=block.mlp.fc2.bias is not None)
        parts[("ffn", width)] = (prepare(mlp), x)
    images = torch.randn(batch_size, architecture.get("in_chans", 3), *vit.patch_embed.img_size, device=device,
                         dtype=dtype)
    parts[("fixed",)] = (prepare(_empty_blocks(vit)), images)
    parts[("dense",)] = (prepare(copy.deepcopy(vit)), images)

    # Between two uses of a layer's weights, a forward of the whole model reads all the others: a model larger than
    # the caches meets its weights cold. Reading that many bytes before each timed part puts the caches in that state
    # (for a model that fits in them, the read is small and changes nothing).
    weight_bytes = sum(p.numel() * p.element_size() for p in vit.parameters())
    evict = torch.ones(max(1, weight_bytes // 4), device=device, dtype=torch.float32)
    timer = _Timer(device)
    keys = list(parts)
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    started = time.perf_counter()
    bar = tqdm(total=(warmup + rounds) * len(keys), disable=not (show_progress and sys.stderr.isatty()), desc="profile",
               unit="part", dynamic_ncols=True, leave=False)
    for index in range(warmup + rounds):
        shift = (index * 7) % len(keys)
        for key in keys[shift:] + keys[:shift]:
            module, inputs = parts[key]
            evict.sum()
            elapsed = timer(lambda: module(inputs))
            if index >= warmup:
                times[key].append(elapsed)
            bar.update(1)
    bar.close()
    median = {key: statistics.median(values) for key, values in times.items()}
    attention = [[[0.0] * len(v_widths) for _ in qk_widths]]
    attention += [[[median[("attention", count, q, v)] for v in v_widths] for q in qk_widths]
                  for count in range(1, heads + 1)]
    grid = _fitted_attention(torch.tensor(attention, dtype=torch.float64), qk_widths, v_widths)
    ffn_times = _fitted_line(ffn_widths, torch.tensor([median[("ffn", w)] for w in ffn_widths], dtype=torch.float64))
    spread = {name: [round(min(times[key]), 4), round(max(times[key]), 4)]
              for name, key in (("fixed", ("fixed",)), ("dense", ("dense",)))}
    return LatencyTable(
        model=name, architecture=architecture, device=device.type, device_name=device_name(device),
        dtype=str(dtype).removeprefix("torch."), batch=batch_size, threads=torch.get_num_threads(), compiled=compile,
        torch_version=torch.__version__, tokens=tokens, embed_dim=embed, num_heads=heads, head_dim=head_dim,
        ffn_width=ffn_width, depth=len(vit.blocks), heads=list(range(heads + 1)), qk_widths=qk_widths,
        v_widths=v_widths, attention_ms=grid.tolist(), ffn_widths=ffn_widths, ffn_ms=ffn_times.tolist(),
        fixed_ms=median[("fixed",)], dense_ms=median[("dense",)], rounds=rounds,
        seconds=round(time.perf_counter() - started, 1), spread=spread)


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU model (``/proc/cpuinfo`` on Linux, where ``platform.processor()`` is often empty)."""
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    except OSError:
        return name
