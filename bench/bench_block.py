"""Gated attention, one gated block and a whole gated DeiT-S training step, forward + backward.

    gated_attention_fwd_bwd   ``hiap.GatedAttention`` (gated qkv -> SDPA -> proj), the attention half of a block
    gated_mlp_fwd_bwd         ``hiap.GatedMlp`` (fc1 -> GELU -> neuron mask -> fc2), the FFN half of a block
    gated_block_fwd_bwd       one timm ``Block`` with ``GatedAttention`` and ``GatedMlp`` (norms, residuals included)
    training_step             one step of DeiT-S training against what a user pays today, a dense timm step:
                                dense/reference      timm DeiT-S: forward, CE + KD, backward, fused AdamW (baseline)
                                hiap/reference       gated DeiT-S: forward, the whole HiAP objective (CE + KD + MAC
                                                     budget + feasibility, the Lagrange multipliers ascending inside
                                                     it), backward, fused AdamW over weights and gate logits; PyTorch
                                                     gate sampler
                                hiap/triton          the same on the Triton backend (hiap.use_triton_kernels): each
                                                     gated layer's sampling, masking and gate gradients one
                                                     launch each way (gated_qkv_weight, gated_fc2_weight), and
                                                     the objective's gate terms one (gate_objective)
                                hiap/compiled        the same with the model forward compiled (one graph for the run)
                                hiap-late/triton     late in training: half of the heads, dims and neurons closed
                                hiap-retired/triton  the same once those gates are closed for good and retired
                                                     (``retire_closed``): the closed heads and neuron groups skipped
                                                     while every other gate still samples
                                hiap-fixed/triton    the last quarter of a run: that structure fixed
                                                     (``fix_structure``), removed heads and neurons skipped
                                hiap-*/reference     on a CPU, the late, retired and fixed steps on the PyTorch path

Each training-step record carries ``ops_per_step``, the launching ops (views excluded) of one eager step: what a
launch-bound step (DeiT-S at batch 64 on an H100) pays for.

Providers of the module cases: ``reference`` (the modules' PyTorch path, eager), ``compiled`` (torch.compile of the same
modules), ``triton`` (the same modules switched with ``hiap.use_triton_kernels``: the masks on the weights, one launch
each way, and the library's GEMMs) and ``triton-fused`` (the family's fused op instead: ``gated_qkv`` /
``gated_fc1``, gates sampled and applied in the GEMM's epilogue). A gated layer trains on whichever of the last two
measures faster on the device (``training_path``); the targets compare them. In the training step the
temperature anneals and the seed advances every step, as in a real run (both are device tensors: nothing
recompiles). The teacher's logits are precomputed: the teacher is the same dense model for every variant.
"""

from __future__ import annotations

import pytest
import torch
from _harness import CaseRun
from _providers import PROVIDERS, compile_reference
from _settings import DEVICE, ON_GPU, autocast_context, batch_sizes
from _timing import launching_ops
from _workloads import (
    DEIT_S_SHAPES,
    EMBED_DIM,
    NUM_CLASSES,
    TOKENS,
    attention_training_work,
    block_training_work,
    mlp_training_work,
    dense_deit_s,
    gated_deit_s,
    images,
    training_step_work,
)

import hiap
from hiap.app.train import build_optimizer
from hiap.method.gates import step_seed
from hiap.method.losses import distillation_loss

MODULE_BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(2,))
CPU_MODULE_REDUCTION = "batch 2 instead of 64/256 (per-image shapes are DeiT-S's), fp32"
# CPU: one training step of DeiT-S at batch 2 is already ~55 GFLOP, seconds on two shared cores.
STEP_BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(2,))
# What hiap.use_triton_kernels switches the gated modules (their GEMMs are cuBLAS's on every path) and the objective to.
TRITON_MODULES = ("hiap_kernels.gated_weight.qkv_weight", "hiap_kernels.gated_weight.fc2_weight",
                  "hiap_kernels.gated_weight.gather",
                  "hiap_kernels.objective.kernel", "hiap_kernels.gated_linear.qkv", "hiap_kernels.gated_linear.fc1")
# The module cases: the three providers of every op, and the fused training path on the Triton backend.
MODULE_PROVIDERS = (*PROVIDERS, "triton-fused")
STEP_VARIANTS = ("dense/reference", "hiap/reference", "hiap/triton", "hiap/compiled", "hiap-late/triton",
                 "hiap-retired/triton", "hiap-fixed/triton")
if not ON_GPU:  # the Triton cells need a GPU: on a CPU the late, retired and fixed steps run the reference path
    STEP_VARIANTS += ("hiap-late/reference", "hiap-retired/reference", "hiap-fixed/reference")


