"""The gated FFN hidden layer, forward + backward, DeiT-S shapes (op level).

    gated_fc1_fwd_bwd   ``gated_fc1_reference`` / torch.compile of it / ``hiap_kernels.gated_fc1``:
                        GELU(x @ W^T + b) * (z_block * z_neuron), x [B, 197, 384] -> [B, 197, 1536], gates sampled,
                        gradients of x, W, b, the block logit and the neuron logits

This is the gated part of the FFN (fc2 after it is a plain linear, the same for every provider). Weights and gate
logits are block 0's of the default-config layout (some neurons closed). The gates are sampled in training mode with the
draw that ``GatedMlp``'s own forward would hand the op (``mlp.gates.draw()``: the model's temperature and seed, the
layer's counter offset), held fixed while timing, so every provider draws the same mask.
"""

from __future__ import annotations

import pytest
from _harness import CaseRun
from _providers import PROVIDERS, provider_op
from _settings import autocast_context, batch_sizes
from _timing import drop_gradients
from _workloads import (
    DEIT_S_SHAPES,
    EMBED_DIM,
    FFN_DIM,
    TOKENS,
    activations,
    gated_deit_s,
    linear_training_work,
    output_gradient,
)

from hiap_kernels import gated_fc1_reference

# CPU: batch 2 keeps the case to seconds on two shared cores; the shapes per image are DeiT-S's.
BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(2,))
CPU_REDUCTION = "batch 2 instead of 64/256 (per-image shapes are DeiT-S's), fp32"


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_fc1_fwd_bwd(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "gated_fc1_fwd_bwd", provider, batch)
    run.note_cpu_reduction(CPU_REDUCTION)
    run.require_provider(triton_modules=("hiap_kernels.gated_linear.fc1",), compile_cost="small")
    run.require_time(30)
    op = provider_op(provider, "gated_fc1", gated_fc1_reference)

    mlp = gated_deit_s(depth=1).train().vit.blocks[0].mlp
    draw = mlp.gates.draw()
    x = activations((batch, TOKENS, EMBED_DIM), seed=3).requires_grad_()
    leaves = (x, mlp.fc1.weight, mlp.fc1.bias, *draw.logits)
    grad_out = output_gradient((batch, TOKENS, FFN_DIM), seed=4)

    def call() -> None:
        with autocast_context():
            hidden = op(*leaves, approximate=mlp.act.approximate, **draw.options())
        hidden.backward(grad_out)

    shapes = {**DEIT_S_SHAPES, "x": [batch, TOKENS, EMBED_DIM], "weight": [FFN_DIM, EMBED_DIM],
              "output": [batch, TOKENS, FFN_DIM], "kept_neurons_eval": int(mlp.gates.kept_neurons().sum())}
    run.measure(call, prepare=drop_gradients(*leaves), shapes=shapes,
                work=linear_training_work(batch * TOKENS, EMBED_DIM, FFN_DIM),
                compile_cost="small" if provider == "compiled" else None)
