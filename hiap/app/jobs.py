"""What a training phase optimises: the jobs ``fit`` runs (dense teacher, KD fine-tuning, HiAP).

A job supplies the model, its optimizer groups (each with an LR schedule), the loss, its own checkpointed state and,
after each step, the events of the run. The HiAP job is a client of ``hiap.Pruner``, which owns the whole search.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hiap.backend import runs_triton_kernels
from hiap.method.losses import distillation_loss
from hiap.app.runtime import log_line
from hiap.method.pruner import FIX_EVENT, Pruner, decay_groups

__all__ = ["DenseJob", "DistillJob", "HiAPJob", "TrainingJob"]


def _cosine_groups(named: dict[str, nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
    """``decay_groups`` of the weights, each on the loop's cosine schedule."""
    return [{**group, "schedule": "cosine"} for group in decay_groups(named, lr, weight_decay)]


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

    def state_dict(self) -> dict:
        """State besides the model's and the optimizer's that the checkpoint keeps."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def checkpoint_metadata(self) -> dict:
        return {}

    def after_step(self, scaler: torch.amp.GradScaler | None) -> list[dict]:
        """Called after every optimizer step (before ``scaler.update()`` in an fp16 loop). Each returned dict is an
        event of the run (with ``step``, the step it applies from, and maybe a ``message``): logged and kept in the
        history (and the checkpoint)."""
        return []

    def prepare(self, images: torch.Tensor) -> None:
        """Called once per process before its first step, with that step's images (on the device)."""

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
        return _cosine_groups(dict(self.model.named_parameters()), self.lr, weight_decay)

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
        return _cosine_groups(dict(self.model.named_parameters()), self.lr, weight_decay)

    def loss(self, logits, targets, teacher_logits):
        loss = distillation_loss(logits, teacher_logits, targets, self.alpha, self.temperature)
        return loss, {"loss": loss.detach()}


class HiAPJob(TrainingJob):
    """One single-stage HiAP run: ``hiap.Pruner`` drives it (search, landing, structure fix, retirement); the loop
    gives the weights their cosine schedule and the pruner its steps."""

    phase = "hiap"

    def __init__(self, pruner: Pruner):
        super().__init__(pruner.model, pruner.teacher)
        self.pruner = pruner
        self.gated = pruner.model
        self.cfg = pruner.cfg

    def param_groups(self, weight_decay: float, total_steps: int) -> list[dict]:
        if total_steps != self.pruner.total_steps:
            raise ValueError(f"the loop runs {total_steps} steps but the pruner was made for {self.pruner.total_steps}")
        return [{**group, "schedule": "cosine"} for group in self.pruner.param_groups(weight_decay=weight_decay)]

    def state_dict(self) -> dict:
        return {"pruner": self.pruner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pruner.load_state_dict(state["pruner"])

    def checkpoint_metadata(self) -> dict:
        return {"architecture": self.gated.architecture, "hiap_config": self.cfg.to_dict()}

    def prepare(self, images: torch.Tensor) -> None:
        self.pruner.choose_training_paths(images)  # each gated layer's faster training path, timed on a GPU

    def after_step(self, scaler: torch.amp.GradScaler | None) -> list[dict]:
        events = self.pruner.step(scaler)
        if any(event.get("event") == FIX_EVENT for event in events) and \
                runs_triton_kernels(self.gated, self.gated.gate_step.device):
            log_line("[hiap] the first step of the fixed structure compiles the gather kernels")
        return events

    def loss(self, logits, targets, teacher_logits):
        loss = self.pruner.loss(None, targets, logits=logits, teacher_logits=teacher_logits)
        terms = self.pruner.last_terms
        metrics = {"loss": loss.detach(), "task": terms.task, "budget": terms.budget,
                   "feasibility": terms.feasibility}
        return loss, metrics

    def log_extras(self) -> dict:
        return self.pruner.log_values()
