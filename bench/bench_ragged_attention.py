"""Inference attention over ragged per-head widths: the attention cores of all 12 layers of the extracted DeiT-S.

Layout: what the default configuration extracts at 2/3 of the MACs (``_workloads.default_layout``: q/k and v widths
in 16s, heads ordered by width). Each layer reads the packed output of its qkv GEMM ``[B, 197, T]`` and writes
``[B, 197, sum(v_w)]`` for proj. Providers:

    reference       ``ragged_attention_padded``: pad every head to the layer's widest, one SDPA call per layer
    compiled        torch.compile of those 12 padded calls as one graph
    sdpa_runs       ``ragged_attention_sdpa``: one SDPA call per run of equal-width heads (the pruned model's
                    PyTorch path)
    triton          ``hiap_kernels.ragged_attention``: one launch per layer, widths from a table validated once
    per_head_loop   ``ragged_attention_naive``: one head at a time, explicit softmax in fp32

The 12 layers are timed together so that one figure is not dominated by a single launch's latency.
"""

from __future__ import annotations

import pytest
import torch
from _harness import CaseRun
from _providers import compile_reference
from _settings import DEVICE, ON_GPU, batch_sizes
from _workloads import DEIT_S_SHAPES, HEAD_DIM, TOKENS, default_layout, ragged_attention_work

from hiap_kernels.ragged_attn.reference import (
    build_head_table,
    padded_gather_indices,
    ragged_attention_naive,
    ragged_attention_padded,
)
from hiap_kernels.ragged_attn.sdpa import head_runs, ragged_attention_sdpa

BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(2,))
RAGGED_PROVIDERS = ("reference", "compiled", "sdpa_runs", "triton", "per_head_loop")
SCALE = HEAD_DIM**-0.5


def _layer_inputs(batch: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(batch)
    layers = []
    for layer in default_layout():
        width = 2 * sum(layer.qk_widths) + sum(layer.v_widths)
        qkv = torch.randn(batch, TOKENS, width, generator=generator).to(DEVICE, dtype)
        layers.append((layer, qkv))
    return layers


def _padded_all_layers(qkvs, indices):
    return [ragged_attention_padded(qkv, *index, SCALE) for qkv, index in zip(qkvs, indices)]


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", RAGGED_PROVIDERS)
def test_ragged_attention(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "ragged_attention", provider, batch,
                  precision="bf16" if ON_GPU else "fp32")
    run.note_cpu_reduction("batch 2 instead of 64/256 (12 layers of the DeiT-S layout, 197 tokens), fp32")
    run.require_provider(triton_modules=("hiap_kernels.ragged_attn.kernel",), compile_cost="small")
    if provider == "triton":
        from hiap_kernels import ragged_attention
    run.require_time(20)

    dtype = torch.bfloat16 if ON_GPU else torch.float32
    layers = _layer_inputs(batch, dtype)
    qkvs = [qkv for _, qkv in layers]
    layouts = [layer for layer, _ in layers]

    if provider in ("reference", "compiled"):
        indices = [padded_gather_indices(layer.qk_widths, layer.v_widths, device=DEVICE) for layer in layouts]
        padded = compile_reference(_padded_all_layers) if provider == "compiled" else _padded_all_layers

        def call():
            return padded(qkvs, indices)
    elif provider == "sdpa_runs":
        runs = [head_runs(layer.qk_widths, layer.v_widths) for layer in layouts]

        def call():
            return [ragged_attention_sdpa(qkv, layer_runs, SCALE) for qkv, layer_runs in zip(qkvs, runs)]
    elif provider == "triton":
        # As hiap.PrunedAttention calls it: a table validated once, its output width given, no host round trip.
        tables = [(build_head_table(layer.qk_widths, layer.v_widths, device=DEVICE), max(layer.qk_widths),
                   max(layer.v_widths), sum(layer.v_widths)) for layer in layouts]

        def call():
            return [ragged_attention(qkv, table, SCALE, max_qk, max_v, out_width=out_width)
                    for qkv, (table, max_qk, max_v, out_width) in zip(qkvs, tables)]
    else:
        def call():
            return [ragged_attention_naive(qkv, layer.qk_widths, layer.v_widths, SCALE)
                    for qkv, layer in zip(qkvs, layouts)]

    def inference() -> None:
        with torch.no_grad():
            call()

    shapes = {**DEIT_S_SHAPES, "layers": len(layouts),
              "heads_per_layer": [len(layer.qk_widths) for layer in layouts],
              "qk_widths": [list(layer.qk_widths) for layer in layouts],
              "v_widths": [list(layer.v_widths) for layer in layouts]}
    run.measure(inference, shapes=shapes, work=ragged_attention_work(batch, tuple(layouts)),
                compile_cost="small" if provider == "compiled" else None)
