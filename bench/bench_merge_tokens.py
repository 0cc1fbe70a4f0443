"""Size-weighted token merge (the data movement of a ToMe / RAPID merge step), inference, DeiT-S shapes.

    merge_tokens_r16   x [B, 196, 384]: 16 patch tokens folded into the other 180 (a ToMe step of r = 16)

Providers: ``merge_tokens_reference`` (gathers, scatter_add and a division in PyTorch, eager) / torch.compile of it /
``hiap_kernels.merge_tokens`` (one launch). bf16 tokens on a GPU, fp32 on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from _harness import CaseRun
from _providers import PROVIDERS, provider_op
from _settings import DEVICE, ON_GPU, batch_sizes
from _workloads import DEIT_S_SHAPES, EMBED_DIM, merge_tokens_work

from hiap_kernels import merge_tokens_reference

BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(4,))
PATCHES = 196
MERGED = 16


def _inputs(batch: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, PATCHES, EMBED_DIM, generator=generator).to(dtype)
    size = torch.randint(1, 4, (batch, PATCHES), generator=generator).float()
    order = torch.stack([torch.randperm(PATCHES, generator=generator) for _ in range(batch)])
    source, keep = order[:, :MERGED], order[:, MERGED:].sort(dim=1).values
    target = torch.randint(0, PATCHES - MERGED, (batch, MERGED), generator=generator)
    return [t.to(DEVICE) for t in (x, size, keep, source, target)]


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_merge_tokens(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, f"merge_tokens_r{MERGED}", provider, batch,
                  precision="bf16" if ON_GPU else "fp32")
    run.note_cpu_reduction("batch 4 instead of 64/256, fp32")
    run.require_provider(triton_modules=("hiap_kernels.token_merge.kernel",), compile_cost="small")
    run.require_time(15)
    op = provider_op(provider, "merge_tokens", merge_tokens_reference)
    inputs = _inputs(batch, torch.bfloat16 if ON_GPU else torch.float32)

    def call() -> None:
        with torch.no_grad():
            op(*inputs)

    shapes = {**DEIT_S_SHAPES, "x": [batch, PATCHES, EMBED_DIM], "kept": PATCHES - MERGED, "merged": MERGED}
    run.measure(call, shapes=shapes, work=merge_tokens_work(batch, PATCHES, PATCHES - MERGED, MERGED, EMBED_DIM),
                compile_cost="small" if provider == "compiled" else None)
