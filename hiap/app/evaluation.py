"""Accuracy, MACs, parameter count and latency of a dense, gated or pruned model."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hiap.app.models import count_parameters
from hiap.app.runtime import DistContext, autocast, progress
from hiap.method.cost import count_macs


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, device: torch.device, *, amp: bool = False,
                        ctx: DistContext | None = None, show_progress: bool = True, label: str = "eval") -> dict:
    """``{"accuracy", "loss", "images"}``: top-1 accuracy in [0, 1], mean cross-entropy and the number of images
    scored, over ``loader`` (every rank's share).

    The loss tells apart models whose accuracies tie on a small validation set (on the 360 digits images one image
    is 0.28 points). The loader yields ``images [B, C, H, W]`` and ``labels [B]``; the model maps images to
    ``logits [B, classes]``. The model is put in eval mode for the pass and restored to its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    enabled = show_progress and (ctx is None or ctx.is_main)
    for images, labels in progress(loader, enabled=enabled, desc=label, unit="batch"):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        correct += (logits.argmax(dim=-1) == labels).sum()
        seen += labels.numel()
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
    if ctx is not None and ctx.distributed:
        for total in (correct, seen, loss_sum):
            dist.all_reduce(total)
    model.train(was_training)
    count = max(int(seen), 1)
    return {"accuracy": float(correct) / count, "loss": float(loss_sum) / count, "images": int(seen)}


def evaluate_accuracy(model: nn.Module, loader: DataLoader, device: torch.device, **kwargs) -> float:
    """Top-1 accuracy in [0, 1] over ``loader``; keyword arguments as :func:`evaluate_classifier`."""
    return evaluate_classifier(model, loader, device, **kwargs)["accuracy"]


@dataclass
class Latency:
    """Wall time of one forward of ``batch`` images on ``device``: the median of ``rounds`` timed forwards and their
    spread (quartiles, extremes), after warm-up; ``paths`` says what ran (``hiap.optimize``'s choices)."""

    batch: int
    ms_per_batch: float
    images_per_second: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    rounds: int
    warmup: int
    threads: int
    device: str
    compiled: bool
    paths: str


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


@torch.inference_mode()
def measure_latencies(models: dict[str, nn.Module], input_shape: tuple[int, int, int], device: torch.device, *,
                      batch: int = 64, warmup: int = 5, rounds: int = 30, amp: bool = False,
                      compile: bool = False, dtype: torch.dtype | None = None) -> dict[str, Latency]:
    """Latency of each model as users run it: a copy prepared by ``hiap.optimize`` (compiled with ``compile``; in
    ``dtype`` where given, with images of that dtype).

    The models are timed in interleaved rounds (each round times every model once, in a rotating order), so a machine
    whose speed drifts (a shared CPU, a GPU warming up) affects them alike and their ratio stays meaningful. CUDA is
    synchronised around every timed forward; the first ``warmup`` rounds (compilation, autotuning, caches) are dropped.
    """
    from hiap.method.inference import describe_paths, optimize

    prepared = {name: optimize(copy.deepcopy(model), device=device, dtype=dtype, batch_size=batch, compile=compile)
                for name, model in models.items()}
    images = torch.randn(batch, *input_shape, device=device, dtype=dtype)
    timings: dict[str, list[float]] = {name: [] for name in prepared}
    names = list(prepared)
    for index in range(warmup + rounds):
        order = names[index % len(names):] + names[: index % len(names)]
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with autocast(device, amp):
                prepared[name](images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= warmup:
                timings[name].append((time.perf_counter() - start) * 1e3)
    results = {}
    for name, values in timings.items():
        median = statistics.median(values)
        q1, q3 = _quartiles(values)
        results[name] = Latency(batch=batch, ms_per_batch=median, images_per_second=batch / median * 1e3, q1_ms=q1,
                                q3_ms=q3, min_ms=min(values), max_ms=max(values), rounds=rounds, warmup=warmup,
                                threads=torch.get_num_threads(), device=str(device), compiled=compile,
                                paths=describe_paths(prepared[name]))
    return results


def model_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of a timm ViT, gated or pruned."""
    vit = getattr(model, "vit", model)
    return (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)


def memory_of(device: torch.device | str) -> int:
    """Bytes this process may hold on ``device`` at most: a GPU's memory; on the host RAM and swap, or the address
    space limit (``ulimit -v``) where that is lower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as meminfo:
            swap = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("SwapTotal:")), 0)
    except OSError:
        swap = 0
    total += swap
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            total = min(total, soft)
    except (ImportError, ValueError, OSError):
        pass
    return total


def check_latency_batch(model: nn.Module, batch: int, device: torch.device | str, flag: str = "--latency-batch"
                        ) -> None:
    """InputError when a forward of ``batch`` images cannot fit in ``device``'s memory (checked before any work).

    What must fit at the least: the fp32 batch of images and the patch embedding's tokens made from it, which exist
    together. A batch refused here could not run; one that passes may still be too large for all the activations.
    """
    from hiap.app.runtime import InputError

    vit = getattr(model, "vit", model)
    channels, height, width = model_input_shape(model)
    tokens = vit.patch_embed.num_patches + getattr(vit, "num_prefix_tokens", 0)
    needed = 4 * batch * (channels * height * width + tokens * vit.embed_dim)
    available = memory_of(device)
    if needed > available:
        raise InputError(f"{flag} {batch}: a batch of {batch} images of {channels} x {height} x {width} needs at "
                         f"least {needed / 2**30:,.1f} GiB of memory, more than the {available / 2**30:,.1f} GiB "
                         f"{'of this GPU' if torch.device(device).type == 'cuda' else 'this machine has'}")


def summarize(models: dict[str, nn.Module], loader: DataLoader, device: torch.device, *, amp: bool = False,
              ctx: DistContext | None = None, latency_batch: int = 64, latency_rounds: int = 30,
              compile: bool = False, show_progress: bool = True) -> dict[str, dict]:
    """Per model ``{"accuracy", "loss", "macs", "params", "latency": {...}}`` on one validation loader.

    Latency is measured on rank 0 only (other ranks report None), with the threads torch uses now, all models
    interleaved (``measure_latencies``) so that their ratio holds on a machine whose speed drifts.
    """
    summaries = {}
    for name, model in models.items():
        quality = evaluate_classifier(model, loader, device, amp=amp, ctx=ctx, show_progress=show_progress, label=name)
        summaries[name] = {**quality, "macs": count_macs(model), "params": count_parameters(model), "latency": None}
    if ctx is None or ctx.is_main:
        shape = model_input_shape(next(iter(models.values())))
        latencies = measure_latencies(models, shape, device, batch=latency_batch, rounds=latency_rounds, amp=amp,
                                      compile=compile)
        for name, latency in latencies.items():
            summaries[name]["latency"] = asdict(latency)
    return summaries
