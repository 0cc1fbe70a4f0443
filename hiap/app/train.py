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
    check_resume,
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


class _Loop:
    """The state of one training phase and the parts of ``fit``: set up, restore, one step, its log, an epoch's end,
    a checkpoint. The order of operations is what makes a resumed run bit-identical; each part keeps it."""

    def __init__(self, job: TrainingJob, data: DataBundle, settings: LoopSettings, ctx: DistContext,
                 device: torch.device, checkpoint_path: Path, log: JsonlLog | None, fingerprint: dict):
        self.job, self.data, self.settings, self.ctx, self.device = job, data, settings, ctx, device
        self.checkpoint_path, self.log, self.fingerprint = checkpoint_path, log, fingerprint
        self.model = job.model.to(device)
        if job.teacher is not None:
            job.teacher.to(device).eval().requires_grad_(False)
        self.train_model = _wrap(self.model, ctx, device)
        self.sampler = ShardedBatchSampler(len(data.train), settings.batch_size, seed=settings.seed, rank=ctx.rank,
                                           world_size=ctx.world_size)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = settings.epochs * self.steps_per_epoch
        groups = job.param_groups(settings.weight_decay, self.total_steps)
        # The schedules stay out of the optimizer's groups (its state_dict is saved, and a function does not pickle).
        schedules = [_schedule(group.pop("schedule"), self.total_steps, settings.warmup_steps) for group in groups]
        self.optimizer = build_optimizer(groups)
        self.scheduler = LambdaLR(self.optimizer, schedules)
        self.scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(device, settings.amp) else None
        self.result = FitResult(steps=self.total_steps)
        self.step = 0
        # Running train loss of the epoch in progress, summed on the device in float64 (the same additions a Python
        # float would make), read back only when logged or saved; in the checkpoint so a mid-epoch resume reports it.
        self.running_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.batches = 0

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save(self, finished: bool) -> None:
        """The whole training state, atomically (rank 0 only)."""
        if not self.ctx.is_main:
            return
        _stop_if_diverged(self.job.phase, self.step, {"epoch loss sum": float(self.running_loss)})
        payload = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "phase": self.job.phase,
            "fingerprint": self.fingerprint, "model": self.model.state_dict(), "extra": self.job.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step, "total_steps": self.total_steps, "finished": finished, "history": self.result.history,
            "running": {"loss_sum": float(self.running_loss), "batches": self.batches}, "rng": rng_state(),
            **self.job.checkpoint_metadata(),
        }
        atomic_torch_save(seal(payload), self.checkpoint_path)

    def restore(self, resume: bool) -> None:
        """Continue from the checkpoint when resuming and one exists (refused when written under another config)."""
        phase, log = self.job.phase, self.log
        if resume and self.checkpoint_path.exists():
            payload = read_checkpoint(self.checkpoint_path, phase=phase)
            check_resume(self.checkpoint_path, payload["fingerprint"], self.fingerprint)
            self.model.load_state_dict(payload["model"])
            self.job.load_state_dict(payload["extra"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
            if self.scaler is not None and payload.get("scaler"):
                self.scaler.load_state_dict(payload["scaler"])
            set_rng_state(payload["rng"])
            self.step = int(payload["step"])
            self.batches = payload["running"]["batches"]
            self.running_loss.fill_(float(payload["running"]["loss_sum"]))
            self.result.history = list(payload["history"])
            self.result.resumed_from = self.step
            if log is not None:
                log.truncate_after(phase, self.step)
            log_line(f"[{phase}] resumed from {self.checkpoint_path} at step {self.step}/{self.total_steps}", self.ctx)
        elif resume:
            if log is not None:  # what a run killed before its first checkpoint logged is redone from the start
                log.truncate_after(phase, 0)
            log_line(f"[{phase}] no checkpoint at {self.checkpoint_path}; starting from scratch", self.ctx)

    # -- one step -------------------------------------------------------------------------------------------------

    def record_event(self, event: dict) -> None:
        """An event of the job (it applies from ``event["step"]``): kept in the history and the log (its message was
        logged by the job's library, ``hiap.Pruner``)."""
        event = dict(event)
        event.pop("message", None)
        at = event.pop("step", self.step)
        epoch = min(at // self.steps_per_epoch, self.settings.epochs - 1) + 1
        event = {"phase": self.job.phase, "step": at, "epoch": epoch, **event}
        self.result.history.append(event)
        if self.log is not None:
            self.log.write(event)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """batch -> (teacher logits) -> forward -> loss -> backward -> optimizer -> the job's step -> LR schedule."""
        job, device, settings = self.job, self.device, self.settings
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        teacher_logits = None
        if job.teacher is not None:
            with torch.no_grad(), autocast(device, settings.amp):
                teacher_logits = job.teacher(images).float()
        with autocast(device, settings.amp):
            logits = self.train_model(images)
        loss, metrics = job.loss(logits.float(), targets, teacher_logits)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            events = job.after_step(self.scaler)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
            events = job.after_step(None)
        self.scheduler.step()
        self.step += 1
        for event in events:
            self.record_event(event)
        self.running_loss += metrics["loss"].double()
        self.batches += 1
        return metrics

    def log_step(self, metrics: dict[str, torch.Tensor], epoch: int, bar) -> None:
        """Only logging steps read values back from the device; every other step queues work and moves on."""
        step, settings = self.step, self.settings
        if not (step % settings.log_every == 0 or step == self.total_steps):
            return
        values = {name: float(value) for name, value in metrics.items()}
        _stop_if_diverged(self.job.phase, step, values)
        bar.set_postfix(epoch=epoch + 1, loss=f"{values['loss']:.4f}", refresh=False)
        if self.log is not None:
            lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
            self.log.write({"phase": self.job.phase, "event": "step", "step": step, "epoch": epoch + 1, **values,
                            "lr": lrs, **self.job.log_extras()})

    # -- epochs ---------------------------------------------------------------------------------------------------

    def end_epoch(self, epoch: int, val_loader) -> None:
        """Validation accuracy, the epoch's record and a checkpoint."""
        job, ctx, settings = self.job, self.ctx, self.settings
        _stop_if_diverged(job.phase, self.step, {"epoch mean loss": float(self.running_loss)})
        accuracy = evaluate_accuracy(self.model, val_loader, self.device, amp=settings.amp, ctx=ctx,
                                     show_progress=False)
        record = {"phase": job.phase, "event": "epoch", "step": self.step, "epoch": epoch + 1,
                  "train_loss": float(self.running_loss) / max(1, self.batches), "val_accuracy": accuracy,
                  **job.log_extras()}
        self.result.history.append(record)
        if self.log is not None:
            self.log.write(record)
        self.save(finished=self.step == self.total_steps)
        macs = record.get("macs_fraction")
        latency = f", latency {record['decided_fraction']:.4f} (table)" if record.get("budget") == "latency" else ""
        log_line(f"[{job.phase}] epoch {epoch + 1}/{settings.epochs}: val acc {accuracy:.4f}"
                 + (f", MACs {macs:.4f} of dense{latency}" if macs is not None else ""), ctx)

    def run(self) -> FitResult:
        """Every remaining step, epoch by epoch."""
        job, ctx, device, settings = self.job, self.ctx, self.device, self.settings
        val_loader = eval_loader(self.data.val, settings.eval_batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                 workers=settings.workers, pin_memory=device.type == "cuda")
        bar = progress(total=self.total_steps, initial=self.step, enabled=settings.show_progress and ctx.is_main,
                       desc=job.phase, unit="step")
        # The first step of a process compiles the Triton kernels it meets (a minute on a GPU the first time,
        # seconds once Triton's cache holds them): say so instead of leaving a bar that seems stuck.
        compiling = _first_step_note(self.model, device)
        prepared = False
        while self.step < self.total_steps:
            epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, step_in_epoch)
            self.model.train()
            if step_in_epoch == 0:
                self.batches = 0
                self.running_loss.zero_()
            for images, targets in train_loader(self.data.train, self.sampler, settings.workers,
                                                device.type == "cuda"):
                if compiling is not None:
                    log_line(f"[{job.phase}] {compiling}", ctx)
                    bar.set_description(f"{job.phase} (compiling kernels)")
                    started = time.perf_counter()
                if not prepared:
                    with autocast(device, settings.amp):
                        job.prepare(images.to(device, non_blocking=True))
                    prepared = True
                metrics = self.train_step(images, targets)
                if compiling is not None:
                    torch.cuda.synchronize(device)  # once: the first step's time, compilation included
                    log_line(f"[{job.phase}] first step: {time.perf_counter() - started:.1f} s, kernel compilation "
                             "included", ctx)
                    bar.set_description(job.phase)
                    compiling = None
                bar.update(1)
                self.log_step(metrics, epoch, bar)
                if settings.checkpoint_every and self.step % settings.checkpoint_every == 0 \
                        and self.step % self.steps_per_epoch:
                    self.save(finished=False)
            self.end_epoch(epoch, val_loader)
        bar.close()
        epochs = [record for record in self.result.history if record.get("event") == "epoch"]
        self.result.val_accuracy = epochs[-1]["val_accuracy"] if epochs else float("nan")
        return self.result


def fit(job: TrainingJob, data: DataBundle, settings: LoopSettings, *, ctx: DistContext, device: torch.device,
        checkpoint_path: str | Path, log: JsonlLog | None, fingerprint: dict, resume: bool) -> FitResult:
    """Train ``job`` for ``settings.epochs`` epochs of ``data.train``, evaluating on ``data.val`` after each epoch.

    Checkpoints (rank 0 only) go to ``checkpoint_path`` at every epoch end and every ``settings.checkpoint_every``
    steps. With ``resume`` and an existing checkpoint, training continues from it; a checkpoint written under another
    ``fingerprint`` (the settings that shape training) raises InputError naming the first difference.
    """
    loop = _Loop(job, data, settings, ctx, device, Path(checkpoint_path), log, fingerprint)
    loop.restore(resume)
    return loop.run()
