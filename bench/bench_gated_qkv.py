"""The gated qkv projection, forward + backward, DeiT-S shapes (op level).

    gated_qkv_fwd_bwd   ``gated_qkv_reference`` / torch.compile of it / ``hiap_kernels.gated_qkv``: x [B, 197, 384]
                        -> q, k, v [B, 6, 197, 64], gates sampled, gradients of x, W, b and the three gate logits;
                        provider ``module``: what ``hiap.GatedAttention`` runs instead of the fused op (the masks on
                        the weight rows and bias by ``gated_qkv_weight`` on a GPU, its PyTorch reference on a CPU, then
                        the library's GEMM forward and backward), so one record says which of the two a GPU should run

Weights and gate logits are block 0's of the default-config layout (some heads and dims closed). The gates are sampled in
training mode with the draw that ``GatedAttention``'s own forward would hand the op (``attn.gates.draw()``: the
model's temperature and seed, the layer's counter offset), held fixed while timing, so every provider draws the same
masks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _harness import CaseRun
from _providers import PROVIDERS, provider_op
from _settings import autocast_context, batch_sizes
from _timing import drop_gradients
from _workloads import (
    DEIT_S_SHAPES,
    EMBED_DIM,
    HEAD_DIM,
    NUM_HEADS,
    TOKENS,
    activations,
    gated_deit_s,
    linear_training_work,
    output_gradient,
)

import hiap
from hiap_kernels import gated_qkv_reference, gated_qkv_weight_reference

# CPU: batch 2 keeps the case to seconds on two shared cores; the shapes per image are DeiT-S's.
BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(2,))
CPU_REDUCTION = "batch 2 instead of 64/256 (per-image shapes are DeiT-S's), fp32"


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", (*PROVIDERS, "module"))
def test_gated_qkv_fwd_bwd(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "gated_qkv_fwd_bwd", provider, batch)
    run.note_cpu_reduction(CPU_REDUCTION)
    run.require_provider(triton_modules=("hiap_kernels.gated_linear.qkv",), compile_cost="small")
    run.require_time(30)
    op = provider_op(provider, "gated_qkv", gated_qkv_reference)

    attn = gated_deit_s(depth=1).train().vit.blocks[0].attn
    draw = attn.gates.draw()
    if provider == "module":
        op = _module_formulation(attn)
    x = activations((batch, TOKENS, EMBED_DIM), seed=1).requires_grad_()
    leaves = (x, attn.qkv.weight, attn.qkv.bias, *draw.logits)
    grads = tuple(output_gradient((batch, NUM_HEADS, TOKENS, HEAD_DIM), seed=2 + i) for i in range(3))

    def call() -> None:
        with autocast_context():
            q, k, v = op(*leaves, **draw.options())
        torch.autograd.backward((q, k, v), grads)

    shapes = {**DEIT_S_SHAPES, "x": [batch, TOKENS, EMBED_DIM], "weight": [3 * EMBED_DIM, EMBED_DIM],
              "outputs": "q, k, v [B, H, N, Dh]"}
    run.measure(call, prepare=drop_gradients(*leaves), shapes=shapes,
                work=linear_training_work(batch * TOKENS, EMBED_DIM, 3 * EMBED_DIM),
                compile_cost="small" if provider == "compiled" else None)


def _module_formulation(attn):
    """``gated_qkv``'s contract computed the way ``GatedAttention.forward`` does: the layer's weight and bias with the
    sampled row masks applied (the module's own choice of ``gated_qkv_weight`` or its reference), then one GEMM."""
    if attn.qkv.weight.is_cuda:
        hiap.use_triton_kernels(attn)

    def op(x, weight, bias, *logits, tau, seed, offset, hard, sample):
        batch, tokens, _ = x.shape
        gated_weight = attn.kernel() or gated_qkv_weight_reference
        weight, bias = gated_weight(weight, bias, *logits, tau=tau, seed=seed, offset=offset, hard=hard,
                                    sample=sample)
        qkv = F.linear(x, weight, bias)
        return qkv.reshape(batch, tokens, 3, NUM_HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)

    return op
