"""Extracted DeiT-S (HiAP-like layout, about 3.1 GMACs) against dense timm DeiT-S (4.60 GMACs), inference.

GPU: throughput at batch 256 and latency at batch 1, weights and inputs in bf16. CPU: latency at batch 1 and 32 in
fp32. Variants, named ``model/provider``:

    dense/reference             timm's DeiT-S, eager (SDPA attention): the baseline of every ratio here
    dense/compiled              torch.compile of it
    extracted/reference         the pruned model's PyTorch path (padded-SDPA ragged attention, nn.Linear FFN)
    extracted/compiled          torch.compile of that
    extracted/triton            ragged attention kernel + fused fc1/bias/GELU kernel (``hiap.use_triton_kernels``)
    */cudagraph                 batch 1 only: the eager forward captured once in a CUDA graph and replayed, which
                                removes launch overhead (the figure a latency-bound deployment would see)
"""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

import hiap

from _harness import CaseRun
from _providers import compile_reference
from _settings import DEVICE, ON_GPU
from _workloads import DEIT_S_SHAPES, dense_deit_s, extracted_deit_s, images, inference_work

BATCHES = (1, 256) if ON_GPU else (1, 32)
VARIANTS = ("dense/reference", "dense/compiled", "extracted/reference", "extracted/compiled", "extracted/triton")
GRAPH_VARIANTS = ("dense/cudagraph", "extracted/reference+cudagraph", "extracted/triton+cudagraph")
CELLS = [(variant, batch) for batch in BATCHES
         for variant in VARIANTS + (GRAPH_VARIANTS if batch == 1 else ())]


@lru_cache(maxsize=None)
def _models_on_cpu() -> dict[str, torch.nn.Module]:
    return {"dense": dense_deit_s(), "extracted": extracted_deit_s().cpu()}


def _cuda_graph(forward, inputs: torch.Tensor):
    """Capture ``forward(inputs)`` once (after warm-up on a side stream, as torch's documentation prescribes)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward(inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward(inputs)
    return graph.replay


@pytest.mark.parametrize("variant,batch", CELLS, ids=[f"{v.replace('/', '-')}-b{b}" for v, b in CELLS])
def test_deit_s_inference(benchmark, recorder, variant, batch):
    weight_dtype = torch.bfloat16 if ON_GPU else torch.float32
    run = CaseRun(benchmark, recorder, "deit_s_inference", variant, batch, baseline="dense/reference",
                  precision="bf16 weights" if ON_GPU else "fp32")
    model_name, provider = variant.split("/")
    uses_graph = provider.endswith("+cudagraph") or provider == "cudagraph"
    if uses_graph:
        run.require_gpu("CUDA graph capture")
    run.require_provider(triton_modules=("hiap_kernels.ragged_attn.kernel", "hiap_kernels.linear_gelu.kernel"),
                         compile_cost="model", cpu_ok=False,
                         cpu_why_not="compiling a whole DeiT-S with inductor takes minutes on two cores")
    run.require_time(40 if batch > 1 else 20)
    run.note_cpu_reduction("full DeiT-S shapes at batch 1 and 32 (instead of 1 and 256), fp32 weights")

    model = copy.deepcopy(_models_on_cpu()[model_name]).to(DEVICE, weight_dtype).eval()
    if model_name == "extracted":
        if "triton" in provider:
            hiap.use_triton_kernels(model)
        else:
            hiap.use_reference_kernels(model)
    forward = compile_reference(model) if provider == "compiled" else model
    inputs = images(batch, weight_dtype)

    if uses_graph:
        with torch.no_grad():
            replay = _cuda_graph(forward, inputs)

        def call() -> None:
            replay()
    else:
        def call() -> None:
            with torch.no_grad():
                forward(inputs)

    gmacs = hiap.count_macs(model) / 1e9
    shapes = {**DEIT_S_SHAPES, "images": [batch, 3, 224, 224], "gmacs_per_image": round(gmacs, 3)}
    if model_name == "extracted":
        shapes["layout"] = [{"qk_widths": block.attn.qk_widths, "v_widths": block.attn.v_widths,
                             "ffn_width": block.mlp.hidden_features} for block in model.blocks]
    weight_bytes = torch.finfo(weight_dtype).bits // 8
    run.measure(call, shapes=shapes, work=inference_work(model, batch, weight_bytes), heavy=batch > 1,
                compile_cost="model" if provider == "compiled" else None)
