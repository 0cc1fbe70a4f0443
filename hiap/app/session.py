"""What every command of the pipeline starts from: its settings, and the session they set up (process group, dense
teacher trained once and cached, data), with the checks that refuse a bad setting before any training.

Every function here runs on every rank of a ``torchrun`` job; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from hiap.app.checkpoint import JsonlLog
from hiap.app.data import DataBundle, build_datasets, describe_source, num_classes_of
from hiap.app.evaluation import check_latency_batch
from hiap.app.jobs import DenseJob
from hiap.app.models import create_dense_model, load_dense_weights
from hiap.app.runtime import DistContext, InputError, configure_threads, init_distributed, log_line
from hiap.app.train import LoopSettings, fit
from hiap.config import HiAPConfig
from hiap.files import FileLock, RunFolderBusy, remove_stale_temporaries, save_safetensors
from hiap.method.cost import count_macs
from hiap.method.gates import resolve_groups
from hiap.tokens import reduce_tokens, schedule_for

DEFAULT_OUTPUT = "hiap-runs/prune"


@dataclass
class PipelineSettings:
    """Everything ``hiap prune`` / ``hiap compare`` take, with the defaults of the default digits run."""

    output: str = DEFAULT_OUTPUT
    model: str = "digits_vit"
    model_args: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    pretrained: bool = False
    data: str | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    workers: int = 0
    hiap: HiAPConfig = field(default_factory=HiAPConfig)
    epochs: int = 25
    batch_size: int = 64
    weight_decay: float = 0.05
    teacher_epochs: int = 40
    teacher_lr: float = 2e-3
    teacher_seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    eval_batch_size: int = 256
    device: str = "auto"
    amp: bool = True
    threads: int = 0
    cache_dir: str = "~/.cache/hiap"
    show_progress: bool = True
    resume: bool = False
    latency_batch: int = 64
    latency_repeats: int = 30
    compile: bool = False
    overwrite: bool = False
    tokens: str | None = None

    def loop(self, epochs: int, seed: int, warmup_steps: int = 0) -> LoopSettings:
        return LoopSettings(epochs=epochs, batch_size=self.batch_size, weight_decay=self.weight_decay,
                            warmup_steps=warmup_steps, checkpoint_every=self.checkpoint_every,
                            log_every=self.log_every, eval_batch_size=self.eval_batch_size, amp=self.amp,
                            workers=self.workers, show_progress=self.show_progress, seed=seed)

    def data_fingerprint(self) -> dict:
        return {"data": describe_source(self.data), "val_fraction": self.val_fraction, "split_seed": self.split_seed,
                "model": self.model, "model_args": self.model_args}


@dataclass
class Session:
    """What every phase of one command shares: process placement, the dense teacher and the data."""

    ctx: DistContext
    device: torch.device
    teacher: nn.Module
    data: DataBundle
    teacher_key: str
    threads: int
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------------------------------

def _file_identity(path: str | None) -> dict | None:
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def teacher_fingerprint(settings: PipelineSettings) -> dict:
    return {**settings.data_fingerprint(), "checkpoint": _file_identity(settings.checkpoint),
            "pretrained": settings.pretrained, "teacher_epochs": settings.teacher_epochs,
            "teacher_lr": settings.teacher_lr, "teacher_seed": settings.teacher_seed,
            "batch_size": settings.batch_size, "weight_decay": settings.weight_decay}


def _fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _save_weights(model: nn.Module, path: Path, metadata: dict) -> None:
    save_safetensors(model.state_dict(), path, {"hiap_teacher": json.dumps(metadata)})


def _check_gate_groups(dense: nn.Module, cfg: HiAPConfig) -> None:
    """The gate groups must divide the model's head dim and FFN width, and the heads kept at least must be heads the
    model has: refused before a teacher is trained."""
    attn, mlp = dense.blocks[0].attn, dense.blocks[0].mlp
    heads = min(block.attn.num_heads for block in dense.blocks)
    if cfg.min_heads > heads:
        raise InputError(f"--min-heads {cfg.min_heads}: the model has {heads} heads per layer; at most {heads} can be "
                         "kept")
    head, neuron = resolve_groups(cfg.dim_group, cfg.neuron_group, attn.head_dim, mlp.fc1.out_features)
    if attn.head_dim % head:
        raise InputError(f"--dim-group {head} does not divide the model's head dim {attn.head_dim}")
    if mlp.fc1.out_features % neuron:
        raise InputError(f"the neuron group {neuron} (--dim-group / --neuron-group) does not divide the model's FFN "
                         f"width {mlp.fc1.out_features}")


def _check_latency_budget(dense: nn.Module, cfg: HiAPConfig) -> None:
    """A latency budget's table must exist, fit the model and allow the target: refused before a teacher is trained."""
    if cfg.budget != "latency":
        return
    from hiap.method.convert import gate_vit
    from hiap.method.pruner import budget_of

    try:
        budget_of(gate_vit(dense, cfg))
    except ValueError as error:
        raise InputError(f"--latency-table: {error}") from None


