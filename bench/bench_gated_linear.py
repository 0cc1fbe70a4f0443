"""Training-side projections, forward + backward, DeiT-S shapes: the gated qkv projection and the gated FFN.

    gated_qkv_fwd_bwd   op level: ``gated_qkv_reference`` / torch.compile of it / ``gated_linear.gated_qkv``
                        (x [B, 197, 384] -> q, k, v [B, 6, 197, 64], gates sampled, gradients of x, W, b and logits)
    gated_ffn_fwd_bwd   module level: ``hiap.GatedMlp`` (fc1 -> GELU -> neuron mask -> fc2) on the reference path /
                        compiled / with ``gated_fc1`` (fc1 + bias + GELU + mask fused, sampling in the epilogue)

Gate logits come from block 0 of the HiAP-like layout (some heads, dims and neurons closed); gates are sampled in
training mode with a fixed seed, so every provider draws the same masks.
"""

from __future__ import annotations

import pytest
import torch

import hiap
from hiap_kernels.gated_linear_reference import gated_qkv_reference

from _harness import DEVICE, PROVIDERS, CaseRun, autocast_context, batch_sizes, compile_reference
from _workloads import (
    DEIT_S_SHAPES,
    EMBED_DIM,
    FFN_DIM,
    HEAD_DIM,
    NUM_HEADS,
    TOKENS,
    ffn_training_work,
    gated_deit_s,
    linear_training_work,
)

# CPU: batch 2 keeps the two cases to seconds on two shared cores; the shapes per image are DeiT-S's.
BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(2,))
CPU_REDUCTION = "batch 2 instead of 64/256 (per-image shapes are DeiT-S's), fp32"
GATE_TAU = 1.0


def _first_block():
    model = gated_deit_s(depth=1).train()
    return model, model.vit.blocks[0]


def _activations(batch: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TOKENS, width, generator=generator).to(DEVICE)


def _output_gradient(shape, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # what autocast makes the outputs
    return torch.randn(shape, generator=generator).to(DEVICE, dtype)


def _drop_gradients(*tensors: torch.Tensor):
    def prepare() -> None:
        for tensor in tensors:
            tensor.grad = None

    return prepare


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_qkv_fwd_bwd(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "gated_qkv_fwd_bwd", provider, batch)
    run.note_cpu_reduction(CPU_REDUCTION)
    run.require_provider(triton_modules=("hiap_kernels.gated_linear",), compile_cost="small")
    run.require_time(30)
    if provider == "triton":
        from hiap_kernels.gated_linear import gated_qkv as op
    elif provider == "compiled":
        op = compile_reference(gated_qkv_reference)
    else:
        op = gated_qkv_reference

    model, block = _first_block()
    attn = block.attn
    x = _activations(batch, EMBED_DIM, seed=1).requires_grad_()
    leaves = (x, attn.qkv.weight, attn.qkv.bias, attn.gate_head, attn.gate_qk, attn.gate_v)
    gate_args = dict(tau=GATE_TAU, seed=model.gate_state.seed, offset=attn.gate_offset, hard=True, sample=True)
    grads = tuple(_output_gradient((batch, NUM_HEADS, TOKENS, HEAD_DIM), seed=2 + i) for i in range(3))

    def call() -> None:
        with autocast_context():
            q, k, v = op(*leaves, **gate_args)
        torch.autograd.backward((q, k, v), grads)

    shapes = {**DEIT_S_SHAPES, "x": [batch, TOKENS, EMBED_DIM], "weight": [3 * EMBED_DIM, EMBED_DIM],
              "outputs": "q, k, v [B, H, N, Dh]"}
    run.measure(call, prepare=_drop_gradients(*leaves), shapes=shapes,
                work=linear_training_work(batch * TOKENS, EMBED_DIM, 3 * EMBED_DIM),
                compile_cost="small" if provider == "compiled" else None)


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_ffn_fwd_bwd(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "gated_ffn_fwd_bwd", provider, batch)
    run.note_cpu_reduction(CPU_REDUCTION)
    run.require_provider(triton_modules=("hiap_kernels.gated_linear",), compile_cost="small")
    run.require_time(30)

    _, block = _first_block()
    mlp = block.mlp
    if provider == "triton":
        hiap.use_triton_kernels(mlp)
    else:
        hiap.use_reference_kernels(mlp)
    forward = compile_reference(mlp) if provider == "compiled" else mlp
    x = _activations(batch, EMBED_DIM, seed=3).requires_grad_()
    grad_out = _output_gradient((batch, TOKENS, EMBED_DIM), seed=4)
    leaves = (x, *mlp.parameters())

    def call() -> None:
        with autocast_context():
            out = forward(x)
        out.backward(grad_out)

    shapes = {**DEIT_S_SHAPES, "x": [batch, TOKENS, EMBED_DIM], "fc1": [FFN_DIM, EMBED_DIM],
              "kept_neurons_eval": int(mlp.decisions()[1].sum())}
    run.measure(call, prepare=_drop_gradients(*leaves), shapes=shapes, work=ffn_training_work(batch * TOKENS),
                compile_cost="small" if provider == "compiled" else None)
