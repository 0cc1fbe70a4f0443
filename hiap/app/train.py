"""Training loops: one resumable, DDP-aware ``fit`` and the three jobs it runs (dense teacher, HiAP, KD fine-tuning).

A step reads top-down: batch -> (teacher logits) -> model forward -> job loss -> backward -> AdamW step over the job's
parameter groups -> LR schedule step. Crash safety: the whole training state (model, optimizer, scheduler, the
objective's Lagrange multipliers, step, RNG, the run's config) is written atomically at the end of every epoch and every
``checkpoint_every`` steps; ``resume=True`` continues from it bit for bit, because the batch order is a function of
``(seed, epoch)`` and the gates are drawn from ``(cfg.seed, gate_step)``, both restored from the checkpoint.
"""

from __future__ import annotations

import math
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
from hiap.app.runtime import DistContext, InputError, atomic_torch_save, autocast, log_line, needs_grad_scaler, progress
from hiap.method.convert import HiAPViT
from hiap.method.cost import count_macs, expected_cost
from hiap.method.gates import temperature_at
from hiap.method.losses import HiAPObjective, distillation_loss

# How far the extracted MACs may end from a target-mode run's target (a fraction of it) before settle_budget acts.
TOLERANCE = 0.01

__all__ = ["DenseJob", "DistillJob", "FitResult", "HiAPJob", "LoopSettings", "TrainingJob", "fit", "settle_budget"]


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
# Jobs
# --------------------------------------------------------------------------------------------------------------------

def _decay_groups(named: dict[str, nn.Parameter], lr: float, weight_decay: float, name: str) -> list[dict]:
    """Weights with decay, and biases / norms / embeddings without (timm's convention)."""
    no_decay_names = ("pos_embed", "cls_token", "reg_token")
    decay, plain = [], []
    for key, parameter in named.items():
        if not parameter.requires_grad:
            continue
        (plain if parameter.ndim <= 1 or key.endswith(no_decay_names) else decay).append(parameter)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": name, "schedule": "cosine"},
              {"params": plain, "lr": lr, "weight_decay": 0.0, "name": f"{name}_no_decay", "schedule": "cosine"}]
    return [g for g in groups if g["params"]]


class TrainingJob:
    """What one phase optimises. ``fit`` owns the loop; a job supplies the model, the parameter groups and the loss."""

    phase: str = "train"

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None):
        self.model = model
        self.teacher = teacher
        # The student is a copy of the teacher, which an earlier phase may have frozen: train every weight anyway.
        # A pruned layer with nothing left keeps zero-sized weights that no forward uses; DDP needs every trainable
        # parameter to receive a gradient, and there is nothing to train in them, so those stay frozen.
        for parameter in model.parameters():
            parameter.requires_grad_(parameter.numel() > 0)

    def param_groups(self, weight_decay: float, total_steps: int) -> list[dict]:
        """Optimizer groups, each with ``name`` and ``schedule`` (``"cosine"``, ``"constant"`` or a function of the
        step giving the LR factor)."""
        raise NotImplementedError

    def state_modules(self) -> dict[str, nn.Module]:
        """Modules besides the model whose state the checkpoint keeps."""
        return {}

    def checkpoint_metadata(self) -> dict:
        return {}

    def before_step(self, step: int, total_steps: int) -> dict | None:
        """Called before every training step (the HiAP job anneals the gate temperature and fixes the structure
        here). A returned dict is an event of the run: logged and kept in the history (and the checkpoint)."""
        return None

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``logits [B, C]`` (float32), ``targets [B]`` -> (scalar loss, detached scalars for the log).

        The log values stay tensors on the device: the loop reads them back only on logging steps.
        """
        raise NotImplementedError

    def log_extras(self) -> dict:
        return {}


class DenseJob(TrainingJob):
    """Cross-entropy training of a dense model (the teacher)."""

    phase = "teacher"

    def __init__(self, model: nn.Module, lr: float):
        super().__init__(model)
        self.lr = lr

    def param_groups(self, weight_decay: float, total_steps: int) -> list[dict]:
        return _decay_groups(dict(self.model.named_parameters()), self.lr, weight_decay, "weights")

    def loss(self, logits, targets, teacher_logits):
        loss = nn.functional.cross_entropy(logits, targets)
        return loss, {"loss": loss.detach()}


class DistillJob(TrainingJob):
    """Knowledge distillation of a (pruned) student from the dense teacher: the baselines' recovery training."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, lr: float, alpha: float, temperature: float,
                 phase: str = "distill"):
        super().__init__(student, teacher)
        self.lr = lr
        self.alpha = alpha
        self.temperature = temperature
        self.phase = phase

    def param_groups(self, weight_decay: float, total_steps: int) -> list[dict]:
        return _decay_groups(dict(self.model.named_parameters()), self.lr, weight_decay, "weights")

    def loss(self, logits, targets, teacher_logits):
        loss = distillation_loss(logits, teacher_logits, targets, self.alpha, self.temperature)
        return loss, {"loss": loss.detach()}


