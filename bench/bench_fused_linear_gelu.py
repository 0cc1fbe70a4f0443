"""fc1 + bias + GELU of an extracted model's FFN, inference (no autograd), DeiT-S fc1 shapes.

    fused_linear_gelu_f1024   x [B*197, 384] -> [B*197, 1024]: the kept width of a pruned FFN (two thirds of 1536)
    fused_linear_gelu_f1536   x [B*197, 384] -> [B*197, 1536]: the dense width

Providers: ``linear_gelu_reference`` (``F.gelu(F.linear(x, W, b))``, eager) / torch.compile of it /
``hiap_kernels.fused_linear_gelu`` (one GEMM with bias and GELU in its epilogue). Weights and inputs in bf16 on a GPU,
fp32 on a CPU. Each width is a case of its own, so that each has its own reference to take ratios against.
"""

from __future__ import annotations

import pytest
import torch
from _harness import CaseRun
from _providers import PROVIDERS, provider_op
from _settings import ON_GPU, batch_sizes
from _workloads import DEIT_S_SHAPES, EMBED_DIM, FFN_DIM, TOKENS, activations, linear_gelu_inference_work

from hiap_kernels import linear_gelu_reference

BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(2,))
PRUNED_WIDTH = 1024
WIDTHS = (PRUNED_WIDTH, FFN_DIM)


@pytest.mark.parametrize("width", WIDTHS, ids=lambda f: f"f{f}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fused_linear_gelu(benchmark, recorder, provider, batch, width):
    run = CaseRun(benchmark, recorder, f"fused_linear_gelu_f{width}", provider, batch,
                  precision="bf16" if ON_GPU else "fp32")
    run.note_cpu_reduction(f"batch 2 instead of 64/256 ({2 * TOKENS} rows of DeiT-S fc1 inputs), fp32")
    run.require_provider(triton_modules=("hiap_kernels.linear_gelu.kernel",), compile_cost="small")
    run.require_time(20)
    op = provider_op(provider, "fused_linear_gelu", linear_gelu_reference)

    dtype = torch.bfloat16 if ON_GPU else torch.float32
    rows = batch * TOKENS
    x = activations((rows, EMBED_DIM), seed=batch, dtype=dtype)
    weight = activations((width, EMBED_DIM), seed=width, dtype=dtype) * EMBED_DIM**-0.5
    bias = activations((width,), seed=width + 1, dtype=dtype) * 0.02

    def call() -> None:
        with torch.no_grad():
            op(x, weight, bias)

    shapes = {**DEIT_S_SHAPES, "x": [rows, EMBED_DIM], "weight": [width, EMBED_DIM], "output": [rows, width]}
    run.measure(call, shapes=shapes, work=linear_gelu_inference_work(rows, EMBED_DIM, width),
                compile_cost="small" if provider == "compiled" else None)
