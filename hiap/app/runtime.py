"""Process-level plumbing shared by the pipeline: user-facing errors, device and thread choice, distributed setup,
atomic file writes and progress bars."""

from __future__ import annotations

import contextlib
import logging
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hiap.files import atomic_path
from hiap.method.profile import device_name


class InputError(Exception):
    """A problem with what the user asked for (path, model name, budget, checkpoint): printed as one line, no traceback.

    Raised in a DataLoader worker, it comes back to the main process carrying the worker's whole traceback as its
    message; ``str`` keeps only the original one-line message.
    """

    def __str__(self) -> str:
        message = super().__str__()
        if "Original Traceback" not in message:
            return message
        last = message.rstrip().splitlines()[-1]
        return last.split("InputError: ", 1)[-1]


# --------------------------------------------------------------------------------------------------------------------
# Devices, threads, precision
# --------------------------------------------------------------------------------------------------------------------

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA (the local rank's GPU) when present, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("--device cuda was requested but no CUDA GPU is available")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise InputError(f"unknown --device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")


# Below this many MACs per image, OpenMP synchronisation costs more than the matmuls it splits; on a shared 2-core
# machine two threads made one training step of the default model 9x slower than one thread.
SMALL_MODEL_MACS = 50_000_000


def describe_machine(device: torch.device) -> dict:
    """Where a measurement was taken: device name, torch version and intra-op threads (for result records)."""
    return {"device": device.type, "name": device_name(device), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def configure_threads(requested: int, device: torch.device, macs_per_image: int) -> int:
    """Set torch's intra-op thread count: ``requested`` if > 0, else 1 for small CPU models and torch's default
    otherwise. Returns the count in force."""
    if requested > 0:
        torch.set_num_threads(requested)
    elif device.type == "cpu" and macs_per_image < SMALL_MODEL_MACS:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs that support it, fp16 otherwise; a no-op context on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    """fp16 autocast needs loss scaling; bf16 and fp32 do not."""
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


# --------------------------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class DistContext:
    """Where this process sits in a (possibly single-process) run. ``rank == 0`` is the only one that writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 of the process group (``is_rank0()`` before the group exists)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (nccl on GPU, gloo on CPU).

    Without ``torchrun`` (no ``WORLD_SIZE``) this is a single process and nothing is initialised.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), resolve_device(device_name)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank), device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_floats(values: list[float], ctx: DistContext, device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (same length on each), as one list per rank; the local list alone when not distributed."""
    if not ctx.distributed:
        return [list(values)]
    local = torch.tensor(values, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local)
    return [g.tolist() for g in gathered]


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------

def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`hiap.files.atomic_path` (the whole file or the previous one, flushed to disk)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


# --------------------------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------------------------

def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr, shown only when ``enabled`` and stderr is a terminal (so logs and CI stay clean)."""
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True, leave=False, **kwargs)


def is_rank0() -> bool:
    """Whether this process is rank 0 of a ``torchrun`` job (or runs alone): the one that writes files and prints.
    Read from the environment, so it answers before the process group exists; ``DistContext.is_main`` agrees."""
    return int(os.environ.get("RANK", "0")) == 0


# Status lines go to the ``hiap`` logger (``hiap.app`` for the application, ``hiap`` for the library's events): a
# program that uses the package routes them like any other logging; the command line prints them (configure_logging).
logger = logging.getLogger("hiap.app")


def log_line(message: str, ctx: DistContext | None = None, level: int = logging.INFO) -> None:
    """One status line to the ``hiap.app`` logger, from rank 0 only."""
    if ctx is None or ctx.is_main:
        logger.log(level, message)


class _ProgressSafeHandler(logging.Handler):
    """Writes records on the current stderr through tqdm, so a line never breaks a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a handler must not raise into the code that logs
            self.handleError(record)


def configure_logging(verbosity: int = 0, rank: int = 0) -> None:
    """How the command line shows the ``hiap`` loggers: INFO by default, WARNING with ``verbosity < 0`` (--quiet),
    DEBUG with ``verbosity > 0`` (--verbose); on ranks other than 0 only warnings and errors. Calling it again
    replaces the handler it installed (one line per record, whatever the number of calls)."""
    package = logging.getLogger("hiap")
    for handler in list(package.handlers):
        if isinstance(handler, _ProgressSafeHandler):
            package.removeHandler(handler)
    handler = _ProgressSafeHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    level = logging.WARNING if verbosity < 0 or rank != 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    package.setLevel(level)