def settle_budget(gated: HiAPViT, tolerance: float = TOLERANCE, step_size: float = 0.01, max_steps: int = 5000,
                  patience: int = 500) -> dict:
    """Move the decided MACs of a target-mode run within ``tolerance`` of the target; a no-op when they are.

    The search lands near the target, but the decision is coarse where it matters most: on the digits ViT one FFN
    block is a tenth of the MACs, and the blocks whose gates sit near zero decide between, e.g., 0.60 and 0.70 for a
    target of 0.667. This deterministic rounding step moves only the micro logits (q/k dims, v dims, neurons) along
    the expected-cost gradient, scaled so the fastest moves ``step_size`` per step, in the direction that closes the
    gap, until the decided MACs are within half the tolerance, or within the tolerance once they have crossed the
    target (single units can be too coarse for the half). The units that move the most are those closest to zero in
    the costliest positions, i.e. the least decided ones; the weights are left as trained. Where no step reaches the
    tolerance (it gives up after ``patience`` steps without getting closer), the logits closest to the target are
    kept. It is a pure function of the logits, so every DDP rank, a resumed run and ``hiap extract`` reach the same
    result.

    Returns ``{"steps", "before", "after"}`` (MAC fractions of dense), or None outside target mode.
    """
    cfg = gated.cfg
    if cfg.budget != "target":
        return None
    dense = expected_cost(gated).dense
    before = count_macs(gated) / dense
    fraction, steps = before, 0

    def error(value: float) -> float:
        return abs(value / cfg.target - 1)

    if error(fraction) <= tolerance:
        return {"steps": 0, "before": before, "after": fraction}
    micro = gated.micro_gate_logits()
    best = (error(fraction), [logit.detach().clone() for logit in micro], fraction, steps)
    first_side = fraction > cfg.target
    while error(fraction) > tolerance / 2 and steps < max_steps and steps - best[3] < patience:
        if (fraction > cfg.target) != first_side and error(fraction) <= tolerance:
            break
        grads = torch.autograd.grad(expected_cost(gated).total, micro)
        scale = max(float(g.abs().max()) for g in grads)
        if scale == 0.0:
            break
        direction = 1.0 if fraction > cfg.target else -1.0
        with torch.no_grad():
            for logit, grad in zip(micro, grads):
                logit.sub_(direction * step_size * grad.to(logit.dtype) / scale)
        steps += 1
        fraction = count_macs(gated) / dense
        if error(fraction) < best[0]:
            best = (error(fraction), [logit.detach().clone() for logit in micro], fraction, steps)
    if error(fraction) > tolerance and best[0] < error(fraction):
        with torch.no_grad():
            for logit, kept in zip(micro, best[1]):
                logit.copy_(kept)
        fraction, steps = best[2], best[3]
    return {"steps": steps, "before": before, "after": fraction}


