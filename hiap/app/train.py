"""The training loop: one resumable, DDP-aware ``fit`` that runs a job of ``hiap.app.jobs`` (dense teacher, HiAP, KD
fine-tuning).

A step reads top-down: batch -> (teacher logits) -> model forward -> job loss -> backward -> AdamW step over the job's
parameter groups -> LR schedule step. Crash safety: the whole training state (model, optimizer, scheduler, the
objective's Lagrange multipliers, step, RNG, the run's config) is written atomically at the end of every epoch and every
``checkpoint_every`` steps; ``resume=True`` continues from it bit for bit, because the batch order is a function of
``(seed, epoch)`` and the gates are drawn from ``(cfg.seed, gate_step)``, both restored from the checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from hiap.app.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    JsonlLog,
    config_difference,
    read_checkpoint,
    rng_state,
    seal,
    set_rng_state,
)
from hiap.app.data import DataBundle, ShardedBatchSampler, eval_loader, train_loader
from hiap.app.evaluation import evaluate_accuracy
from hiap.app.jobs import TrainingJob
from hiap.app.runtime import DistContext, InputError, atomic_torch_save, autocast, log_line, needs_grad_scaler, progress
from hiap.backend import runs_triton_kernels

__all__ = ["FitResult", "LoopSettings", "build_optimizer", "fit"]


@dataclass
class LoopSettings:
    """How long and how one training phase runs (not what it optimises: that is the job's)."""

    epochs: int
    batch_size: int
    weight_decay: float = 0.05
    warmup_steps: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    eval_batch_size: int = 256
    amp: bool = True
    workers: int = 0
    show_progress: bool = True
    seed: int = 0


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------

def _stop_if_diverged(phase: str, step: int, values: dict[str, float]) -> None:
    """A non-finite loss ends the run before anything of it is saved (checkpoint, cached teacher, pruned model)."""
    broken = {name: value for name, value in values.items() if not math.isfinite(value)}
    if broken:
        name, value = next(iter(broken.items()))
        raise InputError(f"[{phase}] the training diverged: {name} is {value} at step {step}; nothing of this phase "
                         "was saved. Lower the learning rate (--lr, --teacher-lr, --gate-lr) and run again")


def build_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW over ``groups``, fused where torch has the kernel: one launch per step for all parameters, and a step
    counter kept on the device (the plain implementation reads it back on the host every step)."""
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype the fused kernel does not take
        return torch.optim.AdamW(groups)


def _schedule(kind, total_steps: int, warmup_steps: int):
    """The LR factor of one group as a function of the step: ``kind`` is ``"cosine"``, ``"constant"`` or already one."""
    if callable(kind):
        return kind

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_fraction = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_fraction)))

    def constant(step: int) -> float:
        return 1.0

    return cosine if kind == "cosine" else constant


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    val_accuracy: float = float("nan")
    resumed_from: int | None = None


def _wrap(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    if not ctx.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _first_step_note(model: nn.Module, device: torch.device) -> str | None:
    """What the first step of this process is busy with when it compiles Triton kernels, else None."""
    if not runs_triton_kernels(model, device):
        return None
    from hiap_kernels import kernel_cache_dir

    return (f"the first step compiles this model's Triton kernels; Triton keeps them in {kernel_cache_dir()}, "
            "where a later run on this machine loads them instead")


def fit(job: TrainingJob, data: DataBundle, settings: LoopSettings, *, ctx: DistContext, device: torch.device,
        checkpoint_path: str | Path, log: JsonlLog | None, fingerprint: dict, resume: bool) -> FitResult:
    """Train ``job`` for ``settings.epochs`` epochs of ``data.train``, evaluating on ``data.val`` after each epoch.

    Checkpoints (rank 0 only) go to ``checkpoint_path`` at every epoch end and every ``settings.checkpoint_every``
    steps. With ``resume`` and an existing checkpoint, training continues from it; a checkpoint written under another
    ``fingerprint`` (the settings that shape training) raises InputError naming the first difference.
    """
    checkpoint_path = Path(checkpoint_path)
    model = job.model.to(device)
    if job.teacher is not None:
        job.teacher.to(device).eval().requires_grad_(False)
    train_model = _wrap(model, ctx, device)
    sampler = ShardedBatchSampler(len(data.train), settings.batch_size, seed=settings.seed, rank=ctx.rank,
                                  world_size=ctx.world_size)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = settings.epochs * steps_per_epoch
    groups = job.param_groups(settings.weight_decay, total_steps)
    # The schedules stay out of the optimizer's groups (its state_dict is saved, and a function does not pickle).
    schedules = [_schedule(group.pop("schedule"), total_steps, settings.warmup_steps) for group in groups]
    optimizer = build_optimizer(groups)
    scheduler = LambdaLR(optimizer, schedules)
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(device, settings.amp) else None
    result = FitResult(steps=total_steps)
    step = 0
    # Running train loss of the epoch in progress, summed on the device in float64 (the same additions a Python float
    # would make), read back only when logged or saved; part of the checkpoint so a mid-epoch resume reports the same.
    running_loss = torch.zeros((), dtype=torch.float64, device=device)
    running = {"loss_sum": 0.0, "batches": 0}

    def running_state() -> dict:
        return {"loss_sum": float(running_loss), "batches": running["batches"]}

    def save(finished: bool) -> None:
        if not ctx.is_main:
            return
        _stop_if_diverged(job.phase, step, {"epoch loss sum": float(running_loss)})
        payload = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "phase": job.phase,
            "fingerprint": fingerprint, "model": model.state_dict(),
            "extra": job.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step, "total_steps": total_steps, "finished": finished, "history": result.history,
            "running": running_state(), "rng": rng_state(), **job.checkpoint_metadata(),
        }
        atomic_torch_save(seal(payload), checkpoint_path)

    if resume and checkpoint_path.exists():
        payload = read_checkpoint(checkpoint_path, phase=job.phase)
        difference = config_difference(payload["fingerprint"], fingerprint)
        if difference is not None:
            raise InputError(f"--resume: {checkpoint_path} was written with a different config ({difference}); "
                             "resume with the original settings or use a new --output")
        model.load_state_dict(payload["model"])
        job.load_state_dict(payload["extra"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        step = int(payload["step"])
        running.update(payload["running"])
        running_loss.fill_(float(payload["running"]["loss_sum"]))
        result.history = list(payload["history"])
        result.resumed_from = step
        if log is not None:
            log.truncate_after(job.phase, step)
        log_line(f"[{job.phase}] resumed from {checkpoint_path} at step {step}/{total_steps}", ctx)
    elif resume:
        if log is not None:  # what a run killed before its first checkpoint logged is redone from the start
            log.truncate_after(job.phase, 0)
        log_line(f"[{job.phase}] no checkpoint at {checkpoint_path}; starting from scratch", ctx)

    def record_event(event: dict) -> None:
        """An event of the job (it applies from ``event["step"]``): kept in the history and the log (its message was
        logged by the job's library, ``hiap.Pruner``)."""
        event = dict(event)
        event.pop("message", None)
        at = event.pop("step", step)
        event = {"phase": job.phase, "step": at, "epoch": min(at // steps_per_epoch, settings.epochs - 1) + 1, **event}
        result.history.append(event)
        if log is not None:
            log.write(event)

    val_loader = eval_loader(data.val, settings.eval_batch_size, rank=ctx.rank, world_size=ctx.world_size,
                             workers=settings.workers, pin_memory=device.type == "cuda")
    bar = progress(total=total_steps, initial=step, enabled=settings.show_progress and ctx.is_main,
                   desc=job.phase, unit="step")
    # The first step of a process compiles the Triton kernels it meets (a minute on a GPU the first time, seconds
    # once Triton's cache holds them): say so instead of leaving a bar that seems stuck.
    compiling = _first_step_note(model, device)
    first_step_start = None
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, step_in_epoch)
        model.train()
        if step_in_epoch == 0:
            running.update(loss_sum=0.0, batches=0)
            running_loss.zero_()
        for images, targets in train_loader(data.train, sampler, settings.workers, device.type == "cuda"):
            if compiling is not None and first_step_start is None:
                log_line(f"[{job.phase}] {compiling}", ctx)
                bar.set_description(f"{job.phase} (compiling kernels)")
                first_step_start = time.perf_counter()
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            teacher_logits = None
            if job.teacher is not None:
                with torch.no_grad(), autocast(device, settings.amp):
                    teacher_logits = job.teacher(images).float()
            with autocast(device, settings.amp):
                logits = train_model(images)
            loss, metrics = job.loss(logits.float(), targets, teacher_logits)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                events = job.after_step(scaler)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
                events = job.after_step(None)
            scheduler.step()
            step += 1
            for event in events:
                record_event(event)
            if compiling is not None:
                torch.cuda.synchronize(device)  # once: the first step's time, compilation included
                log_line(f"[{job.phase}] first step: {time.perf_counter() - first_step_start:.1f} s, kernel "
                         "compilation included", ctx)
                bar.set_description(job.phase)
                compiling = None
            running_loss += metrics["loss"].double()
            running["batches"] += 1
            bar.update(1)
            # Only logging steps read values back from the device; every other step queues work and moves on.
            if step % settings.log_every == 0 or step == total_steps:
                values = {name: float(value) for name, value in metrics.items()}
                _stop_if_diverged(job.phase, step, values)
                bar.set_postfix(epoch=epoch + 1, loss=f"{values['loss']:.4f}", refresh=False)
                if log is not None:
                    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
                    log.write({"phase": job.phase, "event": "step", "step": step, "epoch": epoch + 1, **values,
                               "lr": lrs, **job.log_extras()})
            if settings.checkpoint_every and step % settings.checkpoint_every == 0 and step % steps_per_epoch:
                save(finished=False)
        _stop_if_diverged(job.phase, step, {"epoch mean loss": float(running_loss)})
        accuracy = evaluate_accuracy(model, val_loader, device, amp=settings.amp, ctx=ctx, show_progress=False)
        record = {"phase": job.phase, "event": "epoch", "step": step, "epoch": epoch + 1,
                  "train_loss": float(running_loss) / max(1, running["batches"]), "val_accuracy": accuracy,
                  **job.log_extras()}
        result.history.append(record)
        if log is not None:
            log.write(record)
        save(finished=step == total_steps)
        macs = record.get("macs_fraction")
        latency = f", latency {record['decided_fraction']:.4f} (table)" if record.get("budget") == "latency" else ""
        log_line(f"[{job.phase}] epoch {epoch + 1}/{settings.epochs}: val acc {accuracy:.4f}"
                 + (f", MACs {macs:.4f} of dense{latency}" if macs is not None else ""), ctx)
    bar.close()
    epochs = [record for record in result.history if record.get("event") == "epoch"]
    result.val_accuracy = epochs[-1]["val_accuracy"] if epochs else float("nan")
    return result
