"""Gated attention, one gated block and a whole gated DeiT-S training step, forward + backward.

    gated_attention_fwd_bwd   ``hiap.GatedAttention`` (gated qkv -> SDPA -> proj), the attention half of a block
    gated_block_fwd_bwd       one timm ``Block`` with ``GatedAttention`` and ``GatedMlp`` (norms, residuals included)
    training_step             gated DeiT-S: forward, HiAP objective (CE + KD + MAC budget + feasibility), backward,
                              AdamW step over weights, gate logits and Lagrange multipliers

Providers: ``reference`` (the modules' PyTorch path, eager), ``compiled`` (torch.compile of the same modules),
``triton`` (the same modules switched with ``hiap.use_triton_kernels``). In the training step only the model forward
is compiled; the objective and the optimizer run eagerly for every provider. The teacher's logits are precomputed:
the teacher is the same dense timm model whatever the provider, so its forward would only dilute the comparison.
The gate seed is held fixed while timing: under torch.compile a new Python-int seed every step would recompile,
whereas the kernels take it as a runtime argument.
"""

from __future__ import annotations

import pytest
import torch

import hiap

from _harness import CaseRun
from _providers import PROVIDERS, compile_reference
from _settings import DEVICE, ON_GPU, autocast_context, batch_sizes
from _workloads import (
    DEIT_S_SHAPES,
    EMBED_DIM,
    NUM_CLASSES,
    TOKENS,
    attention_training_work,
    block_training_work,
    gated_deit_s,
    images,
    training_step_work,
)

MODULE_BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(2,))
CPU_MODULE_REDUCTION = "batch 2 instead of 64/256 (per-image shapes are DeiT-S's), fp32"
# CPU: one training step of DeiT-S at batch 2 is already ~55 GFLOP, seconds on two shared cores.
STEP_BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(2,))
# What hiap.use_triton_kernels switches the gated modules to.
TRITON_MODULES = ("hiap_kernels.gated_linear.qkv", "hiap_kernels.gated_linear.fc1")


def _pin_backend(module: torch.nn.Module, provider: str) -> None:
    if provider == "triton":
        hiap.use_triton_kernels(module)
    else:
        hiap.use_reference_kernels(module)


def _module_case(run: CaseRun, provider: str, pick, batch: int, work, compile_cost: str) -> None:
    run.require_provider(triton_modules=TRITON_MODULES, compile_cost=compile_cost)
    run.require_time(30)
    model = gated_deit_s(depth=1).train()
    module = pick(model.vit.blocks[0])
    _pin_backend(module, provider)
    forward = compile_reference(module) if provider == "compiled" else module
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, TOKENS, EMBED_DIM, generator=generator).to(DEVICE).requires_grad_()
    grad_dtype = torch.bfloat16 if ON_GPU else torch.float32
    grad_out = torch.randn(batch, TOKENS, EMBED_DIM, generator=generator).to(DEVICE, grad_dtype)
    leaves = (x, *module.parameters())

    def prepare() -> None:
        for tensor in leaves:
            tensor.grad = None

    def call() -> None:
        with autocast_context():
            out = forward(x)
        out.backward(grad_out.to(out.dtype))

    shapes = {**DEIT_S_SHAPES, "x": [batch, TOKENS, EMBED_DIM]}
    run.measure(call, prepare=prepare, shapes=shapes, work=work,
                compile_cost=compile_cost if provider == "compiled" else None)


@pytest.mark.parametrize("batch", MODULE_BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_attention_fwd_bwd(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "gated_attention_fwd_bwd", provider, batch)
    run.note_cpu_reduction(CPU_MODULE_REDUCTION)
    _module_case(run, provider, lambda block: block.attn, batch, attention_training_work(batch), "small")


@pytest.mark.parametrize("batch", MODULE_BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_block_fwd_bwd(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "gated_block_fwd_bwd", provider, batch)
    run.note_cpu_reduction(CPU_MODULE_REDUCTION)
    _module_case(run, provider, lambda block: block, batch, block_training_work(batch), "block")


@pytest.mark.parametrize("batch", STEP_BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_training_step(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "training_step", provider, batch)
    run.note_cpu_reduction("batch 2 instead of 64/256 (whole DeiT-S, 12 blocks), fp32")
    run.require_provider(triton_modules=TRITON_MODULES, compile_cost="training", cpu_ok=False,
                         cpu_why_not="compiling the whole gated DeiT-S forward + backward takes minutes on two "
                                     "cores; gated_block_fwd_bwd carries the compiled-vs-eager comparison there")
    run.require_time(45)
    model = gated_deit_s().train()
    _pin_backend(model, provider)
    objective = hiap.HiAPObjective(model).to(DEVICE)
    cfg = model.cfg
    optimizer = torch.optim.AdamW([
        {"params": list(model.weight_parameters().values()), "lr": cfg.lr},
        {"params": list(model.gate_logits().values()), "lr": cfg.gate_lr, "weight_decay": 0.0},
        {"params": objective.budget.lagrangian_parameters(), "lr": cfg.lagrangian_lr, "weight_decay": 0.0},
    ])
    forward = compile_reference(model.vit) if provider == "compiled" else model.vit
    inputs = images(batch)
    generator = torch.Generator().manual_seed(batch)
    targets = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(DEVICE)
    teacher_logits = torch.randn(batch, NUM_CLASSES, generator=generator).to(DEVICE)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context():
            logits = forward(inputs)
            terms = objective(model, logits, teacher_logits, targets)
        terms.total.backward()
        optimizer.step()

    parameters = sum(p.numel() for p in model.parameters())
    shapes = {**DEIT_S_SHAPES, "images": [batch, 3, 224, 224], "parameters": parameters}
    run.measure(step, shapes=shapes, work=training_step_work(batch, parameters), heavy=True,
                compile_cost="training" if provider == "compiled" else None)