def check_token_schedule(model: nn.Module, spec: str) -> None:
    """``--tokens`` must fit the model (blocks, tokens, a class token): refused before anything is trained."""
    try:
        schedule_for(model, spec)
    except (ValueError, TypeError) as error:
        raise InputError(f"--tokens {spec!r}: {error}") from None


def with_tokens(models: dict[str, nn.Module], spec: str | None) -> dict[str, nn.Module]:
    """``models`` and, with a schedule, each of them token-reduced as ``<name>+tokens`` (copies; originals kept)."""
    if spec is None:
        return models
    reduced = {f"{name}+tokens": reduce_tokens(copy.deepcopy(model), spec) for name, model in models.items()}
    return {**models, **reduced}


def prepare_session(settings: PipelineSettings, log: JsonlLog | None) -> Session:
    """Process group, dense model (fresh, pretrained or from --checkpoint), data, and the trained teacher.

    The teacher is trained for ``teacher_epochs`` and cached under ``cache_dir`` keyed by everything that shapes it;
    a later run with the same settings loads it instead. Its own checkpoint lets a killed teacher phase resume.
    """
    ctx, device = init_distributed(settings.device)
    notes: list[str] = []
    torch.manual_seed(settings.teacher_seed)
    dense = create_dense_model(settings.model, num_classes_of(settings.data), model_args=settings.model_args,
                               pretrained=settings.pretrained)
    _check_gate_groups(dense, settings.hiap)
    _check_latency_budget(dense, settings.hiap)
    check_latency_batch(dense, settings.latency_batch, device)
    if settings.tokens is not None:
        check_token_schedule(dense, settings.tokens)
    if settings.checkpoint is not None:
        notes += load_dense_weights(dense, settings.checkpoint)
    threads = configure_threads(settings.threads, device, count_macs(dense))
    data = build_datasets(settings.data, dense, settings.val_fraction, settings.split_seed)
    fingerprint = teacher_fingerprint(settings)
    key = _fingerprint_key(fingerprint)
    if settings.teacher_epochs == 0:
        return Session(ctx, device, dense.to(device).eval(), data, key, threads, notes)
    cache = Path(settings.cache_dir).expanduser()
    weights_path = cache / f"teacher-{key}.safetensors"
    with _teacher_lock(cache, key, ctx):
        ctx.barrier()
        if weights_path.exists():
            load_dense_weights(dense, weights_path)
            log_line(f"[teacher] loaded from cache {weights_path}", ctx)
        else:
            job = DenseJob(dense, settings.teacher_lr)
            steps_per_epoch = len(data.train) // settings.batch_size
            loop = settings.loop(settings.teacher_epochs, settings.teacher_seed,
                                 warmup_steps=max(1, settings.teacher_epochs * steps_per_epoch // 10))
            checkpoint = cache / f"teacher-{key}.checkpoint.pt"
            # Always resumable: the cache key pins every setting, so a partial teacher of the same key is this teacher.
            fit(job, data, loop, ctx=ctx, device=device, checkpoint_path=checkpoint, log=log,
                fingerprint=fingerprint, resume=checkpoint.exists())
            if ctx.is_main:
                _save_weights(dense, weights_path, fingerprint)
                checkpoint.unlink(missing_ok=True)
            log_line(f"[teacher] trained and cached at {weights_path}", ctx)
    return Session(ctx, device, dense.to(device).eval(), data, key, threads, notes)


@contextlib.contextmanager
def _teacher_lock(cache: Path, key: str, ctx: DistContext) -> Iterator[None]:
    """Hold the cache's lock of teacher ``key`` (rank 0): one run at a time trains it, a second one waits and then
    loads it. Holding it, the temporary files of this teacher that a killed run left are removed: no one else is
    writing them."""
    if not ctx.is_main:
        yield
        return
    lock = FileLock(cache / f".teacher-{key}.lock")
    try:
        lock.__enter__()
    except RunFolderBusy:
        log_line(f"[teacher] another run is training this teacher ({lock.path}); waiting for it to finish", ctx)
        lock = FileLock(lock.path, wait=True)
        lock.__enter__()
    try:
        remove_stale_temporaries(cache, prefix=f".teacher-{key}.")
        yield
    finally:
        lock.__exit__(None, None, None)