def _pin_backend(module: torch.nn.Module, provider: str) -> None:
    """The provider's kernel path, and for the Triton ones the training path of every gated layer (not measured)."""
    if provider.startswith("triton"):
        hiap.use_triton_kernels(module)
    else:
        hiap.use_reference_kernels(module)
    for layer in module.modules():
        if isinstance(layer, (hiap.GatedAttention, hiap.GatedMlp)):
            layer.training_path = "fused" if provider == "triton-fused" else "weights"


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
@pytest.mark.parametrize("provider", MODULE_PROVIDERS)
def test_gated_attention_fwd_bwd(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "gated_attention_fwd_bwd", provider, batch)
    run.note_cpu_reduction(CPU_MODULE_REDUCTION)
    _module_case(run, provider, lambda block: block.attn, batch, attention_training_work(batch), "small")


@pytest.mark.parametrize("batch", MODULE_BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", MODULE_PROVIDERS)
def test_gated_mlp_fwd_bwd(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "gated_mlp_fwd_bwd", provider, batch)
    run.note_cpu_reduction(CPU_MODULE_REDUCTION)
    _module_case(run, provider, lambda block: block.mlp, batch, mlp_training_work(batch), "small")


@pytest.mark.parametrize("batch", MODULE_BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", MODULE_PROVIDERS)
def test_gated_block_fwd_bwd(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "gated_block_fwd_bwd", provider, batch)
    run.note_cpu_reduction(CPU_MODULE_REDUCTION)
    _module_case(run, provider, lambda block: block, batch, block_training_work(batch), "block")


@pytest.mark.parametrize("batch", STEP_BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_training_step(benchmark, recorder, variant, batch):
    run = CaseRun(benchmark, recorder, "training_step", variant, batch, baseline="dense/reference")
    run.note_cpu_reduction("batch 2 instead of 64/256 (whole DeiT-S, 12 blocks), fp32")
    model_name, provider = variant.split("/")
    run.require_provider(triton_modules=TRITON_MODULES, compile_cost="training", cpu_ok=False,
                         cpu_why_not="compiling the whole gated DeiT-S forward + backward takes minutes on two "
                                     "cores; gated_block_fwd_bwd carries the compiled-vs-eager comparison there")
    run.require_time(45)
    inputs = images(batch)
    generator = torch.Generator().manual_seed(batch)
    targets = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(DEVICE)
    teacher_logits = torch.randn(batch, NUM_CLASSES, generator=generator).to(DEVICE)
    if model_name == "dense":
        model = dense_deit_s().to(DEVICE).train()
        optimizer = build_optimizer([{"params": list(model.parameters()), "lr": 1e-4}])

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast_context():
                loss = distillation_loss(model(inputs).float(), teacher_logits, targets)
            loss.backward()
            optimizer.step()
    else:
        model = gated_deit_s().train()
        if model_name in ("hiap-late", "hiap-retired", "hiap-fixed"):
            _close_half(model)
        if model_name == "hiap-retired":
            model.retire_closed(model.cfg.retire_below)
        _pin_backend(model, provider)
        if model_name == "hiap-fixed":
            model.fix_structure()
        objective = hiap.HiAPObjective(model).to(DEVICE)
        cfg = model.cfg
        optimizer = build_optimizer([
            {"params": list(model.weight_parameters().values()), "lr": cfg.lr},
            {"params": list(model.gate_logits().values()), "lr": cfg.gate_lr, "weight_decay": 0.0},
        ])
        forward = compile_reference(model.vit) if provider == "compiled" else model.vit
        counter = iter(range(10**9))

        def step() -> None:
            index = next(counter)
            model.set_temperature(hiap.temperature_at(index % 1000, 1000, cfg.tau0, cfg.tau_min))
            model.schedule.set_seed(step_seed(cfg.seed, index))
            optimizer.zero_grad(set_to_none=True)
            with autocast_context():
                logits = forward(inputs)
            terms = objective(model, logits.float(), teacher_logits, targets)
            terms.total.backward()
            optimizer.step()

    parameters = sum(p.numel() for p in model.parameters())
    shapes = {**DEIT_S_SHAPES, "images": [batch, 3, 224, 224], "parameters": parameters}
    if provider != "compiled":  # under a dispatch mode torch.compile falls back to eager: no count for it
        step()  # the first step also creates the optimizer's state
        shapes["ops_per_step"] = launching_ops(step)
    run.measure(step, shapes=shapes, work=training_step_work(batch, parameters), heavy=True,
                compile_cost="training" if provider == "compiled" else None)


def _close_half(model: hiap.HiAPViT) -> None:
    """Late in a run: every other head and FFN block closed, and half of the remaining dims and neurons."""
    for attn, mlp in zip(model.attention_layers(), model.ffn_layers()):
        heads = torch.arange(attn.num_heads, device=attn.gates.head.device)
        attn.gates.assign(head=heads % 2 == 0, qk=torch.arange(attn.gates.qk.shape[1]) % 2 == 0,
                          v=torch.arange(attn.gates.v.shape[1]) % 2 == 0)
        mlp.gates.assign(neuron=torch.arange(mlp.gates.neuron.shape[0]) % 2 == 0)
