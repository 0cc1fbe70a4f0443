"""Whole models, inference: the extracted DeiT-S against what a user runs today, dense timm DeiT-S.

The pruned model is what the default configuration produces at two thirds of the MACs (``_workloads``: gate a
DeiT-S with ``HiAPConfig()``, draw logits, extract). GPU: throughput at batch 256 and latency at batch 1, weights
and inputs in bf16. CPU: latency at batch 1 and 16 in fp32. Variants, named ``model/provider``:

    dense/reference                 timm's DeiT-S, eager (SDPA attention): the baseline of every ratio here
    dense/compiled                  torch.compile of it (inductor, default mode)
    regular/reference, /compiled    a regular timm DeiT-S at the same MACs (six full heads, one FFN width): the bar
                                    pruning has to clear, since a user could train that model instead
    extracted/reference             the pruned model on its PyTorch paths (SDPA per run of equal heads, nn.Linear)
    extracted/optimized             ``hiap.optimize(pruned)``: per layer, the fastest of SDPA / the ragged Triton kernel
                                    and of nn.Linear + GELU / the fused kernel, then per block timm's forward or fused
                                    GEMMs (LayerNorm prologues; bias, GELU, LayerScale, residual epilogues)
    extracted/compiled              ``hiap.optimize(pruned, compile=True)``: the same, in one compiled graph
    extracted-perdim/optimized      the paper's per-dim gates (``dim_group=1``) at the same budget: odd widths
    extracted-f64/optimized         q/k, v widths in 16s and FFN widths in 64s (the first aligned default)
    extracted-g32/optimized         q/k, v widths in 32s and FFN widths in 128s (the default is 16s and 128s)
    */cudagraph, */...+cudagraph    batch 1 only: the forward captured once in a CUDA graph and replayed, which removes
                                    launch overhead (the figure a latency-bound deployment would see)
"""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch
from _harness import CaseRun
from _settings import DEVICE, ON_GPU
from _workloads import (
    DEIT_S_SHAPES,
    dense_deit_s,
    extracted_deit_s,
    images,
    inference_work,
    lazy_inference_call,
    regular_deit_s_at,
)

import hiap

BATCHES = (1, 256) if ON_GPU else (1, 16)
VARIANTS = ("dense/reference", "dense/compiled", "regular/reference", "regular/compiled", "extracted/reference",
            "extracted/optimized", "extracted/compiled", "extracted-perdim/optimized", "extracted-f64/optimized",
            "extracted-g32/optimized")
GRAPH_VARIANTS = ("dense/cudagraph", "regular/cudagraph", "extracted/optimized+cudagraph")
CELLS = [(variant, batch) for batch in BATCHES
         for variant in VARIANTS + (GRAPH_VARIANTS if batch == 1 else ())]
# Gate groups (dim_group, neuron_group) of each extracted model.
GROUPS = {"extracted": (0, 0), "extracted-perdim": (1, 1), "extracted-f64": (16, 64), "extracted-g32": (32, 128)}


@lru_cache(maxsize=None)
def _model_on_cpu(name: str) -> torch.nn.Module:
    if name == "dense":
        return dense_deit_s()
    if name == "regular":
        return regular_deit_s_at(hiap.count_macs(_model_on_cpu("extracted")))
    return extracted_deit_s(*GROUPS[name]).cpu()


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


def _prepared(model_name: str, provider: str, batch: int, dtype: torch.dtype):
    """The callable a user would run for this variant."""
    model = copy.deepcopy(_model_on_cpu(model_name)).to(DEVICE, dtype).eval().requires_grad_(False)
    if provider.startswith("optimized"):
        return hiap.optimize(model, batch_size=batch), model
    if model_name.startswith("extracted"):
        hiap.use_reference_kernels(model)
        if provider == "compiled":
            return hiap.optimize(model, batch_size=batch, compile=True), model
    if provider == "compiled":
        return torch.compile(model), model
    return model, model


@pytest.mark.parametrize("variant,batch", CELLS, ids=[f"{v.replace('/', '-')}-b{b}" for v, b in CELLS])
def test_deit_s_inference(benchmark, recorder, variant, batch):
    weight_dtype = torch.bfloat16 if ON_GPU else torch.float32
    run = CaseRun(benchmark, recorder, "deit_s_inference", variant, batch, baseline="dense/reference",
                  precision="bf16 weights" if ON_GPU else "fp32")
    model_name, provider = variant.split("/")
    uses_graph = provider.endswith("cudagraph")
    if uses_graph:
        run.require_gpu("CUDA graph capture")
    compiled = provider == "compiled"
    run.require_provider(triton_modules=(), compile_cost="model", cpu_ok=False,
                         cpu_why_not="compiling a whole DeiT-S with inductor takes minutes on two cores")
    run.require_time(60 if compiled else 25)
    run.note_cpu_reduction("full DeiT-S shapes at batch 1 and 16 (instead of 1 and 256), fp32 weights")

    forward, model = _prepared(model_name, provider.removesuffix("+cudagraph"), batch, weight_dtype)
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
    shapes = {**DEIT_S_SHAPES, "images": [batch, 3, 224, 224], "gmacs_per_image": round(gmacs, 3),
              "mac_ratio_vs_dense": round(hiap.count_macs(_model_on_cpu("dense")) / hiap.count_macs(model), 4)}
    if model_name.startswith("extracted"):
        shapes["layout"] = [{"qk_widths": block.attn.qk_widths, "v_widths": block.attn.v_widths,
                             "ffn_width": block.mlp.hidden_features} for block in model.blocks]
        shapes["paths"] = hiap.method.inference.describe_paths(model)
    if model_name == "regular":
        shapes["ffn_width"] = model.blocks[0].mlp.fc1.out_features
    weight_bytes = torch.finfo(weight_dtype).bits // 8
    run.measure(call, shapes=shapes, work=inference_work(model, batch, weight_bytes), heavy=batch > 1,
                compile_cost="model" if compiled else None, 
                paired_baseline=lazy_inference_call(lambda: _prepared("dense", "reference", batch, weight_dtype)[0], inputs))
