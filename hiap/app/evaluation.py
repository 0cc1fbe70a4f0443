"""Accuracy, MACs, parameter count and latency of a dense, gated or pruned model."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hiap.method.cost import count_macs
from hiap.app.models import count_parameters
from hiap.app.runtime import DistContext, autocast, progress


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, device: torch.device, *, amp: bool = False,
                        ctx: DistContext | None = None, show_progress: bool = True, label: str = "eval") -> dict:
    """``{"accuracy", "loss"}``: top-1 accuracy in [0, 1] and mean cross-entropy over ``loader`` (every rank's share).

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
    return {"accuracy": float(correct) / count, "loss": float(loss_sum) / count}


def evaluate_accuracy(model: nn.Module, loader: DataLoader, device: torch.device, **kwargs) -> float:
    """Top-1 accuracy in [0, 1] over ``loader``; keyword arguments as :func:`evaluate_classifier`."""
    return evaluate_classifier(model, loader, device, **kwargs)["accuracy"]


@dataclass
class Latency:
    """Median wall time of one forward of ``batch`` images, and the throughput it implies."""

    batch: int
    ms_per_batch: float
    images_per_second: float
    threads: int
    device: str


@torch.inference_mode()
def measure_latency(model: nn.Module, input_shape: tuple[int, int, int], device: torch.device, *, batch: int = 64,
                    warmup: int = 3, repeats: int = 10, amp: bool = False) -> Latency:
    """Median over ``repeats`` timed forwards of a random ``[batch, *input_shape]`` input after ``warmup`` untimed ones.

    CUDA work is synchronised around every timed forward so the figure is the kernel time, not the launch time.
    """
    was_training = model.training
    model.eval()
    images = torch.randn(batch, *input_shape, device=device)
    timings = []
    for index in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(device, amp):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            timings.append(time.perf_counter() - start)
    model.train(was_training)
    median = statistics.median(timings)
    return Latency(batch=batch, ms_per_batch=median * 1e3, images_per_second=batch / median,
                   threads=torch.get_num_threads(), device=str(device))


def model_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of a timm ViT, gated or pruned."""
    vit = getattr(model, "vit", model)
    return (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)


def summarize(model: nn.Module, loader: DataLoader, device: torch.device, *, amp: bool = False,
              ctx: DistContext | None = None, latency_batch: int = 64, latency_repeats: int = 10,
              show_progress: bool = True, label: str = "eval") -> dict:
    """``{"accuracy", "loss", "macs", "params", "latency": {...}}`` of one model on one validation loader.

    Latency is measured on rank 0 only (other ranks report None), with the threads torch uses now.
    """
    quality = evaluate_classifier(model, loader, device, amp=amp, ctx=ctx, show_progress=show_progress, label=label)
    latency = None
    if ctx is None or ctx.is_main:
        latency = asdict(measure_latency(model, model_input_shape(model), device, batch=latency_batch,
                                         repeats=latency_repeats, amp=amp))
    return {**quality, "macs": count_macs(model), "params": count_parameters(model), "latency": latency}
