"""Where and how the suite runs: device, folders, precision, and the run settings read from ``HIAP_BENCH_*``.

The settings are environment variables rather than pytest options, so that they work whichever conftest pytest
treats as initial. Every other bench module imports from this one; it imports no bench module.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def results_dir() -> Path | None:
    """Where the JSON record goes: ``HIAP_BENCH_RESULTS`` (a folder, or ``off``), default ``bench/results``."""
    value = os.environ.get("HIAP_BENCH_RESULTS", "").strip()
    if value.lower() in ("off", "none", "0", "false"):
        return None
    return Path(value) if value else DEFAULT_RESULTS_DIR


def deadline() -> float | None:
    """Unix time by which the whole suite must be done (``HIAP_BENCH_DEADLINE``, set by ``run_gpu.sh``)."""
    value = os.environ.get("HIAP_BENCH_DEADLINE", "").strip()
    return float(value) if value else None


def seconds_left() -> float:
    limit = deadline()
    return math.inf if limit is None else limit - time.time()


def batch_sizes(gpu_default: tuple[int, ...], cpu_default: tuple[int, ...]) -> tuple[int, ...]:
    """Batch sizes of a case: the device's default, or ``HIAP_BENCH_BATCHES=64,256`` for the GPU op cases."""
    if not ON_GPU:
        return cpu_default
    value = os.environ.get("HIAP_BENCH_BATCHES", "").strip()
    return tuple(int(v) for v in value.split(",") if v.strip()) if value else gpu_default


def set_cpu_threads() -> None:
    """One intra-op thread on a CPU-only machine unless ``HIAP_BENCH_THREADS`` says otherwise.

    On a small machine shared with other jobs, every OpenMP parallel region waits for a thread that another process
    holds: measured on the 2-core development machine, DeiT-S at batch 1 took 1.3 s with 2 threads and 0.14 s with
    one (batch 8: 2.0 s against 1.0 s). One thread gives figures that mean something there; the record states the
    thread count.
    """
    value = os.environ.get("HIAP_BENCH_THREADS", "").strip()
    if value:
        torch.set_num_threads(int(value))
    elif not ON_GPU:
        torch.set_num_threads(1)


def autocast_context():
    """bf16 autocast on a GPU (the training precision the targets are stated in); fp32 on a CPU."""
    if ON_GPU:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def precision_label() -> str:
    return "bf16 autocast" if ON_GPU else "fp32"
