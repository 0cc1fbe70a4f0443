"""norm1 -> qkv and norm2 -> fc1 -> GELU of an extracted model's block, inference, DeiT-S shapes.

    fused_layernorm_linear_qkv    LN(x [B*197, 384]) -> [B*197, 1152]: the qkv GEMM of a dense-width layer
    fused_layernorm_linear_fc1    LN(x) -> fc1 at a pruned width (1024) with GELU

Providers: ``layernorm_linear_reference`` (F.layer_norm, F.linear, GELU; eager) / torch.compile of it /
``hiap_kernels.fused_layernorm_linear`` (LayerNorm in the GEMM prologue, bias and GELU in its epilogue). bf16 on a
GPU, fp32 on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from _harness import CaseRun
from _providers import PROVIDERS, provider_op
from _settings import ON_GPU, batch_sizes
from _workloads import DEIT_S_SHAPES, EMBED_DIM, TOKENS, activations, layernorm_linear_inference_work

from hiap_kernels import layernorm_linear_reference

BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(2,))
CASES = {"qkv": (3 * EMBED_DIM, "none"), "fc1": (1024, "gelu")}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fused_layernorm_linear(benchmark, recorder, provider, batch, case):
    features, activation = CASES[case]
    run = CaseRun(benchmark, recorder, f"fused_layernorm_linear_{case}", provider, batch,
                  precision="bf16" if ON_GPU else "fp32")
    run.note_cpu_reduction(f"batch 2 instead of 64/256 ({2 * TOKENS} rows), fp32")
    run.require_provider(triton_modules=("hiap_kernels.layernorm_linear.kernel",), compile_cost="small")
    run.require_time(20)
    op = provider_op(provider, "fused_layernorm_linear", layernorm_linear_reference)

    dtype = torch.bfloat16 if ON_GPU else torch.float32
    rows = batch * TOKENS
    x = activations((rows, EMBED_DIM), seed=batch, dtype=dtype)
    gamma = 1.0 + 0.1 * activations((EMBED_DIM,), seed=1, dtype=dtype)
    beta = 0.1 * activations((EMBED_DIM,), seed=2, dtype=dtype)
    weight = activations((features, EMBED_DIM), seed=features, dtype=dtype) * EMBED_DIM**-0.5
    bias = activations((features,), seed=features + 1, dtype=dtype) * 0.02

    def call() -> None:
        with torch.no_grad():
            op(x, gamma, beta, 1e-6, weight, bias, activation)

    shapes = {**DEIT_S_SHAPES, "x": [rows, EMBED_DIM], "weight": [features, EMBED_DIM], "output": [rows, features],
              "activation": activation}
    run.measure(call, shapes=shapes, work=layernorm_linear_inference_work(rows, EMBED_DIM, features),
                compile_cost="small" if provider == "compiled" else None)