class HiAPJob(TrainingJob):
    """One single-stage HiAP run: weights and gate logits together under KD, the MAC budget and the feasibility
    penalties, with the Gumbel-Sigmoid temperature annealed from tau0 to tau_min.

    The run has two parts. The search (the first ``cfg.fix_at`` of the steps) trains weights, gate logits and the
    Lagrange multipliers together; the gates' learning rate falls to zero along a cosine over it and the temperature
    anneals over it. Then, when ``fix_at < 1``, the structure is fixed: the decision is settled onto the target
    (``settle_budget``, a no-op when the search landed within ``TOLERANCE``; how far it moved is an event of the run)
    and the remaining steps train the weights of the network extraction keeps, with the gates applied as decided.
    """

    phase = "hiap"

    def __init__(self, gated: HiAPViT, teacher: nn.Module, objective: HiAPObjective):
        super().__init__(gated, teacher)
        self.gated = gated
        self.objective = objective
        self.cfg = gated.cfg
        self.dense_macs = expected_cost(gated).dense

    def search_steps(self, total_steps: int) -> int:
        """Steps in which the gates learn: ``round(fix_at * total_steps)``, at least one."""
        return max(1, min(total_steps, round(self.cfg.fix_at * total_steps)))

    def gate_speedup(self, search_steps: int) -> float:
        """Factor on ``gate_lr`` for a short search (1 for long ones).

        Adam moves a logit by about its learning rate per step at most, and the search's cosine gives ``lr * S / 2``
        of travel over ``S`` steps. A logit must be able to go from ``init_logit`` to the decision boundary and as far
        again within the search, or a short run does not prune by training at all: 60 DeiT-S steps at 0.05 left
        every logit positive, and 2-epoch digits runs ended the search above 0.9 of the MACs.
        """
        if self.cfg.gate_lr <= 0:
            return 1.0
        needed = 4.0 * abs(self.cfg.init_logit) / search_steps
        return max(1.0, needed / self.cfg.gate_lr)

    def param_groups(self, weight_decay: float, total_steps: int) -> list[dict]:
        search = self.search_steps(total_steps)
        speedup = self.gate_speedup(search)

        def over_search(step: int) -> float:  # cosine from 1 to 0 over the search, 0 after it
            return 0.5 * (1.0 + math.cos(math.pi * step / search)) if step < search else 0.0

        groups = _decay_groups(self.gated.weight_parameters(), self.cfg.lr, weight_decay, "weights")
        # The logits' rate falls to zero over the search: at a constant rate, clusters of near-zero logits (a whole
        # FFN block's gate among them) kept crossing zero together until the last step.
        groups.append({"params": list(self.gated.gate_logits().values()), "lr": self.cfg.gate_lr * speedup,
                       "weight_decay": 0.0, "name": "gates", "schedule": over_search})
        return groups

    def state_modules(self) -> dict[str, nn.Module]:
        return {"objective": self.objective}

    def checkpoint_metadata(self) -> dict:
        return {"architecture": self.gated.architecture, "hiap_config": self.cfg.to_dict()}

    def before_step(self, step: int, total_steps: int) -> dict | None:
        search = self.search_steps(total_steps)
        self.gated.set_temperature(temperature_at(min(step, search), search, self.cfg.tau0, self.cfg.tau_min))
        ramp = self.cfg.target_ramp * search
        reached = min(1.0, step / ramp) if ramp > 0 else 1.0
        self.objective.budget.set_target(1.0 - (1.0 - self.cfg.target) * reached)
        self.objective.budget.ascending = step < search
        if not (search < total_steps and step == search):
            # Set on every step (a no-op unless it changes), so a run resumed after the fix trains the decided
            # network as well.
            self.gated.fix_structure(search < total_steps and step >= search)
            return None
        self.gated.fix_structure(False)  # fixing below reads the settled decision afresh
        searched = count_macs(self.gated) / self.dense_macs
        settling = settle_budget(self.gated, TOLERANCE) or {"steps": 0, "before": searched, "after": searched}
        self.gated.fix_structure(True)
        moved = f"; settling moved them to {settling['after']:.4f} in {settling['steps']} logit-only steps" \
            if settling["steps"] else ""
        return {"event": "fix_structure", "search_steps": search, "total_steps": total_steps,
                "target": self.cfg.target if self.cfg.budget == "target" else None, **settling,
                "message": f"[hiap] structure fixed after {search} of {total_steps} steps: decided MACs "
                           f"{settling['before']:.4f} of dense{moved}; the remaining steps train the decided network"}

    def loss(self, logits, targets, teacher_logits):
        terms = self.objective(self.gated, logits, teacher_logits, targets)
        metrics = {"loss": terms.total.detach(), "task": terms.task, "budget": terms.budget,
                   "feasibility": terms.feasibility}
        return terms.total, metrics

    @torch.no_grad()
    def log_extras(self) -> dict:
        keep: dict[str, list[float]] = {"head": [], "qk": [], "v": [], "ffn_block": [], "neuron": []}
        for attn, mlp in zip(self.gated.attention_layers(), self.gated.ffn_layers()):
            p_head, p_qk, p_v = attn.gates.keep_probabilities()
            p_block, p_neuron = mlp.gates.keep_probabilities()
            keep["head"].append(round(float(p_head.mean()), 5))
            keep["qk"].append(round(float(p_qk.mean()), 5))
            keep["v"].append(round(float(p_v.mean()), 5))
            keep["ffn_block"].append(round(float(p_block.mean()), 5))
            keep["neuron"].append(round(float(p_neuron.mean()), 5))
        budget = self.objective.budget
        return {
            "expected_fraction": float(expected_cost(self.gated).total) / self.dense_macs,
            "decided_fraction": count_macs(self.gated) / self.dense_macs,
            "target": self.cfg.target if self.cfg.budget == "target" else None,
            "tau": self.gated.temperature,
            "lambda1": float(budget.lambda1), "lambda2": float(budget.lambda2),
            "keep_probability": keep,
        }


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
    for module in job.state_modules().values():
        module.to(device)
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
            "extra": {name: module.state_dict() for name, module in job.state_modules().items()},
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
        for name, module in job.state_modules().items():
            module.load_state_dict(payload["extra"][name])
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
        log_line(f"[{job.phase}] no checkpoint at {checkpoint_path}; starting from scratch", ctx)

    val_loader = eval_loader(data.val, settings.eval_batch_size, rank=ctx.rank, world_size=ctx.world_size,
                             workers=settings.workers, pin_memory=device.type == "cuda")
    bar = progress(total=total_steps, initial=step, enabled=settings.show_progress and ctx.is_main,
                   desc=job.phase, unit="step")
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, step_in_epoch)
        model.train()
        if step_in_epoch == 0:
            running.update(loss_sum=0.0, batches=0)
            running_loss.zero_()
        for images, targets in train_loader(data.train, sampler, settings.workers, device.type == "cuda"):
            event = job.before_step(step, total_steps)
            if event is not None:
                message = event.pop("message", None)
                event = {"phase": job.phase, "step": step, "epoch": epoch + 1, **event}
                result.history.append(event)
                if log is not None:
                    log.write(event)
                if message:
                    log_line(message, ctx)
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
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            step += 1
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
        extras = record.get("decided_fraction")
        log_line(f"[{job.phase}] epoch {epoch + 1}/{settings.epochs}: val acc {accuracy:.4f}"
                 + (f", MACs {extras:.4f} of dense" if extras is not None else ""), ctx)
    bar.close()
    epochs = [record for record in result.history if record.get("event") == "epoch"]
    result.val_accuracy = epochs[-1]["val_accuracy"] if epochs else float("nan")
    return result
