"""Measuring a latency table: ``profile_latency`` (``hiap profile``) times a ViT's parts on one device and fits them.

One attention layer for every number of heads and every pair of q/k and v head widths on the layout's alignment
steps (the heads of a timed layer all equal), one FFN for every width on its steps, the model with nothing left in
its blocks (patch embedding, norms, residual adds, head: the fixed parts) and the dense model. On a CPU the timings
are wall-clock medians over interleaved rounds (every part once per round, in a rotating order, so a drifting machine
affects all alike); on CUDA each part is timed with CUDA events. The medians are fitted before they are stored (per
head count a plane in the q/k and v widths, the FFN a line in its width, least squares with slopes of at least 0,
then a running maximum): a noisy table dips and has plateaus that the search would take for free width.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
import torch.nn as nn
from tqdm import tqdm

from hiap.method.architecture import describe_vit
from hiap.method.gates import resolve_groups
from hiap.method.latency import LatencyTable
from hiap.method.pruned import PrunedAttention, PrunedMlp

__all__ = ["device_name", "profile_latency"]


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


@torch.inference_mode()
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
