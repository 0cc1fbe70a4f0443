"""proj / fc2 + bias + LayerScale + residual add of an extracted model's block, inference, DeiT-S shapes.

    fused_linear_residual_k384    attention's proj: h [B*197, 384] -> [B*197, 384], added to the residual stream
    fused_linear_residual_k1024   the FFN's fc2 at a pruned width (two thirds of 1536) -> 384

Providers: ``linear_residual_reference`` (F.linear, multiply, add; eager) / torch.compile of it /
``hiap_kernels.fused_linear_residual`` (one GEMM with everything in its epilogue). bf16 on a GPU, fp32 on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from _harness import CaseRun
from _providers import PROVIDERS, provider_op
from _settings import ON_GPU, batch_sizes
from _workloads import DEIT_S_SHAPES, EMBED_DIM, TOKENS, activations, linear_residual_inference_work

from hiap_kernels import linear_residual_reference

BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(2,))
IN_FEATURES = (EMBED_DIM, 1024)


@pytest.mark.parametrize("in_features", IN_FEATURES, ids=lambda k: f"k{k}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fused_linear_residual(benchmark, recorder, provider, batch, in_features):
    run = CaseRun(benchmark, recorder, f"fused_linear_residual_k{in_features}", provider, batch,
                  precision="bf16" if ON_GPU else "fp32")
    run.note_cpu_reduction(f"batch 2 instead of 64/256 ({2 * TOKENS} rows), fp32")
    run.require_provider(triton_modules=("hiap_kernels.linear_residual.kernel",), compile_cost="small")
    run.require_time(20)
    op = provider_op(provider, "fused_linear_residual", linear_residual_reference)

    dtype = torch.bfloat16 if ON_GPU else torch.float32
    rows = batch * TOKENS
    x = activations((rows, in_features), seed=batch, dtype=dtype)
    weight = activations((EMBED_DIM, in_features), seed=in_features, dtype=dtype) * in_features**-0.5
    bias = activations((EMBED_DIM,), seed=in_features + 1, dtype=dtype) * 0.02
    residual = activations((rows, EMBED_DIM), seed=batch + 1, dtype=dtype)
    gamma = torch.full((EMBED_DIM,), 0.1, dtype=dtype, device=x.device)

    def call() -> None:
        with torch.no_grad():
            op(x, weight, bias, residual, gamma)

    shapes = {**DEIT_S_SHAPES, "x": [rows, in_features], "weight": [EMBED_DIM, in_features],
              "output": [rows, EMBED_DIM]}
    run.measure(call, shapes=shapes, work=linear_residual_inference_work(rows, in_features, EMBED_DIM),
                compile_cost="small" if provider == "compiled" else None)
